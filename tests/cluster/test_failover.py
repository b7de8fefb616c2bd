"""A node killed with SIGKILL mid-stream: the router resumes the request elsewhere from the
tokens already relayed; the client sees every token exactly once."""

from __future__ import annotations

import signal

import pytest

from router.client import RouterClient
from tests.cluster.conftest import start_cluster


@pytest.fixture()
def fresh_cluster(tmp_path):
    c = start_cluster(tmp_path)
    yield c
    c.stop(grace=5)


def test_sigkill_mid_stream_loses_and_repeats_nothing(fresh_cluster):
    victim = fresh_cluster.children["cloud-0"]
    with RouterClient(fresh_cluster.addr["router"]) as client:
        chunks, killed = [], False
        for chunk in client.generate("Write a long story about a lighthouse keeper.", max_tokens=40,
                                     exit=29):
            chunks.append(chunk)
            if not killed and sum(len(c.token_ids) for c in chunks) >= 6:
                victim.send_signal(signal.SIGKILL)
                killed = True
    assert killed
    offsets = [c.token_offset for c in chunks if c.token_ids]
    counts = [len(c.token_ids) for c in chunks if c.token_ids]
    expected = 0
    for off, n in zip(offsets, counts, strict=True):
        assert off == expected  # no gap, no repeat
        expected += n
    assert expected == 40
    trace = chunks[-1].trace
    assert trace.num_retries >= 1
    assert [s.node for s in trace.spans][0] == "cloud-0" and trace.spans[-1].node == "edge-0"
