"""Python client of the router: stream chunks, collect a completion, dry-run routes, list nodes.

    with RouterClient("127.0.0.1:7700") as client:
        done = client.complete("What is the capital of France?", max_tokens=32)
        print(done.text)
        print(format_trace(done.trace))

Errors arrive as `grpc.RpcError` (`.code()`, `.details()`); `complete` also raises
`StreamGapError` if the router's token offsets ever skip or repeat a token.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from ruyiflow.cluster.api_keys import client_key, key_metadata
from ruyiflow.cluster.grpc_server import channel_options
from ruyiflow.cluster.tls import TlsFiles, channel_credentials
from ruyiflow.cluster.wire import FINISH_REASON, HANDOFF_MODE, TIER
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from ruyiflow.router.trace_view import format_trace, trace_to_dict

__all__ = [
    "Completion",
    "RouterClient",
    "StreamGapError",
    "build_request",
    "format_trace",
    "trace_to_dict",
]

Prompt = str | Sequence[Mapping[str, str]] | None
ESCALATION_FIELDS = ("enabled", "window", "threshold", "force_after_tokens", "force_to_exit")


class StreamGapError(RuntimeError):
    """A chunk's token_offset did not continue the tokens received so far."""


@dataclass
class Completion:
    """A whole answer: text, tokens with their confidence, why it ended, and the route trace."""

    text: str
    token_ids: list[int]
    confidence: list[pb.TokenConfidence]
    finish_reason: str  # stop | length | cancelled
    trace: pb.RouteTrace
    sources: list[pb.Source] = field(default_factory=list)  # one per token

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "trace": trace_to_dict(self.trace),
        }


def build_request(
    prompt: Prompt = None,
    *,
    token_ids: Sequence[int] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    exit: int | None = None,  # noqa: A002 (the proto's word)
    tier: str | None = None,
    node: str | None = None,
    handoff_mode: str | None = None,
    escalation: Mapping[str, Any] | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    enable_thinking: bool | None = None,
    request_id: str | None = None,
    raw: bool = False,
) -> pb.GenerateRequest:
    """A GenerateRequest: `prompt` is a user message (rendered with the model's chat template),
    chat messages, or with `raw=True` text fed as is; or pass `token_ids` instead."""
    request = pb.GenerateRequest(request_id=request_id or "")
    if (prompt is None) == (token_ids is None):
        raise ValueError("give exactly one of prompt and token_ids")
    if token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    elif isinstance(prompt, str) and raw:
        request.text = prompt
    elif isinstance(prompt, str):
        request.conversation.messages.append(pb.Message(role="user", content=prompt))
    else:
        messages = [pb.Message(role=m.get("role", "user"), content=m["content"]) for m in prompt]
        request.conversation.messages.extend(messages)
    if max_tokens is not None:
        request.sampling.max_tokens = max_tokens
    if temperature is not None:
        request.sampling.temperature = temperature
    if seed is not None:
        request.sampling.seed = seed
    request.sampling.stop.extend(stop)
    if enable_thinking is not None:
        request.enable_thinking = enable_thinking
    if exit is not None:
        request.overrides.exit = exit
    if tier is not None:
        request.overrides.tier = TIER.value(tier)
    if node is not None:
        request.overrides.node = node
    if handoff_mode is not None:
        request.overrides.handoff_mode = HANDOFF_MODE.value(handoff_mode)
    for key, value in (escalation or {}).items():
        if key not in ESCALATION_FIELDS:
            raise ValueError(f"unknown escalation field {key!r}; fields: {ESCALATION_FIELDS}")
        setattr(request.escalation, key, value)
    return request


ROUTER_GONE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


class RouterClient:
    """Talks to a router at `address`; `timeout` (seconds) bounds each call when given.
    `address` may list several routers of one cluster: when the router serving a stream dies,
    the stream resumes on the next one from what was received (its signed resume token), with
    no token lost or repeated. `api_key` (default: $RUYIFLOW_API_KEY) is sent as
    `authorization: Bearer ...`. `tls`: the CA (and a client certificate) of routers under TLS
    (`cluster.tls.tls_files`), whose certificate must name `server_name`."""

    def __init__(
        self,
        address: str | Sequence[str],
        timeout: float | None = None,
        api_key: str | None = None,
        tls: TlsFiles | None = None,
        server_name: str = "router",
    ) -> None:
        self.addresses = [address] if isinstance(address, str) else list(address)
        if not self.addresses:
            raise ValueError("give at least one router address")
        self.timeout = timeout
        self._metadata = key_metadata(client_key(api_key))
        self._tls, self._server_name = tls, server_name
        self._index = 0
        self._connect()

    @property
    def address(self) -> str:
        """The router this client talks to now."""
        return self.addresses[self._index]

    def _connect(self) -> None:
        if self._tls is None:
            self._channel = grpc.insecure_channel(self.address, options=channel_options())
        else:
            options = [*channel_options(), ("grpc.ssl_target_name_override", self._server_name)]
            credentials = channel_credentials(self._tls)
            self._channel = grpc.secure_channel(self.address, credentials, options=options)
        self._stub = pb_grpc.RouterStub(self._channel)

    def _next_router(self) -> None:
        self._channel.close()
        self._index = (self._index + 1) % len(self.addresses)
        self._connect()

    def generate(self, prompt: Prompt = None, **options: Any) -> Iterator[pb.Chunk]:
        """Stream the answer's chunks; closing the iterator early cancels the request. `prompt`
        is text or chat messages; `options` (token_ids, max_tokens, exit, tier, ...) are
        `build_request`'s. With several routers, a router that dies mid-stream is replaced by
        the next (each is tried once)."""
        request = build_request(prompt, **options)
        ids: list[int] = []
        text, token, num_tries = "", b"", 0
        while True:
            call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
            try:
                for chunk in call:
                    ids.extend(chunk.token_ids)
                    text += chunk.text
                    token = chunk.resume_token or token
                    yield chunk
                return
            except grpc.RpcError as exc:
                num_tries += 1
                if exc.code() not in ROUTER_GONE or num_tries >= len(self.addresses):
                    raise
                if ids or text:
                    if not token:
                        raise  # the routers sign nothing: a resume could not be checked
                    request.resume.CopyFrom(
                        pb.ResumeFrom(token_ids=ids, text=text, resume_token=token)
                    )
                self._next_router()
            finally:
                call.cancel()

    def complete(self, prompt: Prompt = None, **kwargs: Any) -> Completion:
        """The whole answer (arguments as `generate`); checks that token offsets continue."""
        texts: list[str] = []
        token_ids: list[int] = []
        confidence: list[pb.TokenConfidence] = []
        sources: list[pb.Source] = []
        done: Completion | None = None
        for chunk in self.generate(prompt, **kwargs):
            if done is not None:
                raise StreamGapError("a chunk arrived after the final chunk")
            if chunk.token_offset != len(token_ids):
                raise StreamGapError(
                    f"chunk starts at token {chunk.token_offset}, expected {len(token_ids)}"
                )
            texts.append(chunk.text)
            token_ids.extend(chunk.token_ids)
            confidence.extend(chunk.confidence)
            sources.extend([chunk.source] * len(chunk.token_ids))
            if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                finish = FINISH_REASON.name(chunk.finish_reason)
                text = "".join(texts)
                done = Completion(text, token_ids, confidence, finish, chunk.trace, sources)
        # Read to the end (not just the final chunk), so the call ends OK rather than cancelled.
        if done is None:
            raise StreamGapError("the stream ended without a final chunk")
        return done

    def route(self, prompt: Prompt = None, **kwargs: Any) -> pb.RouteReply:
        """Where the router would send this request now (nothing is generated)."""
        request = build_request(prompt, **kwargs)
        return self._stub.Route(request, timeout=self.timeout, metadata=self._metadata)

    def list_nodes(self) -> list[pb.NodeStatus]:
        reply = self._stub.ListNodes(
            pb.ListNodesRequest(), timeout=self.timeout, metadata=self._metadata
        )
        return list(reply.nodes)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
