"""Client requests at the router's edge: validation, proto → policy conversions, the scorer's
input, and the request a node receives.

Everything a client can get wrong is checked here, before any node is called, and raised as
`InvalidRequest` (INVALID_ARGUMENT) with a message naming the field. Overrides naming an exit,
tier or node the topology lacks are refused by `policy.plan_route`, which knows the topology.
"""

from __future__ import annotations

import math
from typing import Any

from ruyiflow.cluster.errors import InvalidRequest
from ruyiflow.cluster.limits import MAX_CLIENT_REQUEST_BYTES, check_request_size, check_roles
from ruyiflow.cluster.topology import Topology
from ruyiflow.cluster.wire import HANDOFF_MODE, TIER
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.policy import Overrides
from ruyiflow.router.scorer import WEIGHTS, Scorer, length_feature

MAX_PROMPT_BYTES = 32 << 10  # UTF-8 bytes of text over all messages
MAX_PROMPT_TOKEN_IDS = 4096
MAX_TOKENS = 1 << 16
MAX_TEMPERATURE = 5.0
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_CHARS = 128


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequest(message)


def validate_request(request: pb.GenerateRequest) -> None:
    """Refuse malformed client requests (prompt, size limits, sampling and escalation ranges).
    The whole request's encoded size is checked first, so no field is looked at in a request
    too large to serve."""
    check_request_size(request, MAX_CLIENT_REQUEST_BYTES)
    _require(len(request.request_id) <= MAX_REQUEST_ID_CHARS, "request_id is too long")
    _require(not request.prefix_token_ids, "prefix_token_ids is for routers, not clients")
    _require(not request.prefix_text, "prefix_text is for routers, not clients")
    form = request.WhichOneof("prompt")
    _require(form is not None, "no prompt: set one of conversation, text, token_ids")
    if form == "token_ids":
        num_ids = len(request.token_ids.ids)
        _require(num_ids > 0, "empty prompt: token_ids has no ids")
        _require(
            num_ids <= MAX_PROMPT_TOKEN_IDS,
            f"prompt too long: {num_ids} token ids, limit {MAX_PROMPT_TOKEN_IDS}",
        )
    else:
        texts = prompt_texts(request)
        _require(any(t.strip() for t in texts), "empty prompt: no text to answer")
        num_bytes = sum(len(t.encode()) for t in texts)
        _require(
            num_bytes <= MAX_PROMPT_BYTES,
            f"prompt too long: {num_bytes} bytes of text, limit {MAX_PROMPT_BYTES}",
        )
        check_roles(request)
    _validate_sampling(request.sampling)
    _validate_escalation(request.escalation)


def _validate_sampling(sampling: pb.SamplingParams) -> None:
    if sampling.HasField("max_tokens"):
        _require(1 <= sampling.max_tokens <= MAX_TOKENS, f"max_tokens must be in 1..{MAX_TOKENS}")
    if sampling.HasField("temperature"):
        t = sampling.temperature
        _require(0 <= t <= MAX_TEMPERATURE, f"temperature must be in [0, {MAX_TEMPERATURE}]")
    if sampling.HasField("top_p"):
        _require(0 < sampling.top_p <= 1, "top_p must be in (0, 1]")
    if sampling.HasField("min_p"):
        _require(0 <= sampling.min_p <= 1, "min_p must be in [0, 1]")
    if sampling.HasField("repetition_penalty"):
        penalty = sampling.repetition_penalty
        _require(0 < penalty and math.isfinite(penalty), "repetition_penalty must be > 0")
    _require(len(sampling.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings")
    for stop in sampling.stop:
        _require(0 < len(stop) <= MAX_STOP_STRING_CHARS, "stop strings must be 1..256 chars")
    _require(len(sampling.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "too many stop_token_ids")


def _validate_escalation(escalation: pb.EscalationSettings) -> None:
    if escalation.HasField("window"):
        _require(escalation.window >= 1, "escalation.window must be >= 1")
    if escalation.HasField("threshold"):
        _require(0 < escalation.threshold < 1, "escalation.threshold must be in (0, 1)")


def prompt_texts(request: pb.GenerateRequest) -> list[str]:
    if request.WhichOneof("prompt") == "text":
        return [request.text]
    return [m.content for m in request.conversation.messages]


def overrides_of(request: pb.GenerateRequest, topology: Topology) -> Overrides:
    """The request's overrides as policy sees them (UNSPECIFIED enums mean no override)."""
    given = request.overrides
    tier = None
    if given.HasField("tier") and given.tier != pb.TIER_UNSPECIFIED:
        _require(given.tier in TIER, f"unknown tier {given.tier}; tiers: edge, cloud")
        tier = TIER.name(given.tier)
    mode = None
    if given.handoff_mode != pb.HANDOFF_MODE_UNSPECIFIED:
        _require(given.handoff_mode in HANDOFF_MODE, f"unknown handoff mode {given.handoff_mode}")
        mode = HANDOFF_MODE.name(given.handoff_mode)
    if request.escalation.HasField("force_to_exit"):
        served = topology.exit_tiers(topology.routed_model)
        to_exit = request.escalation.force_to_exit
        _require(to_exit in served, f"escalation.force_to_exit {to_exit} is not a served exit")
    return Overrides(
        exit=given.exit if given.HasField("exit") else None,
        tier=tier,
        node=given.node if given.HasField("node") else None,
        handoff_mode=mode,
    )


def score_request(scorer: Scorer, request: pb.GenerateRequest) -> float:
    """Difficulty in [0, 1]: the scorer reads conversations and text; token ids have no text,
    so they score by length alone (the heuristic's length feature and weight)."""
    if request.WhichOneof("prompt") == "token_ids":
        return WEIGHTS["length"] * length_feature(len(request.token_ids.ids))
    messages: list[dict[str, Any]]
    if request.WhichOneof("prompt") == "text":
        messages = [{"role": "user", "content": request.text}]
    else:
        messages = [{"role": m.role, "content": m.content} for m in request.conversation.messages]
    enable_thinking = request.enable_thinking if request.HasField("enable_thinking") else None
    return scorer.score(messages, enable_thinking)


def estimate_tokens(request: pb.GenerateRequest, default_max_tokens: int = 256) -> int:
    """Rough work budget of a request (prompt + max_tokens) for the router's load accounting."""
    if request.WhichOneof("prompt") == "token_ids":
        prompt = len(request.token_ids.ids)
    else:
        prompt = sum(len(t) for t in prompt_texts(request)) // 4
    max_tokens = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 0
    return prompt + (max_tokens or default_max_tokens)


def node_request(
    request: pb.GenerateRequest,
    request_id: str,
    topology: Topology,
    exit_: int,
    prefix: list[int],
    prefix_text: str | None = None,
) -> pb.GenerateRequest:
    """What a node gets: the client's request with the router's request id, the chosen exit,
    escalation settings from topology.yaml wherever the client left a field unset, and what was
    already relayed: `prefix` token ids (same tokenizer), or with `prefix_text` the text of the
    `len(prefix)` relayed tokens for a node whose model tokenizes differently; its max_tokens
    then counts only what is left."""
    out = pb.GenerateRequest()
    out.CopyFrom(request)
    out.request_id = request_id
    out.overrides.exit = exit_
    # Tier and node overrides were applied by the router; a failover may land elsewhere.
    out.overrides.ClearField("tier")
    out.overrides.ClearField("node")
    spec = topology.router.escalation
    if not out.escalation.HasField("enabled"):
        out.escalation.enabled = spec.enabled
    if not out.escalation.HasField("window"):
        out.escalation.window = spec.window
    if not out.escalation.HasField("threshold"):
        out.escalation.threshold = spec.threshold
    del out.prefix_token_ids[:]
    if prefix_text is None:
        out.prefix_token_ids.extend(prefix)
        out.ClearField("prefix_text")
        return out
    asked = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else None
    out.sampling.max_tokens = max(1, (asked or SamplingParams().max_tokens) - len(prefix))
    out.prefix_text = prefix_text
    return out
