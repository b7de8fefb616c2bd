"""Learn-then-Test: the Hoeffding-Bentkus p-value, fixed-sequence testing picking the known
threshold on synthetic confidence/agreement data, and a seeded simulation in which the
certified threshold's true risk exceeds eps in at most a delta share of draws (where certifying
by the empirical risk alone does so about half the time)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.scorer.ltt import binomial_cdf, fixed_sequence_test, hoeffding_bentkus_p

GRID = np.round(np.linspace(1.0, 0.0, 201), 6)  # thresholds, safest (pass nothing) first


def true_risk(threshold: float) -> float:
    """Confidence c ~ U(0, 1); a token disagrees iff c < 0.5; pass iff c >= threshold."""
    return max(0.0, 0.5 - threshold)


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    conf = rng.random(n)
    return conf, (conf < 0.5).astype(float)


def empirical_risks(conf: np.ndarray, loss: np.ndarray) -> list[float]:
    """Risk of passing conf >= t for every t of GRID (vectorised: [T, n] masks)."""
    return list(((conf[None, :] >= GRID[:, None]) * loss[None, :]).mean(axis=1))


def certified_threshold(conf, loss, eps: float, delta: float) -> float:
    result = fixed_sequence_test(empirical_risks(conf, loss), len(conf), eps, delta)
    return math.inf if result.certified is None else float(GRID[result.certified])


def test_binomial_cdf_matches_the_sum() -> None:
    n, p = 30, 0.13
    for k in (-1, 0, 3, 10, 29, 30):
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(max(k + 1, 0)))
        assert binomial_cdf(k, n, p) == pytest.approx(min(exact, 1.0), rel=1e-9, abs=1e-15)


def test_p_value_is_monotone_and_bounded() -> None:
    ps = [hoeffding_bentkus_p(r, 200, 0.1) for r in np.linspace(0, 0.2, 41)]
    assert all(a <= b + 1e-15 for a, b in zip(ps, ps[1:], strict=False))
    assert ps[0] == pytest.approx(0.9**200)  # zero losses: (1 - eps)^n
    assert hoeffding_bentkus_p(0.1, 200, 0.1) == 1.0  # at eps nothing is rejected
    assert hoeffding_bentkus_p(0.05, 1000, 0.1) < 1e-6
    with pytest.raises(InvalidRequest):
        hoeffding_bentkus_p(0.0, 0, 0.1)


def test_fixed_sequence_stops_at_the_first_failure() -> None:
    result = fixed_sequence_test([0.0, 0.01, 0.5, 0.0], 500, 0.1, 0.1)
    assert result.certified == 1  # the 0.0 after the failure is never tested
    assert [s.index for s in result.steps] == [0, 1, 2] and result.steps[-1].p_value > 0.1
    assert fixed_sequence_test([0.5], 500, 0.1, 0.1).certified is None


def test_picks_the_known_threshold() -> None:
    """True risk(t) = 0.5 - t: the boundary for eps 0.1 is t = 0.4; with many samples the
    certified threshold is just above it, never below."""
    conf, loss = draw(np.random.default_rng(0), 20_000)
    threshold = certified_threshold(conf, loss, eps=0.1, delta=0.1)
    assert 0.4 <= threshold <= 0.42


def test_never_certifies_too_risky_a_threshold_more_than_delta_of_the_time() -> None:
    rng = np.random.default_rng(1)
    eps, delta, n, draws = 0.1, 0.1, 200, 400
    ltt = naive = 0
    for _ in range(draws):
        conf, loss = draw(rng, n)
        ltt += true_risk(certified_threshold(conf, loss, eps, delta)) > eps
        risks = empirical_risks(conf, loss)
        ok = [i for i, r in enumerate(risks) if all(x <= eps for x in risks[: i + 1])]
        naive += true_risk(float(GRID[ok[-1]])) > eps  # certify where the sample looks safe
    assert ltt / draws <= delta
    assert naive / draws > 3 * delta  # the simulation can tell a guarantee from none
