"""An ``offload-rt serve`` server in this process, on an ephemeral port of 127.0.0.1, for the
``test_serve_*`` tests: the same ``bind``/``make_server``/``run`` the command runs, in a thread
(uvicorn skips signal handling off the main thread), stopped as on SIGTERM."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from offload_rt.server.app import ServerSettings
from offload_rt.server.serve import ServingServer, bind, make_server, run

MODEL = "demo"
WAIT_S = 60.0  # generous bounds for a busy 2-core machine; never a timing assertion


@dataclass
class Harness:
    url: str  # http://127.0.0.1:PORT
    server: ServingServer

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> dict[str, Any]:
        return httpx.get(self.url + "/metrics", headers=self.auth(), timeout=WAIT_S).json()

    def auth(self) -> dict[str, str]:
        key = self.server.service.settings.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


@contextlib.contextmanager
def running_server(runtime: Any, **settings: Any) -> Iterator[Harness]:
    """Serve ``runtime`` (model name ``MODEL``) until the block ends."""
    sock = bind("127.0.0.1", 0)
    server = make_server(runtime, ServerSettings(model_name=MODEL, **settings), sock,
                         log_level="warning")
    thread = threading.Thread(target=run, args=(server, sock), daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the server to start")
    try:
        yield Harness(f"http://127.0.0.1:{sock.getsockname()[1]}", server)
    finally:
        server.stop()
        thread.join(WAIT_S)
        assert not thread.is_alive(), "the server did not stop"


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    """Poll ``condition`` until it is truthy (returned) or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
