"""Block accounting never leaks: every Engine built during a test gives all its KV pages back.

`pool_returns_to_full` (autouse in tests/engine and tests/moe) records each Engine a test builds;
after the test it aborts the sequences still in it (a test may stop mid-generation) and asserts
that the pool's free pages are all of them again: pages of finished, aborted, exported, switched,
preempted or refused sequences, and of caches made for a measurement, all came back.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def pool_returns_to_full(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from ruyiflow.engine.engine import Engine

    engines: list[Engine] = []
    original = Engine.__init__

    def recording_init(self: Engine, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(Engine, "__init__", recording_init)
    yield
    for engine in engines:
        for seq_id in list(engine.sequences):
            engine.abort(seq_id)
        allocator = engine.scheduler.allocator
        if allocator is not None:
            leaked = allocator.num_blocks - allocator.num_free
            assert leaked == 0, f"{leaked} KV pages not back in the pool after the test"
