"""Graceful stops: SIGINT/SIGTERM set a flag that long loops check at a safe point (after an
optimizer step, between batches), so that they save what they have and raise
:class:`nexus.errors.Interrupted`. A second SIGINT aborts at once (``KeyboardInterrupt``)."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class StopFlag:
    """Context manager installing SIGINT/SIGTERM handlers (main thread only) that record the
    signal in :attr:`signum`; the previous handlers come back on exit.

    :param what: what stops, for the log line (``"training"``...).
    :param when: when it stops (``"after this step"``...).
    """

    def __init__(self, what: str = "work", when: str = "at the next safe point"):
        self.what, self.when = what, when
        self.signum: int | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was requested."""
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("received %s: stopping %s %s (press Ctrl-C again to abort without saving)",
                    signal.Signals(signum).name, self.what, self.when)
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def signal_name(signum: int) -> str:
    """``SIGINT``, ``SIGTERM``... for a signal number."""
    return signal.Signals(signum).name
