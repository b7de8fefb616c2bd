"""The table `ruyiflow calibrate --risk` prints: per exit what was learnt and what was certified,
then the fixed-sequence test along the path."""

from __future__ import annotations

from ruyiflow.evaluation.features import GateData
from ruyiflow.scorer.risk import RiskCalibration, passing
from ruyiflow.scorer.split import is_learn


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def risk_table(result: RiskCalibration, data: GateData) -> str:
    cal = result.calibration
    test = data.subset([not is_learn(i) for i in data.ids])
    lines = [
        f"risk calibration: eps {cal.eps}, delta {cal.delta}; learn half {result.num_learn} "
        f"prompts, test half {cal.n}; model {cal.fingerprint}",
        "(rank corr and learn pass on the learn half - a probe's own training set)",
        "exit  measure   rank corr  learn pass  break-even  threshold  test pass  test risk",
    ]
    for j, (choice, entry) in enumerate(zip(result.choices, cal.exits, strict=True)):
        passed = passing(entry, test.measures[entry.measure][:, j])
        risk = float((passed * test.loss[:, j]).mean())
        lines.append(
            f"{entry.exit:4d}  {entry.measure:<8}  {choice.rank_corr:9.3f}  "
            f"{choice.num_pass:10d}  {result.break_even[entry.exit]:10.3f}  "
            f"{_fmt(entry.threshold):>9}  {passed.mean():9.3f}  {risk:9.4f}"
        )
    steps = result.test.steps
    if not steps:
        lines.append("nothing to test: no exit's gate pays for itself on the learn half")
    else:
        certified = [s for s in steps if result.test.certified is not None]
        certified = certified[: result.test.certified + 1] if certified else []
        last = steps[-1]
        lines.append(
            f"fixed-sequence test: {len(steps)} setting(s) tested, {len(certified)} certified; "
            + (
                f"stopped at risk {last.risk:.4f}, p {last.p_value:.3g} > delta"
                if last.p_value > cal.delta
                else "every setting of the path certified"
            )
        )
    if any(e.is_certified for e in cal.exits):
        lines.append(
            f"certified: level {result.level:.4f}, test-half risk {result.test_loss.mean():.4f} "
            f"<= eps {cal.eps} with probability >= {1 - cal.delta:.2f}"
        )
    else:
        lines.append(
            "no exit certified: the deepest exit serves every token (the router starts there)"
        )
    return "\n".join(lines)
