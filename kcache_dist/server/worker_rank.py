"""The server on every rank but rank 0: no HTTP, only the engine's worker loop, which runs the
step plans rank 0 sends until rank 0 stops it (after its drain) — then the process exits 0.

Signals: launchers hand SIGINT/SIGTERM to every rank (mpirun forwards them to all ranks, a
terminal's Ctrl-C reaches the whole process group, the DeepSpeed launcher terminates rank 0 first
and the other ranks after it). A worker therefore does not stop on a signal: it logs it and keeps
executing plans while rank 0 finishes the requests in flight, and rank 0 stops it. A second SIGINT
ends the worker at once (rank 0 then fails its requests with 503 and, a few seconds later, exits
too, naming the lost rank). A worker runs its signal handlers between two messages from rank 0,
which come at least every `keepalive_interval_s`.

A lost rank 0 (its process died, or it stayed silent past the collective timeout) makes the
worker exit with status 1 and a message naming it.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

from ..parallel import exit_on_lost_rank

logger = logging.getLogger(__name__)

WAIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalsWaitForRank0:
    """While active (a context manager, on the main thread): SIGINT/SIGTERM are logged, not obeyed;
    a second SIGINT exits the process with status 128 + SIGINT."""

    def __init__(self) -> None:
        self._previous: dict[int, Callable] = {}
        self.received: list[int] = []

    def __enter__(self) -> "SignalsWaitForRank0":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in WAIT_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, sig: int, frame) -> None:
        name = signal.Signals(sig).name
        if sig == signal.SIGINT and signal.SIGINT in self.received:
            logger.warning("received SIGINT again: exiting now, without waiting for rank 0")
            logging.shutdown()
            os._exit(128 + signal.SIGINT)
        self.received.append(sig)
        logger.info("received %s: rank 0 finishes the requests in flight, then stops this worker", name)


def serve_as_worker(engine) -> int:
    """Run `engine.run_worker()` until rank 0 stops the workers; returns the exit status, 0. A
    step that raises is logged and the worker runs on, as rank 0's engine driver does (it drops
    that step's requests with an error and serves on)."""
    logger.info("worker rank: running the step plans of rank 0")
    with SignalsWaitForRank0(), exit_on_lost_rank():
        engine.run_worker(survive_step_errors=True)
    logger.info("stopped by rank 0")
    return 0
