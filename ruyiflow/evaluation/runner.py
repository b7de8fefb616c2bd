"""Run prompts through the engine, batched: every prompt at every exit (`run_exits`), or started
at one exit and escalated to the deepest when the confidence window fires (`run_escalation`).

All runs are greedy over the chat template. Up to `engine.max_batch` runs share each engine
step, at whatever exits they are (the engine packs mixed exits into one forward call).

Compute is counted in layer-rows: a run at exit e pushes every token it feeds (the prompt and
each generated token but the last) through e + 1 layers (e trunk layers + the branch layer).
A switch from e to a deeper e' with L cached tokens computes trunk layers e..e'-1 and the new
branch layer over them: (e' - e + 1) x L (engine.model.FamilyModel.switch_exit).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ruyiflow.engine.engine import Engine
from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.evaluation.prompts import Prompt
from ruyiflow.node.escalation import EscalationSettings, EscalationWatch
from ruyiflow.progress import Bar, progress_bar


@dataclass(frozen=True)
class Job:
    key: tuple[str, int]  # (prompt id, start exit)
    prompt_ids: list[int]
    exit: int
    max_tokens: int
    escalation: EscalationSettings | None = None
    escalate_to: int | None = None


@dataclass
class Run:
    """What one job generated."""

    key: tuple[str, int]
    exit: int  # start exit
    num_prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    token_exits: list[int] = field(default_factory=list)  # exit that produced each token
    max_prob: list[float] = field(default_factory=list)
    text: str = ""
    switched_at: int | None = None  # tokens generated before the switch
    final_exit: int | None = None

    @property
    def num_fed(self) -> int:
        """Tokens pushed through the model: the prompt and every generated token but the last."""
        return self.num_prompt_tokens + len(self.token_ids) - 1

    def compute(self) -> int:
        """Layer-rows this run cost (module docstring)."""
        if self.switched_at is None:
            return (self.exit + 1) * self.num_fed
        cached = self.num_prompt_tokens + self.switched_at - 1
        to = self.final_exit
        return (
            (self.exit + 1) * cached
            + (to - self.exit + 1) * cached
            + (to + 1) * (self.num_fed - cached)
        )


def prompt_ids(engine: Engine, prompt: Prompt) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template(prompt.conversation()))


def run_jobs(
    engine: Engine,
    jobs: Iterable[Job],
    on_done: Callable[[Run], None],
    progress: Bar | None = None,
) -> None:
    """Run every job to completion, `engine.max_batch` at a time; `on_done` gets each Run.
    `progress` counts runs, with the tokens per second generated so far as its postfix."""
    pending = deque(jobs)
    num_tokens, started = 0, time.perf_counter()
    active: dict[str, tuple[Job, Run, EscalationWatch | None]] = {}
    while pending or active:
        while pending and len(active) < engine.max_batch:
            job = pending.popleft()
            params = SamplingParams(max_tokens=job.max_tokens)
            seq_id = engine.add_request(job.prompt_ids, params, job.exit)
            can_escalate = job.escalation is not None and job.escalate_to not in (None, job.exit)
            watch = EscalationWatch(job.escalation) if can_escalate else None
            active[seq_id] = (job, Run(job.key, job.exit, len(job.prompt_ids)), watch)
        for event in engine.step():
            job, run, watch = active[event.seq_id]
            run.token_ids.append(event.token_id)
            run.token_exits.append(event.exit)
            run.max_prob.append(event.confidence.max_prob)
            run.text += event.text
            if event.finished:
                del active[event.seq_id]
                run.final_exit = event.exit
                on_done(run)
                if progress is not None:
                    num_tokens += len(run.token_ids)
                    rate = num_tokens / max(time.perf_counter() - started, 1e-9)
                    progress.advance(**{"tok/s": f"{rate:.0f}"})
            elif watch is not None and run.switched_at is None:
                if watch.observe(event.confidence.max_prob) is not None:
                    # greedy and between two steps: the next token comes from the deeper exit
                    engine.switch_exit(event.seq_id, job.escalate_to)
                    run.switched_at = len(run.token_ids)


def make_engine(loaded, max_batch: int) -> Engine:
    return Engine(loaded, max_batch=max_batch, max_waiting=max_batch)


def run_exits(
    engine: Engine,
    prompts: list[Prompt],
    max_tokens: int,
    on_prompt: Callable[[Prompt, dict[int, Run]], None],
    label: str = "eval exits",
) -> None:
    """Every prompt at every exit; `on_prompt(prompt, {exit: Run})` once all its exits finish
    (prompts are queued in order, so they finish roughly in order)."""
    exits = engine.config.exits
    by_id = {p.id: p for p in prompts}
    partial: dict[str, dict[int, Run]] = {}

    def done(run: Run) -> None:
        pid, exit_layer = run.key
        runs = partial.setdefault(pid, {})
        runs[exit_layer] = run
        if len(runs) == len(exits):
            on_prompt(by_id[pid], partial.pop(pid))

    jobs = [
        Job((p.id, e), ids, e, max_tokens)
        for p in prompts
        for ids in [prompt_ids(engine, p)]
        for e in exits
    ]
    with progress_bar(len(jobs), label, "run") as bar:
        run_jobs(engine, jobs, done, bar)


def run_escalation(
    engine: Engine,
    prompts: list[Prompt],
    max_tokens: int,
    settings: EscalationSettings,
    start_exits: tuple[int, ...] | None = None,
) -> dict[tuple[str, int], Run]:
    """Each prompt started at each shallower exit, switched to the deepest exit when the
    escalation window fires; {(prompt id, start exit): Run}."""
    deepest = engine.config.exits[-1]
    starts = start_exits or tuple(e for e in engine.config.exits if e != deepest)
    jobs = [
        Job((p.id, e), ids, e, max_tokens, settings, deepest)
        for p in prompts
        for ids in [prompt_ids(engine, p)]
        for e in starts
    ]
    runs: dict[tuple[str, int], Run] = {}
    with progress_bar(len(jobs), "escalation", "run") as bar:
        run_jobs(engine, jobs, lambda r: runs.__setitem__(r.key, r), bar)
    return runs


def save_runs(path: str | Path, runs: dict[tuple[str, int], Run], meta: dict) -> None:
    """Escalation runs as one JSON object, with the settings (`meta`) they were made with."""
    rows = [dict(vars(run), key=list(run.key)) for run in runs.values()]
    Path(path).write_text(json.dumps({"meta": meta, "runs": rows}), encoding="utf-8")


def load_runs(path: str | Path, meta: dict) -> dict[tuple[str, int], Run] | None:
    """Runs saved by `save_runs` with exactly these settings; None if absent or made otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("meta") != meta:
        return None
    try:
        runs = [Run(**{**row, "key": tuple(row["key"])}) for row in data["runs"]]
    except (KeyError, TypeError) as exc:
        raise InvalidRequest(f"{path}: not a file of escalation runs ({exc})") from exc
    return {run.key: run for run in runs}
