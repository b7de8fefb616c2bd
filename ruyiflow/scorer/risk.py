"""Risk calibration of the confidence gate (CALM-style Learn-then-Test), pure numpy over `eval
exits` results and their first-token features.

Loss of a prompt under a gate setting (per exit: measure and threshold): its tokens' disagreement
with the deepest exit's, 1 - agreement of the exit that serves it, taken as the worst over every
exit a request could start at (so the bound holds whatever the router's scorer picks, and for
pinned exits): from start exit s the gate passes the first exit >= s whose measure clears its
threshold, else the request moves on (`cluster.calibration`: the next certified exit, else the
deepest, whose loss is 0). Risk = the mean loss over prompts.

Learn (on the learn half, `scorer.split`): per exit the measure that lets the most prompts pass
at an empirical risk <= eps there (ties: the larger rank correlation with agreement), and a path
of settings indexed by a level t: each exit's most permissive threshold at which the prompts it
passes disagree on at most a share t of their tokens on average (learn half). An exit whose
passing prompts agree opens early on the path; one that never agrees opens only at its end.
An exit stays shut at a level where too few learn prompts pass for its gate to pay: a request
that fails the gate at e wastes e's branch layer over its prompt (and e rows for the refed last
token), one that passes saves deepest - e layers on every token, so the gate pays when the pass
share exceeds waste / (waste + saving) (`break_even`, from the learn half's mean lengths).
Test (on the test half): fixed-sequence testing along the path with Hoeffding-Bentkus p-values
(`scorer.ltt`); the last certified setting is the answer. Passing nothing needs no test: its
risk is 0 by construction (the deepest exit serves every token).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ruyiflow.cluster.calibration import CalibratedExit, Calibration
from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.evaluation.features import GateData
from ruyiflow.scorer.ltt import TestResult, fixed_sequence_test
from ruyiflow.scorer.split import is_learn

LEVELS = np.linspace(0.0, 1.0, 401)  # the path's risk levels t, fixed before any data


def confidence(measure: str, values: np.ndarray) -> np.ndarray:
    """Values oriented so that higher is more confident (entropy is negated)."""
    return -values if measure == "entropy" else values


def passing(entry: CalibratedExit, values: np.ndarray) -> np.ndarray:
    """[N] bool: `cluster.calibration.passes` of each value (vectorised)."""
    if entry.threshold is None:
        return np.zeros(len(values), bool)
    finite = np.isfinite(values)
    if entry.measure == "entropy":
        return finite & (values <= entry.threshold)
    return finite & (values >= entry.threshold)


def served_loss(data: GateData, calibration: Calibration) -> np.ndarray:
    """[N] loss of each prompt under `calibration`: the worst over every start exit."""
    passed = {
        e: passing(calibration.entry(e), data.measures[calibration.entry(e).measure][:, j])
        for j, e in enumerate(data.shallow)
    }
    worst = np.zeros(len(data.ids))
    for start in data.shallow:
        loss, undecided = np.zeros(len(data.ids)), np.ones(len(data.ids), bool)
        e = calibration.start_exit(start, data.exits)
        while e != data.exits[-1]:  # the deepest exit serves the rest: loss 0
            now = undecided & passed[e]
            loss[now] = data.loss[now, data.shallow.index(e)]
            undecided &= ~passed[e]
            e = calibration.next_exit(e, data.exits)
        worst = np.maximum(worst, loss)
    return worst


@dataclass(frozen=True)
class ExitChoice:
    """What the learn half chose for one exit: measure, and thresholds by level."""

    exit: int
    measure: str
    num_pass: int  # learn prompts passable at risk <= eps at this exit alone
    rank_corr: float  # Spearman correlation of the measure's confidence with agreement
    sorted_conf: np.ndarray  # learn confidences, descending
    cum_mean: np.ndarray  # [k] mean loss of the top k+1 prompts (inf inside ties)

    def threshold_at(self, level: float) -> float | None:
        """The raw threshold passing the most learn prompts whose mean loss is <= level
        (None: none)."""
        ok = np.nonzero(self.cum_mean <= level + 1e-12)[0]
        if len(ok) == 0:
            return None
        k = int(ok[-1]) + 1
        value = float(self.sorted_conf[k - 1])
        return -value if self.measure == "entropy" else value

    def pass_share(self, threshold: float) -> float:
        """Share of the learn prompts that pass `threshold`."""
        value = -threshold if self.measure == "entropy" else threshold
        return float(np.mean(self.sorted_conf >= value))


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def choose_exit(data: GateData, j: int, eps: float) -> ExitChoice:
    """The learn half's choice at shallow exit index j (module docstring)."""
    best = None
    for name, values in data.measures.items():
        conf = confidence(name, values[:, j])
        order = np.argsort(-conf, kind="stable")
        cum_loss = np.cumsum(data.loss[order, j])
        # thresholds are learn values: ties would pass together, so only a tie's last counts
        last_of_tie = np.append(conf[order][1:] != conf[order][:-1], True)
        cum_mean = np.where(last_of_tie, cum_loss / np.arange(1, len(conf) + 1), np.inf)
        risk = np.maximum.accumulate(np.where(last_of_tie, cum_loss / len(conf), np.inf))
        num_pass = int(np.sum(risk <= eps))  # passable with risk <= eps at this exit alone
        corr = _rank_corr(conf, 1.0 - data.loss[:, j])
        choice = ExitChoice(data.shallow[j], name, num_pass, corr, conf[order], cum_mean)
        if best is None or (num_pass, corr) > (best.num_pass, best.rank_corr):
            best = choice
    return best


def break_even(data: GateData, exit_layer: int) -> float:
    """The pass share above which a gate at `exit_layer` saves compute (module docstring), in
    layer-rows from the mean prompt and generation lengths of `data`."""
    prompt, generated = float(data.prompt_len.mean()), float(data.deep_len.mean())
    waste = prompt + exit_layer
    saving = (data.exits[-1] - exit_layer) * (prompt + generated - 1)
    return waste / (waste + saving)


def setting(
    choices: Sequence[ExitChoice],
    level: float | None,
    base: dict,
    digests: Mapping[int, str],
    min_share: Mapping[int, float] | None = None,
) -> Calibration:
    """The calibration at `level` of the path (None: nothing passes anywhere); an exit whose
    learn pass share there is under `min_share[exit]` stays shut."""
    exits = []
    for c in choices:
        threshold = None if level is None else c.threshold_at(level)
        if threshold is not None and c.pass_share(threshold) < (min_share or {}).get(c.exit, 0.0):
            threshold = None
        probe = digests.get(c.exit) if c.measure == "probe" else None
        exits.append(CalibratedExit(c.exit, c.measure, threshold, probe))
    return Calibration(**base, exits=tuple(exits))


@dataclass(frozen=True)
class RiskCalibration:
    calibration: Calibration  # the certified setting (or nothing passing)
    choices: tuple[ExitChoice, ...]
    break_even: dict[int, float]  # exit -> pass share its gate needs to pay (learn half)
    test: TestResult  # along the deduplicated path (index 0 = its first setting)
    level: float | None  # the certified level; None: nothing passes
    test_loss: np.ndarray  # [n_test] losses under the certified setting
    num_learn: int


def calibrate_gate(
    data: GateData,
    eps: float,
    delta: float,
    base: dict,
    digests: Mapping[int, str] | None = None,
) -> RiskCalibration:
    """Learn on the learn half, test on the test half; `base` holds the Calibration's other
    fields (date, fingerprint, probes); eps, delta and n are filled in here."""
    learn_mask = [is_learn(i) for i in data.ids]
    learn, test = data.subset(learn_mask), data.subset([not k for k in learn_mask])
    if not learn.ids or not test.ids:
        raise InvalidRequest("calibration needs prompts in both the learn and the test half")
    base = dict(base, eps=eps, delta=delta, n=len(test.ids))
    choices = tuple(choose_exit(learn, j, eps) for j in range(len(data.shallow)))
    digests = digests or {}
    min_share = {e: break_even(learn, e) for e in data.shallow}
    path: list[tuple[float, Calibration]] = []
    for level in LEVELS:
        candidate = setting(choices, float(level), base, digests, min_share)
        if not path or candidate.exits != path[-1][1].exits:
            path.append((float(level), candidate))
    none = setting(choices, None, base, digests)
    if path and path[0][1].exits == none.exits:
        path = path[1:]  # passing nothing is safe by construction: nothing to test
    losses = [served_loss(test, cal) for _, cal in path]
    result = fixed_sequence_test([float(x.mean()) for x in losses], len(test.ids), eps, delta)
    if result.certified is None:
        zeros = np.zeros(len(test.ids))
        return RiskCalibration(none, choices, min_share, result, None, zeros, len(learn.ids))
    level, chosen = path[result.certified]
    loss = losses[result.certified]
    return RiskCalibration(chosen, choices, min_share, result, level, loss, len(learn.ids))
