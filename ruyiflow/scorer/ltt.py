"""Learn-then-Test (Angelopoulos, Bates et al., 2021), as CALM (Schuster et al., 2022) uses it:
certify settings whose risk (mean loss in [0, 1]) is at most `eps` with probability >= 1 - delta.

Each setting lambda of a grid is a null hypothesis H: R(lambda) > eps, tested with the
Hoeffding-Bentkus p-value of its empirical risk over n i.i.d. samples. Fixed-sequence testing
walks the grid in an order fixed before seeing the data - safest first - rejecting while p <=
delta and stopping at the first p > delta: the family-wise error (certifying any setting whose
true risk exceeds eps) is at most delta, and no monotonicity of the risk is needed for that.
Pure Python; no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ruyiflow.engine.errors import InvalidRequest


def _kl_bernoulli(a: float, b: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(b)), with 0 log 0 = 0."""
    out = 0.0
    if a > 0.0:
        out += a * math.log(a / b)
    if a < 1.0:
        out += (1.0 - a) * math.log((1.0 - a) / (1.0 - b))
    return out


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (n up to a few thousand)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lg_n = math.lgamma(n + 1)
    terms = [
        lg_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def hoeffding_bentkus_p(risk_hat: float, n: int, eps: float) -> float:
    """Valid p-value of H: R > eps from the empirical risk of n losses in [0, 1] (Bates et al.,
    RCPS, Prop. 3.5): min of Hoeffding's exp(-n KL(min(R^, eps) || eps)) and Bentkus'
    e * P(Binomial(n, eps) <= ceil(n R^))."""
    if n < 1:
        raise InvalidRequest("the p-value needs at least one sample")
    if not 0.0 < eps < 1.0:
        raise InvalidRequest(f"eps must be in (0, 1), got {eps}")
    risk_hat = min(max(risk_hat, 0.0), 1.0)
    hoeffding = math.exp(-n * _kl_bernoulli(min(risk_hat, eps), eps))
    # ceil with a tolerance: float means of exact sums must not round a count up
    count = math.ceil(n * risk_hat - 1e-9)
    bentkus = math.e * binomial_cdf(count, n, eps)
    return min(1.0, hoeffding, bentkus)


@dataclass(frozen=True)
class Step:
    """One tested setting: its grid index, empirical risk and p-value."""

    index: int
    risk: float
    p_value: float


@dataclass(frozen=True)
class TestResult:
    certified: int | None  # index of the most permissive certified setting; None: none
    steps: tuple[Step, ...]  # every setting tested, in order (the last one failed, if any did)


def fixed_sequence_test(risks: Sequence[float], n: int, eps: float, delta: float) -> TestResult:
    """Test the settings in the order given (safest first; `risks[j]` is setting j's empirical
    risk over n samples); certified = those before the first p-value above delta."""
    if not 0.0 < delta < 1.0:
        raise InvalidRequest(f"delta must be in (0, 1), got {delta}")
    steps, certified = [], None
    for index, risk in enumerate(risks):
        p = hoeffding_bentkus_p(risk, n, eps)
        steps.append(Step(index, float(risk), p))
        if p > delta:
            break
        certified = index
    return TestResult(certified, tuple(steps))
