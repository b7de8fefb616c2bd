"""A tiny real HTTP server speaking the OpenAI completions and chat completions APIs the way a
test asks: a scripted stream (with or without logprobs, one or several tokens a chunk, ids
spelled as vLLM's `return_tokens_as_token_ids` does, `usage` when asked), or one of the ways
engines fail - HTTP 400/500, a malformed
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
PROMPT_TOKENS = 7  # what its `usage` says any prompt has
FIRST_ID = 1000  # the id of PIECES[i] is FIRST_ID + i, when it spells ids


def logprobs_of(tokens: list[str]) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "token_logprobs": [math.log(MAX_PROB)] * len(tokens),
        "top_logprobs": [{t: math.log(MAX_PROB), " other": math.log(0.05)} for t in tokens],
        "text_offset": [0] * len(tokens),
    }


def _chat_logprob(token: str) -> dict[str, Any]:
    top = [{"token": token, "logprob": math.log(MAX_PROB)}, {"token": " other",
           "logprob": math.log(0.05)}]  # fmt: skip
    return {"token": token, "logprob": math.log(MAX_PROB), "top_logprobs": top}


def _usage(num_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": num_tokens,
            "total_tokens": PROMPT_TOKENS + num_tokens}  # fmt: skip


class ScriptedEngine(ThreadingHTTPServer):
    """`mode`: ok | http400 | http500 | malformed | cut | stall; `cut_once` cuts while
    `cuts_left[0]` (a list engines may share) is above 0, counting down. `has_logprobs` and
    `accepts_ids` shape what the start-up probe finds; `spells_ids` honours
    `return_tokens_as_token_ids`; `chunk_size` tokens go in each streamed chunk."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "ok"
        self.has_logprobs = True
        self.accepts_ids = False
        self.spells_ids = False
        self.chunk_size = 1
        self.cuts_left = [0]
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
        body["path"] = self.path
        self.server.requests.append(body)
        is_chat = self.path == "/v1/chat/completions"
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            return self._json(404, {"error": {"message": "no such route", "type": "not_found"}})
        if isinstance(body.get("prompt"), list) and not self.server.accepts_ids:
            return self._json(422, {"detail": "prompt: Input should be a valid string"})
        if body.get("logprobs") not in (None, False) and not self.server.has_logprobs:
            return self._json(400, {"error": {"message": "logprobs unsupported", "type": "x"}})
        if not body.get("stream"):
            answer = self._chunk(is_chat, [0], body, "length")
            answer["usage"] = _usage(1)
            return self._json(200, answer)
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
        num = min(len(PIECES), body.get("max_tokens", len(PIECES)))
        size = self.server.chunk_size
        for i, start in enumerate(range(0, num, size)):
            indices = list(range(start, min(num, start + size)))
            self._event(json.dumps(self._chunk(is_chat, indices, body, None)))
            if mode == "cut_once" and i == 1 and self.server.cuts_left[0] > 0:
                self.server.cuts_left[0] -= 1
                return
            if mode == "cut" and i == 1:
                return
            if mode == "stall" and i == 1:
                time.sleep(5)
                return
        finish = "length" if num < len(PIECES) else "stop"
        self._event(json.dumps(self._chunk(is_chat, [], body, finish)))  # as llama.cpp ends
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {**self._chunk(is_chat, [], body, None), "choices": [], "usage": _usage(num)}
            self._event(json.dumps(usage))
        self._event("[DONE]")

    def _chunk(
        self, is_chat: bool, indices: list[int], body: dict[str, Any], finish: str | None
    ) -> dict[str, Any]:
        """One chunk holding PIECES[i] for i in `indices` (none: the final chunk)."""
        text = "".join(PIECES[i] for i in indices)
        spell = self.server.spells_ids and body.get("return_tokens_as_token_ids")
        tokens = [f"token_id:{FIRST_ID + i}" if spell else PIECES[i] for i in indices]
        wants = body.get("logprobs") not in (None, False) and tokens
        if is_chat:
            lp = {"content": [_chat_logprob(t) for t in tokens]} if wants else None
            choice = {"index": 0, "delta": {"content": text}, "logprobs": lp,
                      "finish_reason": finish}  # fmt: skip
            return {"id": "chat-1", "object": "chat.completion.chunk", "created": 0,
                    "model": MODEL, "choices": [choice]}  # fmt: skip
        choice = {"index": 0, "text": text, "finish_reason": finish}
        choice["logprobs"] = logprobs_of(tokens) if wants else None
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
