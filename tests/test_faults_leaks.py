"""Dropping or failing frees everything (issue 18, item 7): a ``Runtime`` dropped without
``close()`` ends its prefetch thread and frees its slots (before: the thread kept the engine
alive, +340 MiB and +1 thread per load/del round); a load that fails after the prefetch thread
started leaves no thread, no slots, no open weight file, and a retry works."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint
from fault_injection import PREFETCH_THREAD

import offload_rt
import offload_rt.runtime as runtime_module
from offload_rt.engine.offloaded import PREFETCH_READERS
from offload_rt.errors import BudgetError
from offload_rt.model.transformer import Transformer

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC = TinySpec(num_experts=8, top_k=2, num_layers=3, seed=81)
# 3 MiB experts: 12 slots (4 per layer) are 36 MiB a round, so a leak shows in RSS
BIG = TinySpec(num_experts=8, top_k=2, num_layers=3, hidden_size=128, intermediate_size=2048,
               dtype=torch.bfloat16, seed=82)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("leaks"), SPEC)


def prefetch_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == PREFETCH_THREAD and t.is_alive()}


def open_files(folder: Path) -> list[str]:
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return [p for p in paths if p.startswith(str(folder))]


def test_a_dropped_runtime_ends_its_thread_and_frees_its_memory(model_dir: Path) -> None:
    before = prefetch_threads()
    rt = offload_rt.load(model_dir, dtype="float32", cache_experts=2, prefetch=2)
    rt.generate([1, 2, 3, 4], max_new_tokens=6, ignore_eos=True)
    threads = prefetch_threads() - before
    assert len(threads) == PREFETCH_READERS
    engine = weakref.ref(rt.experts)
    slots = weakref.ref(rt.experts.device.slots.storage)  # type: ignore[union-attr]
    del rt  # no close()
    gc.collect()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert engine() is None and slots() is None
    assert open_files(model_dir) == []


def test_a_load_failing_after_the_thread_started_leaves_nothing(
        model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Any] = []
    real_build = runtime_module.build_offloaded

    def build_and_remember(*args: Any, **kwargs: Any) -> Any:
        engine = real_build(*args, **kwargs)
        built.append((weakref.ref(engine), weakref.ref(engine.device.slots.storage)))
        return engine

    def attach_fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "4096 bytes")

    before = prefetch_threads()
    monkeypatch.setattr(runtime_module, "build_offloaded", build_and_remember)
    monkeypatch.setattr(Transformer, "attach", attach_fails)
    with pytest.raises(BudgetError, match="KV cache"):
        offload_rt.load(model_dir, dtype="float32", cache_experts=2, prefetch=2)
    gc.collect()
    assert len(built) == 1  # the engine (and its thread) had been built
    assert all(ref() is None for ref in built[0])
    assert prefetch_threads() - before == set()
    assert open_files(model_dir) == []

    monkeypatch.undo()  # a retry works
    with offload_rt.load(model_dir, dtype="float32", cache_experts=2, prefetch=2) as rt:
        assert len(rt.generate([1, 2, 3], max_new_tokens=3, ignore_eos=True).token_ids) == 3


# A dropped runtime's thread is told to stop as the runtime is freed and ends a moment later:
# each round waits for it (5 s at most; a leaked thread never ends) before counting.
ROUNDS_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import psutil
    import offload_rt

    model, rounds = sys.argv[1], int(sys.argv[2])
    figures = []
    for i in range(rounds):
        rt = offload_rt.load(model, cache_experts=4, prefetch=2)
        rt.generate([1, 2, 3, 4, 5, 6, 7, 8], max_new_tokens=12, ignore_eos=True)
        del rt  # dropped, never closed
        deadline = time.monotonic() + 5
        for t in threading.enumerate():
            if t.name == "offload-rt-prefetch":
                t.join(max(0.0, deadline - time.monotonic()))
        figures.append([psutil.Process().memory_info().rss, threading.active_count()])
    print(json.dumps(figures))
""")


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("leaks_big"), BIG)


def test_load_del_rounds_keep_rss_and_threads_flat(big_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", ROUNDS_SCRIPT, str(big_dir), "6"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = [r for r, _ in figures]
    threads = [t for _, t in figures]
    assert len(set(threads)) == 1, threads  # before: one more thread every round
    slot_bytes = 12 * 3 * 2**20  # one round's slots: 12 x 3 MiB
    assert max(rss[1:]) - rss[1] < slot_bytes, [r >> 20 for r in rss]  # before: +36 MiB a round
