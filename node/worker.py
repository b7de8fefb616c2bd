"""The engine thread: owns the Engine, steps it while there is work, and talks to gRPC handler
threads through queues. Every engine call happens on this one thread, so the engine needs no
locks; handlers submit commands and read their request's events from its own queue.

Escalation is decided here, between two steps: a request whose confidence stays low switches
to a deeper exit on this node when the node serves one (no transfer), otherwise it is exported
and parked under a handle for the router to move. With a calibrated gate (`node.gate`), a
request started at a shallow exit has its first token held until the gate has looked at it:
it streams, or it is un-sampled and moves the same two ways before any token leaves the node.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ruyiflow.engine.errors import InvalidRequest, NodeUnavailable
from ruyiflow.engine.events import TokenEvent
from ruyiflow.engine.handoff import peek_metadata, to_tokens_mode
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.node.escalation import EscalationSettings, EscalationWatch
from ruyiflow.node.gate import GATE, Gate

if TYPE_CHECKING:  # over any model runner (torch, onnxruntime)
    from ruyiflow.engine.engine import Engine, HeldToken

log = logging.getLogger(__name__)
PARK_SECONDS = 120.0


@dataclass(frozen=True)
class LocalSwitch:
    """The request moved to a deeper exit on this node (branch switch)."""

    from_exit: int
    to_exit: int
    reason: str


@dataclass(frozen=True)
class Parked:
    """The request stopped here; its state waits under `handle` for PushState/FetchState."""

    handle: str
    from_exit: int
    to_exit: int
    reason: str
    state_bytes: int
    num_tokens: int


class RequestHandle:
    """A handler's view of one request: a queue of TokenEvent / GateCheck / LocalSwitch /
    Parked / Exception items; None marks the end."""

    def __init__(self, request_id: str, watch: EscalationWatch):
        self.request_id = request_id
        self.watch = watch
        self.seq_id: str | None = None
        self.items: queue.Queue[Any] = queue.Queue()

    def get(self, timeout: float | None = None) -> Any:
        return self.items.get(timeout=timeout)


class EngineWorker:
    def __init__(self, engine: Engine, served_exits: tuple[int, ...], gate: Gate | None = None):
        self.engine = engine
        self.served_exits = tuple(sorted(served_exits))
        self.gate = gate
        self._commands: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._handles: dict[str, RequestHandle] = {}
        self._parked: dict[str, tuple[bytes, float]] = {}
        self._parked_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def call(self, fn: Callable[[], Any], timeout: float | None = 300) -> Any:
        """Run `fn` on the engine thread between two steps; returns its result or raises."""
        if self._stop.is_set():
            raise NodeUnavailable("node is stopping")
        future: Future = Future()
        self._commands.put((fn, future))
        return future.result(timeout=timeout)

    # -- requests -------------------------------------------------------------------------------
    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        exit_layer: int,
        escalation: EscalationSettings,
        prefix_ids: list[int] = (),
    ) -> RequestHandle:
        self._check_served(exit_layer)
        handle = RequestHandle(request_id, EscalationWatch(escalation))
        handle.watch.generated = len(prefix_ids)
        hold = self._gated(exit_layer, escalation) and not prefix_ids

        def add() -> None:
            handle.seq_id = self.engine.add_request(
                prompt_ids, params, exit_layer, prefix_ids=prefix_ids, hold_first=hold
            )
            self._handles[handle.seq_id] = handle

        self.call(add)
        return handle

    def resume(
        self, request_id: str, data: bytes, exit_layer: int, escalation: EscalationSettings
    ) -> RequestHandle:
        self._check_served(exit_layer)
        handle = RequestHandle(request_id, EscalationWatch(escalation))
        meta = peek_metadata(data)
        handle.watch.generated = len(meta.get("token_ids", [])) - int(
            meta.get("num_prompt_tokens", 0)
        )

        hold = self._gated(exit_layer, escalation)  # held only while nothing was generated

        def add() -> None:
            handle.seq_id = self.engine.import_state(data, exit_layer, hold_first=hold)
            self._handles[handle.seq_id] = handle

        self.call(add)
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        def abort() -> None:
            if handle.seq_id in self._handles:
                self._handles.pop(handle.seq_id)
                self.engine.abort(handle.seq_id)

        if not self._stop.is_set():
            self.call(abort)

    def _gated(self, exit_layer: int, escalation: EscalationSettings) -> bool:
        return self.gate is not None and escalation.enabled and self.gate.applies(exit_layer)

    def _check_served(self, exit_layer: int) -> None:
        if exit_layer not in self.served_exits:
            raise InvalidRequest(
                f"exit {exit_layer} is not served by this node {list(self.served_exits)}"
            )

    # -- parked states ----------------------------------------------------------------------------
    def take_parked(self, handle: str, mode: str) -> bytes:
        """The parked state in `mode` (`hidden` as stored, or re-encoded as `tokens`); it
        stays parked until it expires, so a failed push can fall back to a fetch."""
        with self._parked_lock:
            entry = self._parked.get(handle)
        if entry is None:
            raise InvalidRequest(f"no parked state {handle!r} (expired or never parked)")
        return entry[0] if mode == "hidden" else to_tokens_mode(entry[0])

    def _park(self, data: bytes) -> str:
        handle = uuid.uuid4().hex
        self.sweep_parked()
        with self._parked_lock:
            self._parked[handle] = (data, time.monotonic() + PARK_SECONDS)
        return handle

    def sweep_parked(self) -> int:
        """Drop parked states nobody moved within PARK_SECONDS; returns how many."""
        now = time.monotonic()
        with self._parked_lock:
            expired = [k for k, (_, t) in self._parked.items() if t < now]
            for key in expired:
                del self._parked[key]
        return len(expired)

    # -- load -----------------------------------------------------------------------------------
    def load(self) -> tuple[int, int, int]:
        """(running, queued, outstanding tokens); read racily from handler threads."""
        running, waiting = list(self.engine.running), list(self.engine.waiting)
        outstanding = 0
        for seq in running + waiting:
            outstanding += len(seq.pending_tokens()) + seq.params.max_tokens - seq.num_generated
        return len(running), len(waiting), outstanding

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_commands(block=not self.engine.has_work())
            if not self.engine.has_work():
                continue
            try:
                events = self.engine.step()
                for held in list(self.engine.held.values()):
                    self._look(held)
            except Exception as exc:  # a broken step fails its requests, not the node
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            for event in events:
                self._dispatch(event)
        self._fail_all(NodeUnavailable("node stopped"))

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = item
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _look(self, held: HeldToken) -> None:
        """The gate's decision on a held first token: stream it, or move the request on."""
        handle = self._handles.get(held.seq_id)
        if handle is None:  # cancelled meanwhile
            self.engine.abort(held.seq_id)
            return
        check = self.gate.check(
            held.exit, held.confidence, lambda: self.engine.prompt_features(held.seq_id)
        )
        handle.items.put(check)
        if check.passed or check.to_exit is None:
            self._dispatch(self.engine.accept_first(held.seq_id))
            return
        target = check.to_exit
        again = target in self.served_exits and self.gate.applies(target)
        self.engine.retract_first(held.seq_id, hold_again=again)  # nothing was streamed
        self._move(handle, held.seq_id, held.exit, target, GATE)

    def _move(self, handle: RequestHandle, seq_id: str, from_exit: int, target: int, reason: str):
        """Continue at `target`: a branch switch here, else park a hidden state to hand off."""
        if target in self.served_exits:
            self.engine.switch_exit(seq_id, target)
            handle.items.put(LocalSwitch(from_exit, target, reason))
            return
        num_tokens = len(self.engine.sequences[seq_id].token_ids)
        data = self.engine.export_state(seq_id, "hidden")
        self._handles.pop(seq_id, None)
        handle.items.put(Parked(self._park(data), from_exit, target, reason, len(data), num_tokens))
        handle.items.put(None)

    def _dispatch(self, event: TokenEvent) -> None:
        handle = self._handles.get(event.seq_id)
        if handle is None:
            return
        handle.items.put(event)
        if event.finished:
            self._handles.pop(event.seq_id, None)
            handle.items.put(None)
            return
        reason = handle.watch.observe(event.confidence.max_prob)
        if reason is None:
            return
        target = handle.watch.target_exit(event.exit, self.engine.config.exits)
        if target is not None:
            self._move(handle, event.seq_id, event.exit, target, reason)

    def _fail_all(self, exc: Exception) -> None:
        for seq_id, handle in list(self._handles.items()):
            self.engine.abort(seq_id)
            handle.items.put(exc)
            handle.items.put(None)
        self._handles.clear()
