"""Per-token idle timeout of node streams: one thread watches every open stream and cancels
one that sent nothing for `timeout_s` (a hung node: stopped, swapping, cut off), so the session
resumes the request elsewhere from the tokens already relayed. gRPC's stream iterators take no
per-message timeout, and a whole-call deadline would cut long answers.

A silent stream is not always a hung node: a request queued behind a full batch waits for its
first token too. So an idle stream is first asked about: its `is_answering` probe (a health
check of the node on its own connection) decides - a node that answers is busy, and the stream
gets another period; one that does not is hung, and the stream is cancelled."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CHECK_FRACTION = 0.1  # check this often, as a share of the timeout (at most every 0.25 s)


class Watch:
    """One watched stream: `touch()` on every message; `expired` once it was cancelled."""

    def __init__(
        self, cancel: Callable[[], object], is_answering: Callable[[], bool] | None = None
    ) -> None:
        self.cancel = cancel
        self.is_answering = is_answering
        self.last = time.monotonic()
        self.expired = False

    def touch(self) -> None:
        self.last = time.monotonic()


class IdleWatchdog:
    """Cancels watched streams idle for more than `timeout_s` (thread-safe)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(
        self, cancel: Callable[[], object], is_answering: Callable[[], bool] | None = None
    ) -> Watch:
        watch = Watch(cancel, is_answering)
        with self._lock:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="idle-watch", daemon=True)
                self._thread.start()
        return watch

    def forget(self, watch: Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def _run(self) -> None:
        interval = min(0.25, self.timeout_s * CHECK_FRACTION)
        while not self._stop.wait(interval):
            now = time.monotonic()
            with self._lock:
                idle = [w for w in self._watches if now - w.last > self.timeout_s]
                self._watches.difference_update(idle)
            for watch in idle:
                if watch.is_answering is not None and watch.is_answering():
                    watch.touch()  # busy, not hung: watch it for another period
                    with self._lock:
                        self._watches.add(watch)
                    continue
                watch.expired = True
                watch.cancel()

    def close(self) -> None:
        self._stop.set()
