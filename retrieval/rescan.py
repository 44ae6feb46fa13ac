"""Rescans asked for by lookups (a workflow or the web panel naming a sha256 the index does not know).

A lookup never scans itself: it asks :class:`RescanScheduler`, which runs at most one background scan at a
time, lets every request that arrives meanwhile share it, and starts none sooner than ``min_interval``
seconds after the last one ended. A flood of unknown hashes therefore costs one directory walk every few
seconds, not one per request; a caller may wait (bounded) for the shared scan and look again.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

MIN_INTERVAL_S = 5.0


class RescanScheduler:
    """Runs ``scan()`` in a daemon thread on request, at most one at a time, throttled by ``min_interval``."""

    def __init__(self, scan: Callable[[], object], min_interval: float = MIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._scan = scan
        self.min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._running: threading.Event | None = None
        self._ended_at: float | None = None
        self.started = 0

    def request(self, wait: float | None = 0.0) -> bool:
        """Ask for a rescan; ``True`` when one (started now or already running) has finished within ``wait``
        seconds (``None``: as long as it takes), so a second lookup is worth it. ``False`` when throttled (the
        last one ended less than ``min_interval`` ago) or still running."""
        with self._lock:
            done = self._running
            if done is None:
                if self._ended_at is not None and self._clock() - self._ended_at < self.min_interval:
                    return False
                done = self._running = threading.Event()
                self.started += 1
                threading.Thread(target=self._run, args=(done,), name="loom-library-rescan", daemon=True).start()
        return done.wait(wait) if wait != 0.0 else done.is_set()

    def _run(self, done: threading.Event) -> None:
        try:
            self._scan()
        except Exception:  # logged; the lookup that asked simply finds nothing new
            logger.exception("background library rescan failed")
        finally:
            with self._lock:
                self._ended_at = self._clock()
                self._running = None
            done.set()
