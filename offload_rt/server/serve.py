"""Running the application under uvicorn, and stopping it cleanly.

The listening address is bound before the model loads (a port in use fails in a second, as an
``OptionError`` naming ``--host``/``--port``) and served once it has: connections are refused,
not left hanging, while the model loads. When serving starts, one line goes to stdout with
the address (``--port 0`` picks a free port; a launcher reads it from there).

Shutdown (SIGINT or SIGTERM, or ``ServingServer.stop()``): uvicorn stops accepting; at once the
queue answers the waiting requests 503 (``GenerationQueue.drain``); the running generation has
``shutdown_timeout_s`` to finish, after which uvicorn cancels its request, which cancels the
generation; then the worker thread is joined. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import copy
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import IO, Any

import uvicorn
import uvicorn.config

from offload_rt.errors import OptionError
from offload_rt.server.app import ServerSettings, Service, build_app


class ServingServer(uvicorn.Server):
    """uvicorn's server, telling the service when shutdown begins and when serving starts."""

    def __init__(self, config: uvicorn.Config, service: Service,
                 on_ready: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.service, self._on_ready = service, on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_ready is not None:
            self._on_ready()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Called for SIGINT/SIGTERM in the main thread (while the event loop runs)."""
        super().handle_exit(sig, frame)
        self.service.begin_shutdown()

    def stop(self) -> None:
        """Shut down as on SIGTERM, from any thread."""
        self.service.begin_shutdown()
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OptionError(f"--host {host} --port {port}: cannot listen there: "
                          f"{exc.strerror or exc}") from None
    return sock


def make_server(runtime: Any, settings: ServerSettings, sock: socket.socket,
                log_level: str = "info", out: IO[str] | None = None) -> ServingServer:
    """The uvicorn server for ``runtime`` on the bound ``sock``; ``out`` gets the ready line."""
    service = Service(runtime, settings)
    config = uvicorn.Config(build_app(service), log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=settings.shutdown_timeout_s,
                            log_config=_stderr_logging())
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def ready() -> None:
        if out is not None:
            print(f"offload-rt serve: {url} (model '{settings.model_name}'); Ctrl-C stops",
                  file=out, flush=True)

    return ServingServer(config, service, ready)


def _stderr_logging() -> dict[str, Any]:
    """uvicorn's logging with its access log on stderr too: stdout carries only the ready
    line, for a launcher to read."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


class _Terminated(BaseException):
    """SIGTERM, as uvicorn re-raises it after its graceful shutdown."""


def run(server: ServingServer, sock: socket.socket) -> None:
    """Serve until SIGINT (``KeyboardInterrupt`` afterwards, as uvicorn re-raises it) or
    SIGTERM (a normal return); the queue's worker is stopped in every case."""
    previous = signal.getsignal(signal.SIGTERM)
    on_main = threading.current_thread() is threading.main_thread()
    if on_main:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        server.run(sockets=[sock])
    except _Terminated:
        pass
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
        server.service.queue.close(server.service.settings.shutdown_timeout_s)
        sock.close()


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated
