"""A tiny real HTTP server speaking the OpenAI completions API the way a test asks: a scripted
stream (with or without logprobs), or one of the ways engines fail - HTTP 400/500, a malformed
event, a stream cut before [DONE], a stall. Not a mock: the node reaches it over loopback TCP
like any engine, and the server records every request body it got."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "scripted-model"
PIECES = (" Paris", " is", " the", " capital", ".")
MAX_PROB = 0.9


def logprobs_of(piece: str) -> dict[str, Any]:
    return {
        "tokens": [piece],
        "token_logprobs": [math.log(MAX_PROB)],
        "top_logprobs": [{piece: math.log(MAX_PROB), " other": math.log(0.05)}],
        "text_offset": [0],
    }


class ScriptedEngine(ThreadingHTTPServer):
    """`mode`: ok | http400 | http500 | malformed | cut | stall. `has_logprobs` and
    `accepts_ids` shape what the start-up probe finds."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "ok"
        self.has_logprobs = True
        self.accepts_ids = False
        self.requests: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def start(self) -> ScriptedEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def streamed(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("stream")]


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedEngine
    protocol_version = "HTTP/1.0"  # bodies end when the connection closes

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path != "/v1/models":
            return self._json(404, {"error": {"message": "no such route", "type": "not_found"}})
        self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.requests.append(body)
        if isinstance(body.get("prompt"), list) and not self.server.accepts_ids:
            return self._json(422, {"detail": "prompt: Input should be a valid string"})
        if body.get("logprobs") is not None and not self.server.has_logprobs:
            return self._json(400, {"error": {"message": "logprobs unsupported", "type": "x"}})
        if not body.get("stream"):
            return self._json(200, self._completion(PIECES[0], body, "length"))
        mode = self.server.mode
        if mode == "http400":
            error = {"message": "max_tokens is too large for this model", "type": "invalid"}
            return self._json(400, {"error": error})
        if mode == "http500":
            return self._json(500, {"detail": "CUDA out of memory"})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        if mode == "malformed":
            return self._event("{this is not json")
        pieces = PIECES[: min(len(PIECES), body.get("max_tokens", len(PIECES)))]
        for i, piece in enumerate(pieces):
            self._event(json.dumps(self._completion(piece, body, None)))
            if mode == "cut" and i == 1:
                return
            if mode == "stall" and i == 1:
                time.sleep(5)
                return
        finish = "length" if len(pieces) < len(PIECES) else "stop"
        self._event(json.dumps(self._completion("", body, finish)))  # as llama.cpp ends
        self._event("[DONE]")

    def _completion(self, piece: str, body: dict[str, Any], finish: str | None) -> dict:
        choice: dict[str, Any] = {"index": 0, "text": piece, "finish_reason": finish}
        has_logprobs = body.get("logprobs") is not None and piece
        choice["logprobs"] = logprobs_of(piece) if has_logprobs else None
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": MODEL,
                "choices": [choice]}  # fmt: skip

    def _event(self, data: str) -> None:
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)
