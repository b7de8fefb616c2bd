"""The learn / test halves of a calibration prompt set, fixed by each prompt's id.

Learn-then-Test needs the settings it tests chosen without the prompts it tests them on: the
trunk probes (`ruyiflow train-probe`), each exit's gate measure and the path of thresholds are
learnt on the `learn` half; the risk test (`ruyiflow calibrate --risk`) runs on the `test`
half only. A hash of the id (not the file order) decides, so both commands agree on any file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def is_learn(prompt_id: str) -> bool:
    """Whether a prompt belongs to the learn half (about half of all ids)."""
    return hashlib.sha256(prompt_id.encode()).digest()[0] % 2 == 0


def split_ids(ids: Iterable[str]) -> tuple[list[str], list[str]]:
    """(learn ids, test ids), in the order given."""
    ids = list(ids)
    return [i for i in ids if is_learn(i)], [i for i in ids if not is_learn(i)]
