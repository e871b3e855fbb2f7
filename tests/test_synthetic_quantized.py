"""benchmarks/make_checkpoint.py --experts (issue 13, item 1): a seeded model written quantized
directly, with no float copy on disk, equals the float folder + ``offload-rt quantize`` byte for
byte, and runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import offload_rt

MAKE = Path(__file__).resolve().parent.parent / "benchmarks" / "make_checkpoint.py"
CLI = "import sys; from offload_rt.cli import main; sys.exit(main(sys.argv[1:]))"


def _run(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, capture_output=True, timeout=300)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(("preset", "flags"), [
    (["tiny"], ["--experts", "int4", "--group-size", "32"]),
    (["tiny"], ["--experts", "int8"]),
    (["qwen3moe-small", "--layers", "1"], ["--experts", "int8"]),  # another family's names
])
def test_direct_quantized_folder_equals_quantize_of_the_float_one(
        tmp_path: Path, preset: list[str], flags: list[str]) -> None:
    _run(str(MAKE), *preset, "--out", str(tmp_path / "float"))
    _run("-c", CLI, "quantize", str(tmp_path / "float"), str(tmp_path / "quantized"), *flags)
    _run(str(MAKE), *preset, "--out", str(tmp_path / "direct"), *flags)
    assert not list((tmp_path / "direct").glob("*.tmp"))
    assert _files(tmp_path / "direct") == _files(tmp_path / "quantized")
    with offload_rt.load(tmp_path / "direct", cache_experts=8) as rt:
        assert rt.expert_format.spec()["format"] == flags[1]
        assert len(rt.generate([1, 2, 3], max_new_tokens=3).token_ids) == 3
