"""Routing evaluation: the prompt set, per-exit runs, routing policies and RouteLLM metrics.

prompts.py   the prompt set (JSON Lines) and its loader
results.py   per-exit results: agreement, answer match, label exit, loader/writer
runner.py    batched engine runs: every exit, or escalating to the deepest exit
policies.py  policies as curves of (compute, cloud share, quality) operating points
routing.py   every policy of `eval routing` from results, scores and escalation runs
metrics.py   PGR, APGR, CPT (RouteLLM), exactly as documented there
report.py    per-policy summaries and the text table
plot.py      a tiny PNG line-plot renderer
"""
