"""The table of `ruyiflow bench gpu`: each figure beside its baseline (measured in the same run),
the ratio, and the issue's target when it has one (met or missed), then notes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class Row:
    figure: str
    ours: float
    baseline: str
    baseline_value: float | None
    target: float | None = None  # the ratio the issue asks for (>=)

    @property
    def ratio(self) -> float | None:
        return None if not self.baseline_value else self.ours / self.baseline_value

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        return None if self.target is None or ratio is None else ratio >= self.target


@dataclass
class Report:
    device: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *args, **kwargs) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)

    def missed(self) -> list[Row]:
        return [r for r in self.rows if r.met is False]

    def print(self, as_json: bool = False) -> None:
        if as_json:
            rows = [asdict(r) | {"ratio": r.ratio, "met": r.met} for r in self.rows]
            print(json.dumps({"device": self.device, "rows": rows, "notes": self.notes}, indent=2))
            return
        print(f"bench gpu on {self.device}")
        print(f"{'figure':<44} {'ours':>10}  {'baseline':<40} {'value':>10} {'ratio':>8}  target")
        for r in self.rows:
            value = "-" if r.baseline_value is None else f"{r.baseline_value:.4g}"
            ratio = "-" if r.ratio is None else f"{r.ratio:.3g}x"
            target = (
                "" if r.target is None else f">= {r.target:g}x " + ("met" if r.met else "MISSED")
            )
            print(
                f"{r.figure:<44} {r.ours:>10.4g}  {r.baseline:<40} {value:>10} {ratio:>8}  {target}"
            )
        for text in self.notes:
            print(f"- {text}")
        missed = self.missed()
        print(f"targets: {sum(r.met is True for r in self.rows)} met, {len(missed)} missed")
