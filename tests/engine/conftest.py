"""Engine tests: every pool returns to full after each test (`tests.engine.pool_check`)."""

from __future__ import annotations

import pytest

from tests.engine import pool_check


@pytest.fixture(autouse=True)
def pool_returns_to_full(monkeypatch: pytest.MonkeyPatch):
    yield from pool_check.pool_returns_to_full(monkeypatch)
