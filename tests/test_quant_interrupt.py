"""A quantize run stopped by SIGTERM leaves nothing behind (before: the hidden
``.partial-NAME-PID-XXXX`` folder stayed, up to the checkpoint's size, since SIGTERM ends Python
without unwinding), and the hidden folder of a run killed outright is deleted by the next run
into the same OUT_DIR."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint

from offload_rt.quant.quantize import QuantizeSettings, quantize

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from offload_rt.cli_quantize import run_quantize
    from offload_rt.cli import main
    import offload_rt.quant.quantize as q

    real = q._Counter.expert_done
    def expert_done(self, nbytes):  # SIGTERM to itself after the second expert
        real(self, nbytes)
        if self.done == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    q._Counter.expert_done = expert_done
    sys.exit(main(["quantize", sys.argv[1], sys.argv[2], "--experts", "int8"]))
""")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("src"), TinySpec(num_layers=2, seed=5))


def test_sigterm_while_writing_deletes_the_partial_folder(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(out)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # neither OUT_DIR nor a hidden partial folder


def test_a_killed_runs_partial_folder_is_removed_by_the_next_run(model: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".partial-out-{dead}-0a1b2c3d"
    alive = tmp_path / f".partial-out-{os.getpid()}-0a1b2c3d"  # another run, still writing
    other = tmp_path / f".partial-other-{dead}-0a1b2c3d"  # another OUT_DIR's
    for folder in (stale, alive, other):
        folder.mkdir()
        (folder / "model-00001-of-00001.safetensors").write_bytes(b"x" * 4096)
    quantize(model, out, QuantizeSettings("int8"))
    assert not stale.exists() and alive.exists() and other.exists()
    assert (out / "config.json").is_file()
