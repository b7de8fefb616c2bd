"""The router's OpenAI-compatible HTTP API (Starlette): `POST /v1/chat/completions`,
`POST /v1/completions`, `GET /v1/models`, `GET /health`, `GET /version`. Plain Starlette rather
than FastAPI on top of it: bodies are parsed here (to map their errors), and FastAPI's middleware
stack measured ~0.5-0.9 ms more per request on the time to first token.

A completion reads: body -> `openai_requests` (GenerateRequest) -> `RouterServicer.generate`
on a worker thread (`openai_bridge`) -> `openai_responses` (JSON or server-sent events). The
answer waits for the first chunk, so anything refused before a token exists gets its HTTP status;
a later failure ends the stream with an error event. Every error becomes a status in
`openai_errors`. A client that disconnects cancels its request on the node.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from importlib import metadata

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ruyiflow.cluster.api_keys import ApiKeys
from ruyiflow.cluster.openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.openai_bridge import ChunkStream
from ruyiflow.router.openai_errors import ApiError, error_answer
from ruyiflow.router.openai_requests import chat_request, completion_request
from ruyiflow.router.openai_responses import DONE, AnswerWriter, route_headers, sse
from ruyiflow.router.service import RouterServicer

MAX_BODY_BYTES = 1 << 20  # a 32 KiB prompt is at most ~200 KiB of JSON, even fully escaped
JSON = "application/json"


def _error(exc: BaseException) -> Response:
    status, body = error_answer(exc)
    response = Response(body.model_dump_json(), status_code=status, media_type=JSON)
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:  # RetryLater: every node that could serve is full
        response.headers["retry-after"] = str(max(1, math.ceil(retry_after_s)))
    return response


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 once it passes MAX_BODY_BYTES (before parsing any of it)."""
    too_large = ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", None, "too_large")
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise too_large
        parts.append(part)
    return b"".join(parts)


async def _cancel_on_disconnect(request: Request, stream: ChunkStream) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.cancel()


class OpenAIFrontEnd:
    """The API over a router servicer; `executor` runs the blocking request path."""

    def __init__(self, servicer: RouterServicer, executor: Executor) -> None:
        self.servicer = servicer
        self.topology = servicer.topology
        self.executor = executor
        self.started = int(time.time())

    def model_of(self, node: str) -> str:
        return self.topology.node(node).model

    async def complete(self, request: Request, kind: str) -> Response:
        try:
            body = await _read_body(request)
            if kind == "chat":
                query, spec = chat_request(
                    ChatCompletionRequest.model_validate_json(body), self.topology
                )
            else:
                query, spec = completion_request(
                    CompletionRequest.model_validate_json(body), self.topology
                )
            stream = ChunkStream(self.servicer, query, self.executor)
        except Exception as exc:
            return _error(exc)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, stream))
        writer = AnswerWriter(spec, self.model_of, int(time.time()))
        try:
            first = await stream.next()
            if first is None:
                raise ApiError(499, "the client closed the request", None, "cancelled")
            writer.add(first)
            headers = {"x-request-id": spec.request_id}
            if spec.stream:
                headers |= route_headers([first.source], stream.trace.difficulty)
                events = _events(stream, writer, first, watcher)
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            await _read_all(stream, writer, first)
        except Exception as exc:
            watcher.cancel()
            stream.cancel()
            return _error(exc)
        watcher.cancel()
        headers |= route_headers(list(writer.route.spans), stream.trace.difficulty)
        return Response(writer.whole().model_dump_json(), media_type=JSON, headers=headers)

    def models(self) -> ModelList:
        routed = self.topology.routed_model
        cards = []
        for model in self.topology.models:
            nodes = [n for n in self.topology.nodes if n.model == model.name]
            max_len = min((n.max_context for n in nodes), default=None)  # fits on every node
            extra = {"routed": model.name == routed, "nodes": [n.name for n in nodes]}
            cards.append(
                ModelCard(
                    id=model.name, created=self.started, max_model_len=max_len, ruyiflow=extra
                )
            )
        return ModelList(data=cards)

    def health(self) -> JSONResponse:
        """200 while at least one node serves and the router is not draining, else 503."""
        nodes = {n.name: self.servicer.registry.is_available(n.name) for n in self.topology.nodes}
        is_up = any(nodes.values()) and not self.servicer.admission.is_draining
        body = {"status": "ok" if is_up else "unavailable", "nodes": nodes}
        return JSONResponse(body, status_code=200 if is_up else 503)


async def _read_all(stream: ChunkStream, writer: AnswerWriter, first: pb.Chunk) -> None:
    chunk: pb.Chunk | None = first
    while chunk is not None and chunk.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        chunk = await stream.next()
        if chunk is not None:
            writer.add(chunk)


async def _events(
    stream: ChunkStream, writer: AnswerWriter, first: pb.Chunk, watcher: asyncio.Task[None]
) -> AsyncIterator[bytes]:
    """The SSE body: the role chunk and the first content chunk in one write, then one event
    per chunk; the final content chunk is written with the usage chunk and `[DONE]`."""
    try:
        chunk, out = first, writer.stream_start() + writer.stream_chunk(first)
        while chunk.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
            if out:
                yield out
            next_chunk = await stream.next()
            if next_chunk is None:
                return  # cancelled: the client is gone
            chunk = next_chunk
            writer.add(chunk)
            out = writer.stream_chunk(chunk)
        yield out + writer.stream_end()
    except Exception as exc:  # after the headers: the stream ends with an error event
        yield sse(error_answer(exc)[1]) + DONE
    finally:
        watcher.cancel()
        stream.cancel()


def build_app(
    servicer: RouterServicer, executor: Executor, api_keys: ApiKeys | None = None
) -> Starlette:
    """The ASGI app of the router's OpenAI-compatible API; with `api_keys`, every `/v1/` route
    asks for `Authorization: Bearer <key>` (401 otherwise) before reading the body."""
    front = OpenAIFrontEnd(servicer, executor)
    version = {"version": metadata.version("ruyiflow"), "api": "openai", "grpc": "ruyiflow.v1"}

    def refused(request: Request) -> Response | None:
        if api_keys is None:
            return None
        try:
            api_keys.check_header(request.headers.get("authorization"))
        except Exception as exc:
            response = _error(exc)
            response.headers["www-authenticate"] = "Bearer"
            return response
        return None

    async def chat_completions(request: Request) -> Response:
        return refused(request) or await front.complete(request, "chat")

    async def completions(request: Request) -> Response:
        return refused(request) or await front.complete(request, "completion")

    async def models(request: Request) -> Response:
        return refused(request) or Response(front.models().model_dump_json(), media_type=JSON)

    async def health(request: Request) -> Response:
        return front.health()

    async def version_info(request: Request) -> Response:
        return JSONResponse(version)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        code = "not_found" if status == 404 else None
        return _error(ApiError(status, str(getattr(exc, "detail", exc)), None, code))

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/version", version_info, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
