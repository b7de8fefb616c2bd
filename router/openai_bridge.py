"""The OpenAI front end's way into the router's one request path: `RouterServicer.generate`
runs on a worker thread (it blocks on node streams, as it does under the gRPC server) and its
chunks cross to the event loop through a queue. `HttpCallContext` stands in for the gRPC call
context the session watches, so a client that leaves cancels the request on the node exactly as
a cancelled gRPC call does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor

from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.service import RouterServicer
from ruyiflow.router.trace import TraceBuilder

_END = object()


class HttpCallContext:
    """The part of `grpc.ServicerContext` a `RequestSession` uses: `is_active` and
    `add_callback`; `cancel()` (the client went away) runs the callbacks once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._is_active = True

    def is_active(self) -> bool:
        return self._is_active

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._is_active:
                self._callbacks.append(callback)
            return self._is_active

    def cancel(self) -> None:
        with self._lock:
            if not self._is_active:
                return
            self._is_active = False
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class ChunkStream:
    """One request through `servicer.generate(..., api="openai")`; await `next()` for each
    chunk (None at the end). Errors raised by the request path are re-raised by `next()`.
    `trace` is the request's trace builder: its difficulty is set before the first chunk."""

    def __init__(
        self, servicer: RouterServicer, request: pb.GenerateRequest, executor: Executor
    ) -> None:
        self.context = HttpCallContext()
        self.trace = TraceBuilder(time.monotonic())
        self._servicer, self._request = servicer, request
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        executor.submit(self._run)

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server stopped): nobody is reading
            self.context.cancel()

    def _run(self) -> None:
        chunks = None
        try:
            chunks = self._servicer.generate(
                self._request, self.context, api="openai", trace=self.trace
            )
            for chunk in chunks:
                self._put(chunk)
                if not self.context.is_active():
                    break
        except BaseException as exc:  # handed to the reader, which maps it to a status
            self._put(exc)
        finally:
            if chunks is not None:  # after a cancel: GeneratorExit ends the session (cancelled)
                chunks.close()
            self._put(_END)

    async def next(self) -> pb.Chunk | None:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # later calls see the end too
            return None
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    def cancel(self) -> None:
        """The client went away (or the answer is written): stop the request on its node."""
        self.context.cancel()
