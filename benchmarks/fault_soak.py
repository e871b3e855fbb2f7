"""Soak: load / generate / cancel / drop, many cycles in this one process; RSS and threads must
stay flat. Prints JSON: RSS (MiB) and live threads after every ``--every`` cycles, and the
growth from the first sample (after the warm-up cycles) to the last.

Each cycle loads the model (offloaded, prefetching), streams a generation from a second
thread, cancels it from this one after its first piece, then drops the runtime: every third
cycle without ``close()`` (only the garbage collector can free it), the others with it; every
fifth cycle instead starts a load that fails after the prefetch thread started (the KV cache
allocation raises). Usage:

    python benchmarks/fault_soak.py [MODEL_DIR] [--cycles 1000] [--every 100] [--cache-experts 4]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import psutil

import offload_rt
from offload_rt.model.transformer import Transformer

WARMUP = 20  # allocator pools and lazy imports settle first


def generate_and_cancel(rt: offload_rt.Runtime) -> None:
    started = threading.Event()
    done: list[BaseException | None] = []

    def consume() -> None:
        try:
            for _ in rt.stream([1, 2, 3, 4, 5, 6, 7, 8], max_new_tokens=64, ignore_eos=True):
                started.set()
        except BaseException as exc:  # noqa: BLE001 - reported below
            done.append(exc)
        started.set()

    worker = threading.Thread(target=consume)
    worker.start()
    started.wait(60)
    rt.cancel()
    worker.join(60)
    if worker.is_alive() or (done and done[0] is not None):
        raise RuntimeError(f"generation did not end cleanly: {done}")


def failed_load(model: Path, options: dict[str, Any]) -> None:
    real = Transformer.attach

    def attach_fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory (injected)")

    Transformer.attach = attach_fails  # type: ignore[method-assign]
    try:
        offload_rt.load(model, **options)
    except (offload_rt.OffloadError, RuntimeError):  # BudgetError; RuntimeError before issue 18
        pass
    finally:
        Transformer.attach = real  # type: ignore[method-assign]


def cycle(i: int, model: Path, options: dict[str, Any]) -> None:
    if i % 5 == 4:
        failed_load(model, options)
        return
    rt = offload_rt.load(model, **options)
    generate_and_cancel(rt)
    if i % 3:
        rt.close()
    del rt


def settle() -> None:
    """A dropped runtime's prefetch thread is told to stop as the runtime is freed and ends a
    moment later: wait (5 s at most) so a sample counts only threads that really leaked."""
    deadline = time.monotonic() + 5
    for thread in threading.enumerate():
        if thread.name == "offload-rt-prefetch":
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", type=Path,
                        default=Path(offload_rt.__file__).parent / "demo_model")
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--cache-experts", type=int, default=4)
    args = parser.parse_args()
    options = {"cache_experts": args.cache_experts, "prefetch": 2, "max_seq_len": 128}
    proc, samples, start = psutil.Process(), [], time.perf_counter()
    for i in range(WARMUP + args.cycles):
        cycle(i, args.model_dir, options)
        if i >= WARMUP and (i - WARMUP) % args.every == 0 or i == WARMUP + args.cycles - 1:
            settle()
            samples.append({"cycle": i - WARMUP, "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                            "threads": threading.active_count(),
                            "open_files": len(proc.open_files())})
    print(json.dumps({"model": str(args.model_dir), "cycles": args.cycles, "options": options,
                      "seconds": round(time.perf_counter() - start, 1), "samples": samples,
                      "rss_growth_mib": round(samples[-1]["rss_mib"] - samples[0]["rss_mib"], 1),
                      "thread_growth": samples[-1]["threads"] - samples[0]["threads"]}))


if __name__ == "__main__":
    main()
