"""Runs the app under uvicorn with a graceful drain on SIGINT/SIGTERM.

On the first signal the driver stops taking requests (503 for any that still arrive on an open
connection), uvicorn closes the listening socket, waits for every in-flight response — streams
included — to complete, and `serve_http` returns normally, so the process exits with status 0.
(Plain uvicorn re-raises the signal after its shutdown, which ends the process with 128+signal.)
A second SIGINT forces the exit. While `exiting_anyway()` holds (a lost rank: the process exits
by itself in a moment, after answering 503 to whoever asks), the first signal is logged, not obeyed:
draining would close the listening socket, and clients would see refused connections instead.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Callable, Iterator, Optional

import uvicorn

from .cli_args import ServerSettings

logger = logging.getLogger(__name__)

EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit_signal: Callable[[], None],
                 exiting_anyway: Optional[Callable[[], bool]] = None):
        super().__init__(config)
        self._on_exit_signal = on_exit_signal
        self._exiting_anyway = exiting_anyway
        self.exit_signal: int | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.exit_signal is None and self._exiting_anyway is not None and self._exiting_anyway():
            self.exit_signal = sig  # a second signal is obeyed
            logger.warning("received %s: the server is exiting by itself in a moment (a failed engine)",
                           signal.Signals(sig).name)
            return
        if self.exit_signal is None:
            self.exit_signal = sig
            logger.info("received %s: draining", signal.Signals(sig).name)
            self._on_exit_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's handler installation, without re-raising the signal afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in EXIT_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve_http(app, settings: ServerSettings, on_exit_signal: Callable[[], None],
               exiting_anyway: Optional[Callable[[], bool]] = None) -> DrainingServer:
    """Serve until a signal has drained the server; returns the finished server. `exiting_anyway`:
    while it returns True, the first signal is only logged."""
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            log_level=settings.uvicorn_log_level, access_log=settings.access_log,
                            timeout_graceful_shutdown=settings.shutdown_timeout_s, lifespan="off")
    server = DrainingServer(config, on_exit_signal, exiting_anyway)
    server.run()
    return server
