"""Serving a FastAPI app with uvicorn in a background thread on an already bound socket.

Processes keep their main thread for signals and their own work (a compactor's loop, a tablet
server's orderly shutdown), so uvicorn runs in a thread, where it installs no signal handlers.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class ServerThread:
    """One uvicorn server in a daemon thread; `stop` asks it to finish and waits (bounded)."""

    def __init__(self, app: FastAPI, sock: socket.socket, *, name: str = "http") -> None:
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except Exception:
            log.exception("HTTP server stopped with an error")

    def start(self, *, ready_timeout_s: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + ready_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(2.0)
