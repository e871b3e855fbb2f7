"""The examples run as a user would run them, and print what their docstrings promise."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint

from offload_rt.demo import demo_model_dir
from offload_rt.errors import CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBED = REPO_ROOT / "examples" / "embed_in_app.py"
# The reply, cut short by the Stop after 5 pieces, then the statistics and a follow-up answer.
EMBED_OUTPUT = re.compile(
    r"> Write a short poem about the sea\.\n(?P<reply>.+)\n"
    r"finish reason: cancelled, (?P<tokens>\d+) tokens, [\d.]+ tok/s, first token [\d.]+ s\n"
    r"expert cache: \d+ hits, \d+ misses, hit rate [\d.]+%, [\d.]+ MiB moved, "
    r"prefetch \d+ useful / \d+ wasted\n"
    r"follow-up answer \((length|eos)\): .*\n$", re.DOTALL)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(vocab_size=32000, tokenizer=True, num_experts=8)
    return make_hf_checkpoint(tmp_path_factory.mktemp("example_model"), spec)


def test_embed_in_app_with_a_model_path(model_dir: Path) -> None:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EMBED), str(model_dir), "--cache-experts", "2",
                           "--stop-after", "5"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    match = EMBED_OUTPUT.match(proc.stdout)
    assert match, proc.stdout
    assert match["reply"].strip()
    assert 5 <= int(match["tokens"]) < 64  # stopped well before max_new_tokens
    assert proc.stderr == ""


def test_embed_in_app_with_the_demo_model(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        demo_model_dir()
    except CheckpointError:
        pytest.skip("the demo model is not in this installation")
    main = runpy.run_path(str(EMBED), run_name="embed_in_app")["main"]
    assert main(["--stop-after", "3"]) == 0
    out = capsys.readouterr().out
    assert "finish reason: " in out and "expert cache: " in out, out
