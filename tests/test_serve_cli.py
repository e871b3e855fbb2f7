"""``offload-rt serve`` as a command: the console script on the demo model, stopped by SIGTERM
and SIGINT; refusals before loading; the server's libraries optional for everything else."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_harness import WAIT_S

from offload_rt.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def served() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``offload-rt serve --port 0`` on the demo model, and its base URL once it serves."""
    script = Path(sys.executable).parent / "offload-rt"
    exe = str(script) if script.exists() else shutil.which("offload-rt")
    if exe is None:
        pytest.skip("the offload-rt console script is not installed (pip install -e .)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([exe, "serve", "--port", "0", "--shutdown-timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = _read_line(proc)
        assert line.startswith("offload-rt serve: http://127.0.0.1:"), line
        yield proc, line.split()[2].removesuffix("/v1")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT_S)


def _read_line(proc: subprocess.Popen[str]) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(WAIT_S * 2)
    assert box and box[0], f"no ready line; stderr: {proc.stderr.read() if proc.poll() else ''}"
    return box[0]


def test_sigterm_lets_the_running_stream_finish_then_exits_0(
        served: tuple[subprocess.Popen[str], str]) -> None:
    proc, url = served
    assert httpx.get(url + "/health", timeout=WAIT_S).json() == {"status": "ok"}
    body = {"model": "demo_model", "prompt": "The", "max_tokens": 40, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=WAIT_S) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        proc.send_signal(signal.SIGTERM)
        rest = list(lines)
    assert "data: [DONE]" in rest and any('"finish_reason":"length"' in x for x in rest)
    assert proc.wait(WAIT_S) == 0
    err = proc.stderr.read()
    assert "Traceback" not in err and "Application shutdown complete" in err


def test_sigint_exits_130_without_a_traceback(
        served: tuple[subprocess.Popen[str], str]) -> None:
    proc, _ = served
    proc.send_signal(signal.SIGINT)
    assert proc.wait(WAIT_S) == 130
    err = proc.stderr.read()
    assert "Traceback" not in err and err.rstrip().endswith("offload-rt: interrupted")


def test_a_port_in_use_is_refused_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"offload-rt: error: --host 127.0.0.1 --port {port}: cannot listen")


def test_bad_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--max-queue", "-1"]) == 2
    assert "--max-queue" in capsys.readouterr().err
    assert main(["serve", "--max-body-size", "auto"]) == 2
    assert "--max-body-size" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "env", "words"), [
    (["--api-key", ""], None, "--api-key ''"),
    (["--api-key", " "], None, "--api-key ' '"),
    (["--api-key", "a b"], None, "leave --api-key out"),
    ([], "", "$OFFLOAD_RT_API_KEY ''"),
])
def test_a_key_no_client_can_send_is_refused(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch, flags: list[str],
                                             env: str | None, words: str) -> None:
    """Break-it: --api-key "" started with no warning and then let in an empty bearer token
    (and a " " key refused every request); an empty $OFFLOAD_RT_API_KEY served with no key."""
    if env is not None:
        monkeypatch.setenv("OFFLOAD_RT_API_KEY", env)
    assert main(["serve", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("offload-rt: error: ") and words in err, err


WITHOUT_SERVER_LIBS = """
import sys
sys.modules["uvicorn"] = None  # as if not installed: importing it raises ImportError
sys.modules["starlette"] = None
import offload_rt
from offload_rt.cli import main
print(main(["--help"]) if len(sys.argv) > 1 else main(["serve"]))
"""

NO_SERVER_IMPORTS = """
import sys, contextlib, io
from offload_rt.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    main(["serve", "--help"])
print(sorted(m for m in sys.modules if m.split(".")[0] in ("starlette", "uvicorn", "torch")))
"""


def test_without_the_server_libraries_serve_says_how_to_install_them() -> None:
    proc = subprocess.run([sys.executable, "-c", WITHOUT_SERVER_LIBS], capture_output=True,
                          text=True, timeout=WAIT_S, check=False)
    assert proc.stdout.strip() == "2", proc.stderr
    assert proc.stderr.startswith("offload-rt: error: offload-rt serve needs the server "
                                  "libraries")
    assert "pip install 'offload_rt[serve]'" in proc.stderr
    other = subprocess.run([sys.executable, "-c", WITHOUT_SERVER_LIBS, "help"],
                           capture_output=True, text=True, timeout=WAIT_S, check=False)
    assert other.returncode == 0 and other.stdout.strip().endswith("0"), other.stderr


def test_the_command_line_does_not_import_the_server_libraries() -> None:
    proc = subprocess.run([sys.executable, "-c", NO_SERVER_IMPORTS], capture_output=True,
                          text=True, timeout=WAIT_S, check=False)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stderr


def test_load_test_script_accounts_for_every_request() -> None:
    """``benchmarks/serve_load.py`` (the README's figures) on a small run: its bookkeeping, not
    its timings."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "serve_load.py"),
                           "--requests", "6", "--concurrency", "3", "--max-tokens", "4"],
                          capture_output=True, text=True, timeout=WAIT_S * 4, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (report["ok"], report["failed"], report["rejected"]) == (6, 0, 0)
    assert report["same_answer_per_question"]
    assert report["server_counts"]["ok"] == 6 and report["server_completion_tokens"] == 24
    assert set(report["latency_s"]) == {"p50", "p90", "p99", "max"}
