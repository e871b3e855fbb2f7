"""``offload-rt serve`` with several clients, over raw sockets (so a test decides exactly when
a client goes away): a disconnect cancels its generation and the runtime stays usable, the
queue bound answers 429 with Retry-After, and a shutdown finishes or cancels cleanly."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serve_harness import MODEL, WAIT_S, Harness, running_server, wait_for

import offload_rt
from offload_rt.errors import BusyError
from offload_rt.runtime import Runtime

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Tell me about the Jargon File"}]
LONG = 480  # never reached: these generations are cancelled (the demo's context is 512)


@pytest.fixture(scope="module")
def rt() -> Iterator[Runtime]:
    with offload_rt.load() as runtime:
        yield runtime


def long_request(stream: bool, max_tokens: int = LONG) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": stream}


def send(server: Harness, body: dict[str, Any]) -> socket.socket:
    """POST ``body`` on a fresh connection (closed by the server after the answer)."""
    port = int(server.url.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                 % (CHAT.encode(), len(data), data))
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Bytes received up to and including ``marker`` (or all, if the server closes first)."""
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The whole answer on ``sock``: status, headers, body (chunked transfer left as is)."""
    raw = read_until(sock, b"\0")  # the server closes the connection after the answer
    sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def idle_after(server: Harness, outcome: str, count: int) -> dict[str, Any]:
    """The metrics once ``count`` requests ended with ``outcome`` and nothing runs."""
    def settled() -> dict[str, Any] | None:
        m = server.metrics()
        done = m["requests"][outcome] >= count and m["queue"]["running"] == 0
        return m if done and m["last_generation"] is not None else None

    return wait_for(settled, f"{count} '{outcome}' requests and an idle queue")


def assert_still_usable(server: Harness, rt: Runtime) -> None:
    """A greedy request after a cancel gives what a fresh generation gives."""
    body = {"model": MODEL, "messages": USER, "max_tokens": 8, "temperature": 0}
    got = httpx.post(server.url + CHAT, json=body, timeout=WAIT_S).json()
    expected = rt.generate(messages=USER, max_new_tokens=8, temperature=0)
    assert got["choices"][0]["message"]["content"] == expected.text


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_the_generation(rt: Runtime, stream: bool) -> None:
    with running_server(rt) as server:
        sock = send(server, long_request(stream))
        if stream:
            assert b" 200 OK" in read_until(sock, b"data: ")
        else:
            wait_for(lambda: server.metrics()["queue"]["running"], "the generation to start")
        sock.close()
        m = idle_after(server, "cancelled", 1)
        assert m["last_generation"]["finish_reason"] == "cancelled"
        assert m["last_generation"]["tokens"] < LONG
        assert_still_usable(server, rt)


def test_full_queue_is_429_and_queued_requests_still_run(rt: Runtime) -> None:
    with running_server(rt, max_queue=1) as server:
        running = send(server, long_request(stream=True))
        read_until(running, b"data: ")
        waiting = send(server, long_request(stream=False, max_tokens=5))
        wait_for(lambda: server.metrics()["queue"]["waiting"] == 1, "a waiting request")
        refused = httpx.post(server.url + CHAT, json=long_request(False, 5), timeout=WAIT_S)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        running.close()  # the waiting request runs once the first is cancelled
        status, _, body = answer(waiting)
        assert status == 200 and b'"completion_tokens":5' in body
        m = server.metrics()
        assert m["requests"] == {"ok": 1, "rejected": 1, "cancelled": 1, "failed": 0,
                                 "invalid": 0}


def test_a_waiting_request_that_disconnects_never_runs(rt: Runtime) -> None:
    with running_server(rt, max_queue=4) as server:
        running = send(server, long_request(stream=True))
        read_until(running, b"data: ")
        waiting = send(server, long_request(stream=False, max_tokens=5))
        wait_for(lambda: server.metrics()["queue"]["waiting"] == 1, "a waiting request")
        waiting.close()
        wait_for(lambda: server.metrics()["queue"]["waiting"] == 0, "the queue to drop it")
        running.close()
        m = idle_after(server, "cancelled", 2)
        assert m["generations"]["count"] == 1  # only the first one ever ran


def test_shutdown_finishes_the_running_stream_and_refuses_the_waiting(rt: Runtime) -> None:
    with running_server(rt, max_queue=4, shutdown_timeout_s=WAIT_S) as server:
        running = send(server, long_request(stream=True, max_tokens=40))
        read_until(running, b"data: ")
        waiting = send(server, long_request(stream=False, max_tokens=5))
        wait_for(lambda: server.metrics()["queue"]["waiting"] == 1, "a waiting request")
        server.server.stop()
        status, headers, body = answer(waiting)
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert b'"shutting_down"' in body
        streamed = read_until(running, b"data: [DONE]")
        running.close()
        assert b"data: [DONE]" in streamed and b'"finish_reason":"length"' in streamed


def test_shutdown_cancels_a_generation_that_outlasts_the_timeout(rt: Runtime) -> None:
    with running_server(rt, shutdown_timeout_s=0.5) as server:
        running = send(server, long_request(stream=True))
        read_until(running, b"data: ")
        server.server.stop()
        streamed = read_until(running, b"data: [DONE]")  # the server closes it first
        running.close()
    assert b"[DONE]" not in streamed
    wait_for(lambda: rt.last_result.finish_reason, "the generation to end")
    assert rt.last_result.finish_reason == "cancelled"
    assert len(wait_for(generate_when_free(rt), "the runtime to be free").token_ids) == 3


def generate_when_free(rt: Runtime) -> Any:
    """A condition for ``wait_for``: a short generation, or None while the worker thread (on
    a busy machine, maybe still unwinding its cancelled generation) holds the runtime."""
    def attempt() -> Any:
        try:
            return rt.generate("Hello", max_new_tokens=3, ignore_eos=True)
        except BusyError:
            return None

    return attempt
