"""Running the app: uvicorn on a socket of our own, and a drain on SIGTERM / SIGINT.

On the first signal the server stops taking requests (503), lets the ones in flight finish,
then shuts down and exits 0; a second signal, or ``drain_timeout`` seconds, ends the wait.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable

import uvicorn

from ctxvec.pipeline import Pipeline
from ctxvec.serve.app import ServerState, ServeSettings, create_app


SWITCH_INTERVAL = 0.0005  # seconds a thread holds the GIL before the other may take it


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the drain above instead of uvicorn's re-raised signal (which would
    end the process with the signal's status instead of 0)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain_started is not None:  # a second signal: stop waiting, and stop now
            self.should_exit = self.force_exit = True
            return
        self.state.draining = True
        self.drain_started = time.monotonic()

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            if self.state.in_flight == 0 or time.monotonic() - self.drain_started > self.drain_timeout:
                self.should_exit = True
        return await super().on_tick(counter)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (port 0: a free one, chosen by the system)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        error = OSError(f"cannot listen on {host}:{port}: {(err.strerror or str(err)).lower()}.")
        error.errno = err.errno
        raise error from None
    sock.listen(2048)
    return sock


def serve(pipeline: Pipeline, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8080,
          drain_timeout: float = 30.0, *, on_ready: Callable[[str], None]) -> None:
    """Serve ``pipeline`` (loaded and warmed up) until a signal; ``on_ready`` gets the URL."""
    # The event loop and the inference thread share the GIL; Python's default 5 ms turns would
    # keep requests waiting on the worker's Python between kernels (bench_serve: +20% for singles).
    sys.setswitchinterval(SWITCH_INTERVAL)
    app = create_app(pipeline, settings)
    sock = listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    # The drain is done before uvicorn's own shutdown starts: that one only closes connections.
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=1, server_header=False, proxy_headers=False)
    server = DrainingServer(config, app.state.ctxvec, drain_timeout)
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    on_ready(f"http://{url_host}:{bound_port}")
    server.run(sockets=[sock])
