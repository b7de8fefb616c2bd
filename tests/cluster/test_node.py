"""The Node service of real edge/cloud daemons on loopback: generation, escalation, state moves,
and bad input answered with the right status while the daemon keeps serving."""

from __future__ import annotations

import uuid

import grpc
import pytest

from ruyiflow.engine.engine import Engine
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.node.framing import header_for, state_parts
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from tests.engine.test_errors import _rewrite

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690]


@pytest.fixture(scope="module")
def stubs(nodes):
    channels = {k: grpc.insecure_channel(nodes.addr[k]) for k in ("edge", "cloud")}
    yield {k: pb_grpc.NodeStub(c) for k, c in channels.items()}
    for c in channels.values():
        c.close()


def request(exit_layer: int, max_tokens: int = 16, **escalation) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=uuid.uuid4().hex,
        token_ids=pb.TokenIds(ids=PROMPT),
        sampling=pb.SamplingParams(max_tokens=max_tokens),
        overrides=pb.Overrides(exit=exit_layer),
        escalation=pb.EscalationSettings(**escalation),
    )


def reference(smollm2, prefix: list[int], exit_layer: int, n: int) -> list[int]:
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    return [e.token_id for e in Engine(smollm2).generate(prefix, params, exit_layer)]


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_generate_matches_engine(stubs, smollm2):
    chunks = list(stubs["edge"].Generate(request(12, 10)))
    assert tokens(chunks) == reference(smollm2, PROMPT, 12, 10)
    assert [c.token_offset for c in chunks] == list(range(10))
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert all(c.source.node == "edge-0" and c.source.exit == 12 for c in chunks)


def test_local_branch_switch_on_the_same_node(stubs, smollm2):
    chunks = list(stubs["edge"].Generate(request(12, 12, force_after_tokens=4)))
    exits = [c.source.exit for c in chunks]
    assert exits == [12] * 4 + [16] * 8  # switched to the node's deeper exit, no handoff
    prefix = PROMPT + tokens(chunks)[:4]
    assert tokens(chunks)[4:] == reference(smollm2, prefix, 16, 8)


def _handoff(stubs, at: int = 5) -> tuple[list[int], pb.HandoffNeeded]:
    chunks = list(stubs["edge"].Generate(request(16, 20, force_after_tokens=at)))
    assert chunks[-1].finish_reason == pb.FINISH_REASON_HANDOFF
    return tokens(chunks), chunks[-1].handoff


def test_escalation_out_of_the_node_then_fetch_and_resume(stubs, smollm2):
    got, handoff = _handoff(stubs)
    assert (
        len(got) == 5 and handoff.suggested_to_exit == 20 and handoff.num_tokens == len(PROMPT) + 5
    )
    parts = list(
        stubs["edge"].FetchState(
            pb.StateRef(state_handle=handoff.state_handle, mode=pb.HANDOFF_MODE_HIDDEN, to_exit=24)
        )
    )
    chunks = list(stubs["cloud"].Resume(iter(parts)))
    assert chunks[0].token_offset == 5 and chunks[0].source.exit == 24
    assert tokens(chunks) == reference(smollm2, PROMPT + got, 24, 15)


@pytest.mark.parametrize("mode", [pb.HANDOFF_MODE_HIDDEN, pb.HANDOFF_MODE_TOKENS])
def test_push_then_resume_by_transfer_id(stubs, nodes, smollm2, mode):
    got, handoff = _handoff(stubs)
    transfer = uuid.uuid4().hex
    reply = stubs["edge"].PushState(
        pb.PushStateRequest(
            state=pb.StateRef(state_handle=handoff.state_handle, mode=mode, to_exit=29),
            destination=nodes.addr["cloud"],
            transfer_id=transfer,
        )
    )
    assert reply.num_bytes > 0
    header = pb.HandoffHeader(transfer_id=transfer, to_exit=29, mode=mode)
    parts = [pb.ResumeRequest(header=header), pb.ResumeRequest(end=pb.StateEnd())]
    chunks = list(stubs["cloud"].Resume(iter(parts)))
    assert tokens(chunks) == reference(smollm2, PROMPT + got, 29, 15)


@pytest.fixture(scope="module")
def state(stubs):
    _, handoff = _handoff(stubs)
    parts = list(
        stubs["edge"].FetchState(
            pb.StateRef(state_handle=handoff.state_handle, mode=pb.HANDOFF_MODE_HIDDEN, to_exit=20)
        )
    )
    return b"".join(p.data.data for p in parts if p.WhichOneof("part") == "data")


def _resume(stub, data: bytes, parts=None):
    parts = parts or list(state_parts(header_for(data, "bad", 20), data, chunk_bytes=65536))
    return list(stub.Resume(iter(parts)))


@pytest.mark.parametrize(
    ("edit", "code", "match"),
    [
        (
            lambda s: _rewrite(s, lambda m: m.update(fingerprint="f" * 24)),
            "FAILED_PRECONDITION",
            "only tokens mode",
        ),
        (
            lambda s: _rewrite(
                s, tensor_edit=lambda t: t.update({"trunk.0.k": t["trunk.0.k"].half()})
            ),
            "INVALID_ARGUMENT",
            "dtype",
        ),
        (
            lambda s: _rewrite(s, tensor_edit=lambda t: t.update({"boundary": t["boundary"][:-1]})),
            "INVALID_ARGUMENT",
            "shape",
        ),
        (lambda s: s[:-100], "INVALID_ARGUMENT", "not a valid payload"),
    ],
)
def test_bad_states_refused(stubs, state, edit, code, match):
    with pytest.raises(grpc.RpcError) as err:
        _resume(stubs["cloud"], edit(state))
    assert err.value.code().name == code and match in err.value.details()


def test_malformed_chunk_streams_refused(stubs, state):
    header = header_for(state, "bad", 20)
    cases = {
        "must start with a header": [pb.ResumeRequest(end=pb.StateEnd())],
        "truncated": [
            pb.ResumeRequest(header=header),
            pb.ResumeRequest(data=pb.StateBytes(offset=0, data=state[:1000])),
            pb.ResumeRequest(end=pb.StateEnd(total_bytes=1000)),
        ],
        "offset": [
            pb.ResumeRequest(header=header),
            pb.ResumeRequest(data=pb.StateBytes(offset=5, data=state[:10])),
        ],
        "ended without": [pb.ResumeRequest(header=header)],
    }
    oversize = pb.HandoffHeader()
    oversize.CopyFrom(header)
    oversize.total_bytes = 1 << 40
    cases["exceeds the limit"] = [pb.ResumeRequest(header=oversize)]
    for match, parts in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            _resume(stubs["cloud"], state, parts)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, match
        assert match in err.value.details()


def test_bad_requests_keep_the_daemon_serving(stubs):
    edge = stubs["edge"]
    cases = [
        (request(20), "not served by this node"),
        (request(13), "not served"),
        (
            pb.GenerateRequest(
                request_id="x", token_ids=pb.TokenIds(ids=[]), overrides=pb.Overrides(exit=12)
            ),
            "empty",
        ),
        (
            pb.GenerateRequest(
                request_id="x",
                text="hi",
                sampling=pb.SamplingParams(top_p=2.0),
                overrides=pb.Overrides(exit=12),
            ),
            "top_p",
        ),
        (
            pb.GenerateRequest(
                request_id="x",
                token_ids=pb.TokenIds(ids=list(range(1, 3000))),
                overrides=pb.Overrides(exit=12),
            ),
            "context length",
        ),
        (pb.GenerateRequest(request_id="x"), "no prompt"),
    ]
    for req, match in cases:
        with pytest.raises(grpc.RpcError) as err:
            list(edge.Generate(req))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, match
        assert match in err.value.details()
    assert len(tokens(edge.Generate(request(12, 3)))) == 3
