"""Out of memory at load (issue 18, item 6): a ``BudgetError`` saying what could not be
allocated, how many bytes, and the budget flag that would fit; never a torch traceback (before:
``RuntimeError: ... DefaultCPUAllocator: can't allocate memory``, exit 1). The failed load
frees what it built, so the suggested flag then runs in the same process, under the same
limit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
import offload_rt.runtime as runtime_module
from offload_rt.errors import BudgetError
from offload_rt.model.transformer import Transformer

REPO_ROOT = Path(__file__).resolve().parent.parent
# 16 experts of 12 MiB (float32): resident they need 192 MiB, more than the 150 MiB the
# process may still map; offloaded, a few slots per layer fit.
SPEC = TinySpec(num_experts=8, top_k=2, num_layers=2, hidden_size=128, intermediate_size=8192,
                dtype=torch.bfloat16, seed=71)
HEADROOM_MIB = 150

# Limits the address space to what is mapped after the imports + HEADROOM_MIB
# (prlimit --as), then runs `offload-rt generate` with default budgets, then again with the
# flag the error suggests.
SCRIPT = textwrap.dedent("""
    import contextlib, io, json, re, resource, sys
    import psutil
    import offload_rt.runtime
    from offload_rt.cli import main

    model, headroom = sys.argv[1], int(sys.argv[2]) * 2**20
    argv = ["generate", model, "--prompt-ids", "1,2,3,4", "--max-new-tokens", "4", "--json",
            "--dtype", "float32"]
    limit = psutil.Process().memory_info().vms + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        first = main(argv)
    flag = re.search(r"try (--cpu-memory \\S+)", err.getvalue())
    out = io.StringIO()
    second = None
    if flag:
        with contextlib.redirect_stdout(out):
            second = main(argv + flag.group(1).split())
    print(json.dumps({"first": first, "stderr": err.getvalue(), "second": second,
                      "stdout": out.getvalue()}))
""")


@pytest.fixture(scope="module")
def big_experts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("big_experts"), SPEC)


def test_out_of_memory_at_load_names_what_and_a_flag_that_fits(big_experts: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(big_experts), str(HEADROOM_MIB)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    err = report["stderr"]
    assert report["first"] == 2, err  # an OffloadError: one line, exit 2
    assert err.startswith("offload-rt: error: out of memory allocating 16 expert slots"), err
    assert "every expert resident" in err and "192.1 MiB" in err
    assert "address-space limit" in err and "Traceback" not in err
    assert re.search(r"try --cpu-memory \d+MiB \(\d+ expert slots\)", err), err
    assert report["second"] == 0, report  # the suggestion runs, in the same process
    assert len(json.loads(report["stdout"].strip().splitlines()[-1])["token_ids"]) == 4


ALLOCATOR = "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't " \
            "allocate memory: you tried to allocate 1048576 bytes. Error code 12"


def fail_with_oom(*args: object, **kwargs: object) -> None:
    raise RuntimeError(ALLOCATOR)


@pytest.mark.parametrize(("target", "words"), [
    ("build_trunk", ["the resident trunk", "cannot be offloaded", "--dtype bfloat16"]),
    ("load_resident", ["expert slots", "every expert resident", "--cpu-memory"]),
    ("build_offloaded", ["expert slots of", "--cpu-memory"]),
])
def test_each_load_stage_translates_its_allocation_failure(
        tiny_hf_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, target: str,
        words: list[str]) -> None:
    monkeypatch.setattr(runtime_module, target, fail_with_oom)
    offload = target != "load_resident"
    with pytest.raises(BudgetError) as info:
        offload_rt.load(tiny_hf_checkpoint, dtype="float32", offload=offload)
    message = str(info.value)
    assert message.startswith("out of memory allocating")
    for word in [*words, "bytes", "DefaultCPUAllocator"]:
        assert word in message, message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_kv_cache_allocation_failure_names_max_seq_len(tiny_hf_checkpoint: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Transformer, "attach", fail_with_oom)
    with pytest.raises(BudgetError, match=r"the KV cache: .*--max-seq-len"):
        offload_rt.load(tiny_hf_checkpoint, dtype="float32", cache_experts=2)


def test_a_failure_that_is_not_memory_stays_itself(tiny_hf_checkpoint: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("something else")

    monkeypatch.setattr(runtime_module, "build_offloaded", broken)
    with pytest.raises(ValueError, match="something else"):
        offload_rt.load(tiny_hf_checkpoint, dtype="float32", cache_experts=2)
