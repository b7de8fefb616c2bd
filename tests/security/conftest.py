"""Fixtures: the real router in front of fake nodes (tests/router's cluster)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.router.cluster import Cluster


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.close()
