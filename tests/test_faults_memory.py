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
from typing import Any

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
import offload_rt.runtime as runtime_module
from offload_rt.errors import BudgetError
from offload_rt.model.transformer import Transformer

REPO_ROOT = Path(__file__).resolve().parent.parent
# 16 experts of 12 MiB (float32): resident they need 192 MiB, more than the 175 MiB the
# process may still map; offloaded, a few slots per layer fit beside the ~27 MiB of work
# memory (--max-seq-len 32), the 16 MiB margin and the prefetch thread's 64 MiB malloc arena.
SPEC = TinySpec(num_experts=8, top_k=2, num_layers=2, hidden_size=128, intermediate_size=8192,
                dtype=torch.bfloat16, seed=71)
HEADROOM_MIB = 175

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
            "--dtype", "float32", "--max-seq-len", "32", *sys.argv[3:]]
    limit = psutil.Process().memory_info().vms + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        first = main(argv)
    # the suggested flags, API spellings in brackets dropped: "--pool global --cpu-memory 9MiB"
    flag = re.search(r"try (.*?--cpu-memory \\S+)", err.getvalue())
    out, err2 = io.StringIO(), io.StringIO()
    second = None
    if flag:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err2):
            second = main(argv + re.sub(r" \\([^)]*\\)", "", flag.group(1)).split())
    print(json.dumps({"first": first, "stderr": err.getvalue(), "second": second,
                      "stdout": out.getvalue(), "second_stderr": err2.getvalue()}))
""")


@pytest.fixture(scope="module")
def big_experts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("big_experts"), SPEC)


def run_limited(model: Path, headroom_mib: int, *flags: str,
                env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """SCRIPT in a subprocess: the first run's stderr, and the suggested flag's run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {}),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(headroom_mib),
                           *flags], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_out_of_memory_at_load_names_what_and_a_flag_that_fits(big_experts: Path) -> None:
    report = run_limited(big_experts, HEADROOM_MIB)
    err = report["stderr"]
    assert report["first"] == 2, err  # an OffloadError: one line, exit 2
    assert err.startswith("offload-rt: error: out of memory allocating 16 expert slots"), err
    assert "every expert resident" in err and "192.1 MiB" in err
    assert "address-space limit" in err and "Traceback" not in err
    # the flag in both spellings (was "try --cpu-memory N MiB (K expert slots)")
    assert re.search(r"try --cpu-memory \d+MiB \(cpu_memory='\d+MiB'\): \d+ expert slots, "
                     r"\d+ per layer", err), err
    assert report["second"] == 0, report  # the suggestion runs, in the same process
    assert len(json.loads(report["stdout"].strip().splitlines()[-1])["token_ids"]) == 4


# 4 layers of 4 experts of 12 MiB (float32): per-layer pools need top_k = 2 slots in each layer
# (96 MiB), more than GLOBAL_HEADROOM_MIB leaves besides the work buffers, margin and arena; one
# global pool needs 2 slots in all (24 MiB), and fits.
GLOBAL_SPEC = TinySpec(num_experts=4, top_k=2, num_layers=4, hidden_size=128,
                       intermediate_size=8192, dtype=torch.bfloat16, seed=73)
GLOBAL_HEADROOM_MIB = 160


@pytest.fixture(scope="module")
def many_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("many_layers"), GLOBAL_SPEC)


@pytest.mark.parametrize("pool", ["auto", "layer"])
def test_when_no_layer_pool_fits_the_advice_is_a_global_pool_that_runs(
        many_layers: Path, pool: str) -> None:
    """Break-it finding 3: with a budget planned per layer and a process limit below even
    top_k slots per layer, the error said 'not even 16 expert slots fit' although a smaller
    --cpu-memory (one global pool, what --pool auto picks then) runs. Now it suggests that
    budget (with --pool global when --pool layer was given), and the suggestion runs under
    the same limit."""
    flags = ["--offload", "--cpu-memory", "1GiB", "--pool", pool]
    # glibc gives a thread that allocates its own arena (64 MiB of address space); the advice
    # leaves room for one per thread (out_of_memory.ARENA_ADDRESS_SPACE): without it the
    # suggested run failed about 1 time in 10 under CPU load, here and in the test above.
    report = run_limited(many_layers, GLOBAL_HEADROOM_MIB, *flags)
    err = report["stderr"]
    assert report["first"] == 2 and "Traceback" not in err, err
    assert err.startswith("offload-rt: error: out of memory allocating 16 expert slots"), err
    add = r"--pool global \(pool='global'\) " if pool == "layer" else ""
    assert re.search(rf"try {add}--cpu-memory \d+MiB \(cpu_memory='\d+MiB'\): \d+ expert "
                     r"slots in one global pool", err), err
    assert "not even" not in err
    assert report["second"] == 0, report  # the suggested --cpu-memory runs (last flag wins)
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


@pytest.mark.parametrize("failure", [ALLOCATOR, "std::bad_alloc"])
def test_out_of_memory_during_generation_is_a_budget_error_and_the_runtime_goes_on(
        tiny_hf_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], failure: str) -> None:
    """An allocation failing mid-generation (memory outside the plan ran short): before, the
    torch RuntimeError came through as is (a traceback from the CLI); std::bad_alloc (a C++
    allocation in attention under `prlimit --as`, found by a breaker) was not recognised."""
    from offload_rt.cli import main
    from offload_rt.model.moe import MoELayer

    def fail_with_oom(*args: object, **kwargs: object) -> None:
        raise RuntimeError(failure)

    real = MoELayer.__call__
    with offload_rt.load(tiny_hf_checkpoint, dtype="float32", cache_experts=2) as rt:
        monkeypatch.setattr(MoELayer, "__call__", fail_with_oom)
        with pytest.raises(BudgetError) as info:
            rt.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True)
        message = str(info.value)
        for words in ("out of memory during generation (a 3-token prompt", "--cpu-memory",
                      "could be allocated under", failure, "the runtime is still usable"):
            assert words in message, message
        assert isinstance(info.value.__cause__, RuntimeError)
        monkeypatch.setattr(MoELayer, "__call__", real)
        assert len(rt.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True).token_ids) == 4
    monkeypatch.setattr(MoELayer, "__call__", fail_with_oom)
    code = main(["generate", str(tiny_hf_checkpoint), "--prompt-ids", "1,2,3",
                 "--max-new-tokens", "2", "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("offload-rt: error: out of memory during generation")
    assert "Traceback" not in err


@pytest.mark.parametrize("prefetch", [0, 1])
@pytest.mark.parametrize("failure", [MemoryError(), OSError(12, "Cannot allocate memory")])
def test_an_expert_read_out_of_memory_is_a_budget_error(
        tiny_hf_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, prefetch: int,
        failure: BaseException) -> None:
    """CI failure (stop 22): an expert read that ran out of memory mid-generation came out as
    'loading expert L0E0 failed: MemoryError' (a LoaderError; an ENOMEM read as a
    CheckpointError naming the file), not the out-of-memory error with its advice. With
    prefetch, the prefetch thread's reads fail later than the demand read that ends the
    request: their failure was then raised by the next request (which had nothing wrong)."""
    import threading
    import time

    from offload_rt.checkpoint import Checkpoint

    real = Checkpoint.read_expert_into

    def fail(*args: object, **kwargs: object) -> int:
        if threading.current_thread().name == "offload-rt-prefetch":
            time.sleep(0.2)  # after the demand read has failed the request
        raise failure

    with offload_rt.load(tiny_hf_checkpoint, dtype="float32", cache_experts=2,
                         prefetch=prefetch) as rt:
        monkeypatch.setattr(Checkpoint, "read_expert_into", fail)
        with pytest.raises(BudgetError, match="out of memory during generation"):
            rt.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True)
        monkeypatch.setattr(Checkpoint, "read_expert_into", real)
        assert len(rt.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True).token_ids) == 4


def test_a_failure_that_is_not_memory_stays_itself(tiny_hf_checkpoint: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("something else")

    monkeypatch.setattr(runtime_module, "build_offloaded", broken)
    with pytest.raises(ValueError, match="something else"):
        offload_rt.load(tiny_hf_checkpoint, dtype="float32", cache_experts=2)


def advice(room_mib: float, **options: object) -> str:
    """_fit_experts for GLOBAL_SPEC's shapes (float32) with ``room_mib`` MiB free."""
    from offload_rt.config import ModelConfig
    from offload_rt.engine.budget import footprint, plan_memory
    from offload_rt.engine.out_of_memory import Headroom, _fit_experts
    from offload_rt.options import RuntimeOptions

    s = GLOBAL_SPEC
    cfg = ModelConfig(s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads,
                      s.num_kv_heads, s.hidden_size // s.num_heads, s.num_experts, s.top_k,
                      s.vocab_size, 1e-5, 1e6, 256)
    device = torch.device("cpu")
    fp = footprint(cfg, torch.float32, 256, 512, file_dtype=torch.bfloat16)
    plan = plan_memory(cfg, fp, device, device_budget=2**30, host_budget=None,
                       cache_experts=None, per_layer=None)
    room = Headroom(int(room_mib * 2**20) + fp.fixed, "a test")
    return _fit_experts(plan, room, cfg, RuntimeOptions(**options), device)  # type: ignore[arg-type]


def test_the_advice_lowers_cache_experts_or_drops_what_forbids_a_fit() -> None:
    """Slots of 12 MiB, 16 MiB kept as margin: 16 + 3 * 4 * 12 MiB left over fit three
    slots per layer; 16 + 5 * 12 fit five in one global pool; 16 + 12 not even top_k = 2."""
    per_layer_3, global_5, nothing = 16 + 3 * 4 * 12 + 1, 16 + 5 * 12 + 1, 16 + 12
    assert advice(per_layer_3, cache_experts=4) == \
        "try --cache-experts 3 (cache_experts=3): 12 expert slots, 3 per layer"
    assert advice(global_5, cache_experts=4).startswith(
        "drop --cache-experts (cache_experts=) and try --cpu-memory ")
    assert advice(global_5, offload=False).startswith(
        "drop --no-offload (offload=False) and try --cpu-memory ")
    assert advice(global_5).endswith(": 5 expert slots in one global pool")
    assert advice(per_layer_3, pool="global").endswith(": 12 expert slots in one global pool")
    assert advice(nothing).startswith("not even 2 expert slots fit")


MAPS = """\
555555554000-555555556000 r--p 00000000 08:01 1 /usr/bin/python3
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
7f0000021000-7f0004000000 ---p 00000000 00:00 0
7f0004000000-7f0004100000 rw-p 00000000 00:00 0
7f0004100000-7f0008000000 ---p 00000000 00:00 0
7f0008000000-7f0008001000 rw-p 00000000 00:00 0
7f0009000000-7f000a000000 ---p 00000000 00:00 0
7f1000001000-7f1000002000 rw-p 00000000 00:00 0
7f1000002000-7f1004001000 ---p 00000000 00:00 0
"""


def test_arenas_already_mapped_are_not_counted_again() -> None:
    """Two heaps of 64 MiB on 64 MiB boundaries count; a gap, or a start off the boundary,
    does not. The advice subtracts only arenas still to be made (counting a thread's arena
    twice left no room for the suggestion)."""
    from offload_rt.engine import out_of_memory as oom

    assert oom._arena_heaps(MAPS) == 2
    have = oom._arena_heaps(Path("/proc/self/maps").read_text())
    wanted = torch.get_num_threads()
    assert oom.missing_arena_bytes() == max(0, wanted - have) * oom.ARENA_ADDRESS_SPACE


def test_the_prefetch_threads_stacks_are_left_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI failure (stop 22): the advice's budget ran out of address space on its first
    expert reads; the prefetch threads start after the slots are allocated, and their stacks
    (8 MiB each by default) were not left free. Now each one's is."""
    from offload_rt.engine import out_of_memory as oom
    from offload_rt.engine.prefetch import PREFETCH_READERS

    monkeypatch.setattr(oom.threading, "stack_size", lambda: 3 * 2**20)
    assert oom.thread_stack_bytes() == PREFETCH_READERS * 3 * 2**20
    monkeypatch.setattr(oom.threading, "stack_size", lambda: 0)
    monkeypatch.setattr(oom.resource, "getrlimit", lambda which: (5 * 2**20, -1))
    assert oom.thread_stack_bytes() == PREFETCH_READERS * 5 * 2**20
    monkeypatch.setattr(oom.resource, "getrlimit",
                        lambda which: (oom.resource.RLIM_INFINITY, oom.resource.RLIM_INFINITY))
    assert oom.thread_stack_bytes() == PREFETCH_READERS * oom.DEFAULT_STACK


def test_every_read_in_flight_is_planned() -> None:
    """CI failure (stop 22): the work memory planned two expert reads in flight (the forward's
    and one prefetch thread's) while the engine runs PREFETCH_READERS prefetch threads."""
    from offload_rt.engine import work_memory
    from offload_rt.engine.prefetch import PREFETCH_READERS

    assert work_memory.READERS == 1 + PREFETCH_READERS
