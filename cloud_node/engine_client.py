"""HTTP to an OpenAI-compatible engine (vLLM, SGLang, llama.cpp server): streamed
`/v1/completions` (and `/v1/chat/completions`, for a node without a local tokenizer) read as
server-sent events into `cluster.openai_types` chunks, the model list, and the engine's
failures as domain errors, so the node's status codes say what went wrong:

| engine                                          | node status                           |
|-------------------------------------------------|---------------------------------------|
| HTTP 400 / 413 / 422 (the request)              | INVALID_ARGUMENT, the engine's message |
| HTTP 429                                        | RESOURCE_EXHAUSTED (try another node) |
| unreachable, timeouts, HTTP 5xx / 401 / 404 ... | UNAVAILABLE (the router fails over)   |
| malformed SSE, an error event, a cut stream     | UNAVAILABLE, naming what was wrong    |

Async (httpx) so that a cancelled request closes its connection: the engine sees the client go
and stops generating. The API key is sent as a bearer token and never logged.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx
import pydantic

from ruyiflow.cluster.errors import InvalidRequest, NodeUnavailable, Overloaded, RuyiflowError
from ruyiflow.cluster.openai_types import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
)

CONNECT_TIMEOUT_S = 3.0
MAX_ERROR_CHARS = 300
_REQUEST_ERRORS = (400, 413, 422)
_Chunk = TypeVar("_Chunk", Completion, ChatCompletionChunk)


class EngineUnreachable(NodeUnavailable):
    """No connection, a timeout, or a connection cut: the engine is taken as down until the
    next health poll finds it answering."""


class EngineBusy(EngineUnreachable):
    """Connected, but no answer in time: down unless its streams are making progress (llama.cpp's
    server answers /v1/models only between two requests)."""


class EngineStreamError(NodeUnavailable):
    """The engine's stream broke the protocol or was cut (the node fails the request over)."""


def error_message(body: bytes) -> str:
    """The human part of an engine's error body: OpenAI's `{"error": {...}}`, vLLM's flat
    `{"message": ...}`, FastAPI's `{"detail": ...}`, else the text itself (shortened)."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:MAX_ERROR_CHARS] or "(empty body)"
    if isinstance(data, dict):
        try:
            return ErrorResponse.model_validate(data).error.message[:MAX_ERROR_CHARS]
        except pydantic.ValidationError:
            pass
        for key in ("message", "detail"):
            if key in data:
                return str(data[key])[:MAX_ERROR_CHARS]
    return text[:MAX_ERROR_CHARS]


def error_for_status(status: int, body: bytes, where: str) -> RuyiflowError:
    message = f"engine at {where} answered HTTP {status}: {error_message(body)}"
    if status in _REQUEST_ERRORS:
        return InvalidRequest(message)
    if status == 429:
        return Overloaded(message)
    return NodeUnavailable(message)


async def sse_data(lines: AsyncIterator[str], where: str) -> AsyncIterator[dict[str, Any]]:
    """JSON objects of the `data:` events of an SSE stream, until `data: [DONE]`. Comments
    (`: ping`) and other fields are skipped; an event split over several `data:` lines is
    joined as the SSE spec says. A stream that ends without [DONE] is cut."""
    pending: list[str] = []
    async for line in lines:
        if line.startswith("data:"):
            pending.append(line[5:].removeprefix(" "))
            continue
        if line or not pending:
            continue  # a comment, an `event:`/`id:` field, or a blank line between events
        data, pending = "\n".join(pending), []
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise EngineStreamError(
                f"engine at {where} sent a malformed event: {data[:MAX_ERROR_CHARS]!r}"
            ) from None
        if not isinstance(event, dict):
            raise EngineStreamError(f"engine at {where} sent a non-object event: {data[:80]!r}")
        if "error" in event:
            detail = error_message(json.dumps(event).encode())
            raise EngineStreamError(f"engine at {where} failed mid-stream: {detail}")
        yield event
    if pending and "\n".join(pending) == "[DONE]":
        return
    raise EngineStreamError(f"engine at {where} closed the stream before [DONE]")


class EngineClient:
    """One engine's HTTP client; a connection per concurrent stream (`max_connections`)."""

    def __init__(
        self, base_url: str, api_key: str | None, timeout_s: float, max_connections: int
    ) -> None:
        self.where = base_url.rstrip("/")
        self.timeout_s = timeout_s
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.where + "/",
            headers=headers,
            # read: the longest wait for the next token; pool: waiting for a free connection
            # is bounded by the node's own admission, not here.
            timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S, pool=None),
            limits=httpx.Limits(max_connections=max_connections + 2),
            trust_env=False,  # an engine on loopback must not go through a proxy
        )

    async def stream_completion(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        """Chunks of a streamed `/v1/completions`; cancelling the caller closes the request."""
        async for chunk in self._stream("completions", request, Completion):
            yield chunk

    async def stream_chat(
        self, request: ChatCompletionRequest
    ) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks of a streamed `/v1/chat/completions` (a node without a local tokenizer)."""
        async for chunk in self._stream("chat/completions", request, ChatCompletionChunk):
            yield chunk

    async def _stream(
        self, path: str, request: pydantic.BaseModel, chunk_type: type[_Chunk]
    ) -> AsyncIterator[_Chunk]:
        body = request.model_dump(exclude_none=True)
        try:
            async with self._http.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    raise error_for_status(response.status_code, await response.aread(), self.where)
                async for event in sse_data(response.aiter_lines(), self.where):
                    try:
                        yield chunk_type.model_validate(event)
                    except pydantic.ValidationError as exc:
                        raise EngineStreamError(
                            f"engine at {self.where} sent an event that is not a {path} "
                            f"chunk: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}"
                        ) from None
        except httpx.TimeoutException as exc:
            raise EngineUnreachable(
                f"engine at {self.where} timed out ({type(exc).__name__}: nothing within "
                f"{self.timeout_s:g} s)"
            ) from None
        except httpx.TransportError as exc:  # refused, reset, cut mid-response
            raise EngineUnreachable(f"engine at {self.where} unreachable or cut: {exc!r}") from None

    async def complete(self, request: CompletionRequest) -> Completion:
        """A whole (non-streamed) completion: the start-up probe's."""
        body = request.model_dump(exclude_none=True)
        try:
            response = await self._http.post("completions", json=body)
        except httpx.HTTPError as exc:
            raise EngineUnreachable(f"engine at {self.where} unreachable: {exc!r}") from None
        if response.status_code != 200:
            raise error_for_status(response.status_code, response.content, self.where)
        try:
            return Completion.model_validate(response.json())
        except (ValueError, pydantic.ValidationError) as exc:
            raise NodeUnavailable(f"engine at {self.where} sent a bad completion: {exc}") from None

    async def model_ids(self, timeout_s: float) -> list[str]:
        """Ids `/v1/models` lists (raises NodeUnavailable when the engine does not answer)."""
        try:
            response = await self._http.get("models", timeout=timeout_s)
        except httpx.ReadTimeout:
            raise EngineBusy(f"engine at {self.where}: /models took over {timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise EngineUnreachable(f"engine at {self.where} unreachable: {exc!r}") from None
        if response.status_code != 200:
            raise error_for_status(response.status_code, response.content, self.where)
        try:
            return [str(m["id"]) for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise NodeUnavailable(f"engine at {self.where}: bad /models answer ({exc!r})") from None

    async def close(self) -> None:
        await self._http.aclose()
