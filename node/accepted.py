"""States pushed to this node (`AcceptState`) waiting for the `Resume` that names their transfer
id: bounded by count and by total bytes, each kept for a limited time, expired ones swept by a
timer thread (not only when the next push arrives).

Room is reserved from the header's announced size *before* any state byte is read, so a flood
of pushes is refused with RESOURCE_EXHAUSTED (`Overloaded`) instead of being buffered first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ruyiflow.engine.errors import InvalidRequest, Overloaded
from ruyiflow.proto import ruyiflow_pb2 as pb

TRANSFER_SECONDS = 120.0
SWEEP_INTERVAL_S = 5.0


@dataclass
class _Entry:
    header: pb.HandoffHeader | None  # None while its bytes are still arriving
    data: bytes
    num_bytes: int  # reserved (the announced size)
    expires: float
    sender: str  # the identity that pushed it


class AcceptedStates:
    """Thread-safe store of pushed states under transfer ids (at most `max_states`, holding at
    most `max_bytes` together)."""

    def __init__(
        self,
        max_states: int,
        max_bytes: int,
        ttl_s: float = TRANSFER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_states = max_states
        self.max_bytes = max_bytes
        self._ttl = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def num_states(self) -> int:
        return len(self._entries)

    @property
    def num_bytes(self) -> int:
        with self._lock:
            return sum(e.num_bytes for e in self._entries.values())

    def reserve(self, transfer_id: str, num_bytes: int, sender: str) -> None:
        """Hold room for a push of `num_bytes` under `transfer_id`; Overloaded when full."""
        if not transfer_id:
            raise InvalidRequest("AcceptState needs a transfer_id in the header")
        now = self._clock()
        with self._lock:
            self._sweep_locked(now)
            if transfer_id in self._entries:
                raise InvalidRequest(f"transfer id {transfer_id!r} is already in use")
            held = sum(e.num_bytes for e in self._entries.values())
            if len(self._entries) >= self.max_states or held + num_bytes > self.max_bytes:
                raise Overloaded(
                    f"node holds {len(self._entries)} pushed states ({held} bytes; limits "
                    f"{self.max_states} states, {self.max_bytes} bytes); retry later"
                )
            self._entries[transfer_id] = _Entry(None, b"", num_bytes, now + self._ttl, sender)

    def fill(self, transfer_id: str, header: pb.HandoffHeader, data: bytes) -> None:
        """The reserved push arrived whole."""
        with self._lock:
            entry = self._entries.get(transfer_id)
            if entry is not None:
                entry.header, entry.data = header, data

    def release(self, transfer_id: str) -> None:
        """Give back a reservation whose push failed."""
        with self._lock:
            self._entries.pop(transfer_id, None)

    def take(self, transfer_id: str) -> tuple[pb.HandoffHeader, bytes]:
        """The state pushed under `transfer_id`, removed from the store."""
        with self._lock:
            entry = self._entries.get(transfer_id)
            if entry is None or entry.header is None or entry.expires < self._clock():
                raise InvalidRequest(f"no pushed state under transfer id {transfer_id!r}")
            del self._entries[transfer_id]
        return entry.header, entry.data

    def sweep(self) -> int:
        """Drop expired states; returns how many."""
        with self._lock:
            return self._sweep_locked(self._clock())

    def _sweep_locked(self, now: float) -> int:
        expired = [k for k, e in self._entries.items() if e.expires < now]
        for key in expired:
            del self._entries[key]
        return len(expired)

    def start_sweeper(
        self, interval_s: float = SWEEP_INTERVAL_S, also: Callable[[], object] | None = None
    ) -> None:
        """Sweep every `interval_s` on a daemon thread (and call `also`: other expiring state)."""

        def run() -> None:
            while not self._stop.wait(interval_s):
                self.sweep()
                if also is not None:
                    also()

        self._thread = threading.Thread(target=run, name="state-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
