"""Self-distillation of exit branches: a familial model served from a plain checkpoint starts
with untrained branch copies of `layers[e]`; this package trains them towards the last exit and
stores the result as a small overlay that `ruyiflow.engine.checkpoint.load_model` merges at load
time (reading and merging overlays is `ruyiflow.engine.overlay`).

    corpus.py    the model's own answers to the seed prompts (held-out split), cached
    features.py  frozen-trunk boundary states + teacher top-k, cached
    branch.py    differentiable branch forward with LoRA deltas
    train.py     KL(teacher || student) training loop, checkpoints and resume
    overlay.py   writing an overlay file (its format, reading and merging: engine/overlay.py)
    quality.py   per-exit perplexity / top-1 agreement / KL on held-out answers
    pipeline.py  the whole run, used by `ruyiflow distill`
"""
