"""Protobuf <-> engine objects for the node servicer: a request's prompt ids (checked before
anything is tokenized), sampling parameters, escalation settings, the confidence gate's checks,
and the token and handoff chunks of a stream (the servicer translates through these and
delegates)."""

from __future__ import annotations

from ruyiflow.cluster.escalation import EscalationSettings
from ruyiflow.cluster.limits import (
    MAX_NODE_PROMPT_BYTES,
    MAX_NODE_REQUEST_BYTES,
    check_request_size,
    check_roles,
    prompt_bytes,
)
from ruyiflow.cluster.wire import ENGINE_FINISH, FINISH_REASON, HANDOFF_REASON
from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.engine.events import TokenEvent
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.engine.tokenizer import Tokenizer
from ruyiflow.node.gate import GateCheck
from ruyiflow.node.worker import Parked
from ruyiflow.proto import ruyiflow_pb2 as pb


def finish_reason(engine_reason: str | None) -> int:
    """The wire value of an engine finish reason (unspecified while the stream goes on)."""
    if engine_reason is None:
        return pb.FINISH_REASON_UNSPECIFIED
    return FINISH_REASON.value(ENGINE_FINISH[engine_reason])


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    opt = {
        f: getattr(s, f)
        for f in (
            "max_tokens",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repetition_penalty",
            "no_repeat_ngram_size",
            "seed",
        )
        if s.HasField(f)
    }
    if "no_repeat_ngram_size" in opt:
        opt["no_repeat_ngram_size"] = int(opt["no_repeat_ngram_size"])
    return SamplingParams(**opt, stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids))


def gate_check_proto(check: GateCheck) -> pb.GateCheck:
    """The wire form of one look of the confidence gate (`node.gate`)."""
    c = check.confidence
    out = pb.GateCheck(
        exit=check.exit,
        measure=check.measure,
        passed=check.passed,
        to_exit=check.to_exit or 0,
        confidence=pb.TokenConfidence(max_prob=c.max_prob, margin=c.margin, entropy=c.entropy),
    )
    if check.value is not None:
        out.value = check.value
    if check.threshold is not None:
        out.threshold = check.threshold
    return out


def escalation_from_proto(e: pb.EscalationSettings) -> EscalationSettings:
    """Per-request settings; a field the router left unset takes the shared default."""
    fields = ("enabled", "window", "threshold", "force_after_tokens", "force_to_exit")
    return EscalationSettings(**{f: getattr(e, f) for f in fields if e.HasField(f)})


def token_chunk(request_id: str, ev: TokenEvent, offset: int, source: pb.Source) -> pb.Chunk:
    c = ev.confidence
    return pb.Chunk(
        request_id=request_id,
        text=ev.text,
        token_ids=[ev.token_id],
        confidence=[pb.TokenConfidence(max_prob=c.max_prob, margin=c.margin, entropy=c.entropy)],
        source=source,
        token_offset=offset,
        finish_reason=finish_reason(ev.finish_reason),
    )


def handoff_chunk(
    request_id: str, p: Parked, offset: int, source: pb.Source, fingerprint: str
) -> pb.Chunk:
    """The stream's last chunk when the request leaves this node: the parked state's handle."""
    return pb.Chunk(
        request_id=request_id,
        source=source,
        token_offset=offset,
        finish_reason=pb.FINISH_REASON_HANDOFF,
        handoff=pb.HandoffNeeded(
            from_exit=p.from_exit,
            suggested_to_exit=p.to_exit,
            reason=HANDOFF_REASON.value(p.reason),
            state_handle=p.handle,
            state_bytes=p.state_bytes,
            num_tokens=p.num_tokens,
            model_fingerprint=fingerprint,
        ),
    )


def request_prompt_ids(
    request: pb.GenerateRequest, tok: Tokenizer | None, max_context: int
) -> list[int]:
    """The prompt's token ids. Sizes and roles are checked before anything is tokenized:
    encoding holds the GIL, and every stream of the node waits while it runs."""
    check_request_size(request, MAX_NODE_REQUEST_BYTES)
    kind = request.WhichOneof("prompt")
    if kind == "token_ids":
        ids = list(request.token_ids.ids)
    elif kind in ("text", "conversation"):
        check_roles(request)
        num_bytes = prompt_bytes(request) + len(request.prefix_text.encode())
        if num_bytes > MAX_NODE_PROMPT_BYTES:
            raise InvalidRequest(
                f"prompt too long: {num_bytes} bytes of text, limit {MAX_NODE_PROMPT_BYTES}"
            )
        if kind == "text":
            ids = tok.encode(request.text)
        else:
            messages = [
                {"role": m.role, "content": m.content} for m in request.conversation.messages
            ]
            thinking = request.enable_thinking if request.HasField("enable_thinking") else None
            ids = tok.encode(tok.apply_chat_template(messages, enable_thinking=thinking))
    else:
        raise InvalidRequest("request has no prompt (conversation, text or token_ids)")
    if len(ids) > max_context:
        raise InvalidRequest(
            f"prompt of {len(ids)} tokens exceeds the context length {max_context}"
        )
    return ids
