"""Overload and hung nodes, against the real router with fake nodes: a node stream that goes
silent is cancelled after `router.stream_idle_timeout_s` and resumed elsewhere; full or busy
nodes send requests deeper (and the trace says so); when every node that could serve is full
the answer is RESOURCE_EXHAUSTED / 429 with a retry hint; one slow health answer is not an
outage."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import pytest

from ruyiflow.router.trace_view import format_trace
from tests.router.cluster import EASY_PROMPT

EXPECTED = [100 + k for k in range(10)]
CAPACITY = 8 + 4 * 8  # a fake node: max_batch 8 and the default queue


def wait_polled(c) -> None:
    time.sleep(0.3)  # a few polls (every 0.05 s) bring the nodes' reported load


def test_a_silent_node_stream_is_resumed_elsewhere(fake_cluster, monkeypatch):
    c = fake_cluster(stream_idle_timeout_s=0.5)
    hung = {"edge-0", "edge-1"}
    # A hung process answers no health check either (an in-process fake would): say so.
    monkeypatch.setattr(c.daemon.registry, "is_answering", lambda name: name not in hung)
    for name in hung:
        c.nodes[name].behaviour.hang_after = 3
    started = time.monotonic()
    with c.client() as client:
        done = client.complete(EASY_PROMPT, max_tokens=10)  # offsets checked: no gap, no repeat
    assert done.token_ids == EXPECTED
    assert done.trace.num_retries >= 1
    assert time.monotonic() - started < 5  # not the hang's length: it never ends by itself
    assert any(c.nodes[n].num_cancelled for n in hung)  # the router cancelled the silent one


def test_a_busy_node_that_answers_health_checks_is_waited_for(fake_cluster):
    c = fake_cluster(stream_idle_timeout_s=0.5)
    for name in ("edge-0", "edge-1"):  # silent for 3 idle periods, but alive (queued, say)
        c.nodes[name].behaviour.hang_after = 3
        c.nodes[name].behaviour.hang_s = 1.5
    with c.client() as client:
        done = client.complete(EASY_PROMPT, max_tokens=10)
    assert done.token_ids == EXPECTED and done.trace.num_retries == 0


def test_full_or_busy_nodes_send_requests_deeper(fake_cluster):
    c = fake_cluster()
    with c.client() as client:
        assert client.complete(EASY_PROMPT, max_tokens=2).sources[0].exit == 12
        for running in (CAPACITY, 2 * 8):  # full; busy (a whole batch waiting)
            for name in ("edge-0", "edge-1"):
                c.nodes[name].num_running = running
            wait_polled(c)
            done = client.complete(EASY_PROMPT, max_tokens=2)
            assert [s.exit for s in done.sources] == [20, 20]
            assert done.sources[0].node == "cloud-0"
            assert done.trace.deeper_for_load_from == 12
            assert "deeper" in format_trace(done.trace)


def test_a_pinned_exit_is_not_moved_for_load(fake_cluster):
    c = fake_cluster()
    for name in ("edge-0", "edge-1"):
        c.nodes[name].num_running = CAPACITY
    wait_polled(c)
    with c.client() as client, pytest.raises(grpc.RpcError) as err:
        client.complete(EASY_PROMPT, max_tokens=2, exit=12)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_everything_full_is_resource_exhausted_with_a_hint(fake_cluster):
    c = fake_cluster(http=True)
    for node in c.nodes.values():
        node.num_running = CAPACITY
    wait_polled(c)
    with c.client() as client, pytest.raises(grpc.RpcError) as err:
        client.complete(EASY_PROMPT, max_tokens=2)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after-ms", "1000") in err.value.trailing_metadata()
    assert not any(n.generate_requests for n in c.nodes.values())  # refused before any node
    body = json.dumps(
        {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{c.daemon.http_port}/v1/chat/completions",
        data=body,
        headers={"content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(request, timeout=10)
    assert http_err.value.code == 429 and http_err.value.headers["retry-after"] == "1"


def test_one_slow_health_answer_is_not_an_outage(fake_cluster):
    c = fake_cluster(health_failures=3)
    registry = c.daemon.registry
    registry.close()  # no background polls: this test feeds the answers
    node = registry._nodes["edge-0"]
    for _ in range(2):  # no answer in time, twice: still up
        registry._record(node, time.monotonic(), None, None)
        assert registry.is_available("edge-0")
    registry._record(node, time.monotonic(), None, None)  # the third in a row: down
    assert not registry.is_available("edge-0")
    registry._record(node, time.monotonic(), True, None)
    assert registry.is_available("edge-0")
    registry._record(node, time.monotonic(), False, None)  # an explicit NOT_SERVING: at once
    assert not registry.is_available("edge-0")
