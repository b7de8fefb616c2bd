"""The gate's calibration: its schema and cascade semantics (`cluster.calibration`), the loss
of a setting (worst over start exits), and `calibrate_gate` on synthetic data with a known
answer: a useful exit gets the threshold where it starts to disagree, a useless one none."""

from __future__ import annotations

import numpy as np
import pytest

from ruyiflow.cluster.calibration import CalibratedExit, Calibration, passes
from ruyiflow.cluster.errors import TopologyError
from ruyiflow.evaluation.features import GateData
from ruyiflow.scorer.risk import calibrate_gate, passing, served_loss
from ruyiflow.scorer.split import is_learn

EXITS = (12, 16, 20, 29)
BASE = {"date": "2026-01-01", "fingerprint": "fp"}


def calibration(**thresholds: float | None) -> Calibration:
    entries = tuple(CalibratedExit(e, "max_prob", thresholds.get(f"e{e}")) for e in EXITS[:-1])
    return Calibration(0.1, 0.1, 100, exits=entries, **BASE)


def test_cascade_semantics() -> None:
    cal = calibration(e16=0.5)
    assert cal.next_exit(12, EXITS) == 16 and cal.next_exit(16, EXITS) == 29
    assert cal.next_exit(29, EXITS) is None
    assert cal.start_exit(12, EXITS) == 16 and cal.start_exit(20, EXITS) == 29
    assert cal.start_exit(16, EXITS) == 16 and cal.start_exit(29, EXITS) == 29
    assert passes("max_prob", 0.5, 0.5) and not passes("max_prob", 0.4, 0.5)
    assert passes("entropy", 1.0, 1.5) and not passes("entropy", 2.0, 1.5)
    assert not passes("margin", 0.9, None)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"eps": 0.0}, "eps"),
        ({"delta": 1.0}, "delta"),
        ({"fingerprint": ""}, "fingerprint"),
        ({"exits": (CalibratedExit(16), CalibratedExit(12))}, "increasing"),
    ],
)
def test_schema_refuses(fields: dict, message: str) -> None:
    values = {"eps": 0.1, "delta": 0.1, "n": 10, **BASE, **fields}
    with pytest.raises(TopologyError, match=message):
        Calibration(**values)
    with pytest.raises(TopologyError, match="probe"):
        CalibratedExit(12, "probe", 0.5)


def data(conf: np.ndarray, loss: np.ndarray) -> GateData:
    """N prompts, shallow exits 12/16/20 with max_prob `conf` and disagreement `loss`."""
    ids = tuple(f"p{i}" for i in range(len(conf)))
    measures = {"max_prob": conf, "margin": conf / 2, "entropy": 5.0 - 5.0 * conf}
    lengths = np.full(len(conf), 40.0), np.full(len(conf), 48.0)  # prompt, deepest's output
    return GateData(ids, EXITS, loss, measures, *lengths)


def test_served_loss_is_the_worst_start() -> None:
    conf = np.array([[0.9, 0.9, 0.1], [0.1, 0.1, 0.1]])
    loss = np.array([[0.2, 0.6, 1.0], [1.0, 1.0, 1.0]])
    cal = calibration(e12=0.5, e16=0.5)
    # prompt 0: from 12 -> 12 passes (0.2); from 16 -> 0.6; from 20 -> uncertified -> 29 (0)
    assert list(served_loss(data(conf, loss), cal)) == [0.6, 0.0]


def test_passing_is_passes() -> None:
    values = np.array([0.1, 0.5, 0.9, np.nan, np.inf])
    for measure in ("max_prob", "entropy"):
        for threshold in (None, 0.5):
            entry = CalibratedExit(12, measure, threshold)
            expected = [passes(measure, float(v), threshold) for v in values]
            assert list(passing(entry, values)) == expected


def true_risk(cal: Calibration) -> float:
    """Exact risk of the synthetic family below: max_prob ~ U(0, 1) independently per exit;
    exit 12 disagrees iff its max_prob < 0.7, exit 16 always, exit 20 iff < 0.9. From 12 a
    request is served by 12 if it passes, else by 20 if that passes, else by 29 (loss 0)."""
    a, b = cal.entry(12).threshold, cal.entry(20).threshold
    assert cal.entry(16).threshold is None and a <= 0.7 and b <= 0.9
    from_20 = 0.9 - b  # passes at 20 and disagrees there
    return (0.7 - a) + (0.3 + a) * from_20  # worst start: 12 (passing 12 and agreeing: 20's)


def test_learns_the_known_thresholds_and_refuses_a_useless_exit() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    conf = rng.random((n, 3))
    loss = np.stack(
        [(conf[:, 0] < 0.7).astype(float), np.ones(n), (conf[:, 2] < 0.9).astype(float)], axis=1
    )
    result = calibrate_gate(data(conf, loss), eps=0.05, delta=0.1, base=BASE)
    cal = result.calibration
    assert cal.n == sum(not is_learn(f"p{i}") for i in range(n)) == len(result.test_loss)
    assert [e.measure for e in cal.exits][::2] == ["max_prob", "max_prob"]  # max_prob ranks best
    assert cal.entry(16).threshold is None  # never agrees: never passes
    assert 0.62 <= cal.entry(12).threshold <= 0.7 and 0.85 <= cal.entry(20).threshold <= 0.9
    assert result.test_loss.mean() <= 0.05
    assert 0.025 <= true_risk(cal) <= 0.05  # the bound holds, and most of it is used


def test_nothing_certified_serves_deep() -> None:
    rng = np.random.default_rng(1)
    conf = rng.random((400, 3))
    result = calibrate_gate(data(conf, np.ones((400, 3))), eps=0.02, delta=0.1, base=BASE)
    assert result.level is None
    assert not any(e.is_certified for e in result.calibration.exits)
    assert result.calibration.start_exit(12, EXITS) == 29


def test_an_exit_too_rarely_passed_to_pay_stays_shut() -> None:
    """Exit 20 agrees on 2 % of prompts only: certifiable, but its gate would cost more
    (a branch layer over every prompt that fails) than the passes save."""
    rng = np.random.default_rng(2)
    n = 2000
    conf = rng.random((n, 3))
    loss = np.ones((n, 3))
    loss[:, 2] = (conf[:, 2] < 0.98).astype(float)
    result = calibrate_gate(data(conf, loss), eps=0.05, delta=0.1, base=BASE)
    assert result.break_even[20] > 0.02
    assert not any(e.is_certified for e in result.calibration.exits)
