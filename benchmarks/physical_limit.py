"""What the hardware allows an expert-offloading decode step, from quantities measured here.

    python benchmarks/physical_limit.py MODEL_DIR [--samples 12]   # prints the measured JSON

Measured (this module, in a fresh process; ``decode_bench.py`` runs it in the same benchmark):
  * ``read_cold_s``: one expert read from disk into a cache slot by offload_rt's own reader as
    the engine reads (``O_DIRECT`` into the slot), every model file evicted from the page cache
    (POSIX_FADV_DONTNEED) before each read;
  * ``read_warm_s``: the reader of the warm mode (buffered, page cache kept), pages cached;
  * ``compute_s``: one expert's SwiGLU for one token (offload_rt's ``expert_ffn``).
Taken from the decode runs: ``t_res`` (offload_rt fully resident: seconds per decode step) and,
per offloaded setting, ``loads`` = experts per decode token that had to come from disk (demand
misses + prefetches that were then used; wasted prefetches are not needed work) and the share of
them prefetch actually hid (``overlap``: useful prefetches / loads).

The limit per token (``limit``): the step's compute and the disk are two resources; neither
can finish sooner than its own work, so ``T >= max(t_res, loads * t_read)`` — every load
overlapped with compute by a perfect predictor. ``serial`` is the no-overlap bound
``t_res + loads * t_read``; ``measured_overlap`` is ``max(t_res + (1 - overlap) * loads * t_read,
loads * t_read)`` — what this run's prediction accuracy allows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def model_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def drop_page_cache(paths: list[Path]) -> float:
    """Evict ``paths`` (files, or folders: every file below) from the page cache. Returns s."""
    start = time.perf_counter()
    for path in paths:
        files = [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() \
            else [Path(path)]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return time.perf_counter() - start


def warm_page_cache(paths: list[Path], chunk: int = 64 * 2**20) -> float:
    """Read ``paths`` once so their pages sit in the page cache. Returns seconds."""
    start = time.perf_counter()
    buf = bytearray(chunk)
    for path in paths:
        files = [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() \
            else [Path(path)]
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    return time.perf_counter() - start


def _spread(num_layers: int, num_experts: int, n: int) -> list[tuple[int, int]]:
    """``n`` distinct (layer, expert) pairs spread over the model (deterministic)."""
    keys = [(i, e) for i in range(num_layers) for e in range(num_experts)]
    step = max(1, len(keys) // n)
    return keys[::step][:n]


def _summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _parallel_cold_read(ckpt: object, files: list[Path], threads: int, per_thread: int = 4) -> float:
    """Seconds per expert when ``threads`` readers each read ``per_thread`` cold experts at once
    (the engine reads on its prefetch thread and the caller's at the same time; a virtual disk
    may deliver more with several requests in flight)."""
    from concurrent.futures import ThreadPoolExecutor

    from cache_policies import ExpertKey
    from offload_rt.engine.expert_reader import ExpertReader
    from offload_rt.engine.placement import ExpertPlacement
    from offload_rt.engine.slots import SlotPool

    cfg = ckpt.config
    keys = _spread(cfg.num_layers, cfg.num_experts, threads * per_thread)
    slots = SlotPool(threads, cfg.expert_numel, ckpt.dtype, torch.device("cpu"))
    reader = ExpertReader(ckpt, direct=True)
    placement = ExpertPlacement(ckpt, ckpt.dtype, torch.device("cpu"))

    def work(i: int) -> None:
        for layer, expert in keys[i::threads]:
            key = ExpertKey(layer, expert)
            reader(key, slots.place(i, placement.read_phase(key)))

    drop_page_cache(files)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    return (time.perf_counter() - start) / len(keys)


def measure(model_dir: Path, samples: int = 12, compute_repeats: int = 50) -> dict:
    """Cold and warm read time of one expert, and its compute time for one token."""
    from cache_policies import ExpertKey
    from offload_rt.checkpoint import Checkpoint
    from offload_rt.engine.expert_reader import ExpertReader
    from offload_rt.engine.placement import ExpertPlacement
    from offload_rt.engine.slots import SlotPool
    from offload_rt.model.experts import expert_ffn

    ckpt = Checkpoint.open(model_dir)
    cfg, files = ckpt.config, model_files(model_dir)
    dtype = ckpt.dtype
    slots = SlotPool(1, cfg.expert_numel, dtype, torch.device("cpu"))  # as the engine reads
    cold_reader, warm_reader = ExpertReader(ckpt, direct=True), ExpertReader(ckpt, direct=False)
    placement = ExpertPlacement(ckpt, dtype, torch.device("cpu"))
    cold, warm = [], []
    for layer, expert in _spread(cfg.num_layers, cfg.num_experts, samples):
        key = ExpertKey(layer, expert)
        drop_page_cache(files)
        start = time.perf_counter()
        cold_reader(key, slots.place(0, placement.read_phase(key)))
        cold.append(time.perf_counter() - start)
        out = slots.place(0, placement.read_phase(key))
        warm_reader(key, out)  # now in the page cache
        start = time.perf_counter()
        warm_reader(key, out)
        warm.append(time.perf_counter() - start)
    parallel = {str(q): _parallel_cold_read(ckpt, files, q) for q in (2, 4)}
    x = torch.randn(1, cfg.hidden_size, dtype=dtype)  # [1, H]: one decode token
    times = []
    with torch.inference_mode():
        for i in range(compute_repeats + 5):
            start = time.perf_counter()
            expert_ffn(x, out, cfg.hidden_size, cfg.intermediate_size)
            if i >= 5:
                times.append(time.perf_counter() - start)
    nbytes = out.numel() * out.element_size()
    rc = _summary(cold)
    best = min([rc["median"], *parallel.values()])
    return {"expert_bytes": nbytes, "read_cold_s": rc, "read_warm_s": _summary(warm),
            "read_cold_parallel_s": parallel, "read_cold_effective_s": best,
            "disk_cold_effective_GBps": round(nbytes / best / 1e9, 3),
            "compute_s": _summary(times),
            "disk_cold_GBps": round(nbytes / rc["median"] / 1e9, 3),
            "num_layers": cfg.num_layers, "num_experts": cfg.num_experts, "top_k": cfg.top_k,
            "torch_threads": torch.get_num_threads()}


def limit(t_res: float, t_read: float, loads: float, overlap: float) -> dict:
    """Seconds-per-token bounds for ``loads`` expert reads of ``t_read`` each per token."""
    io = loads * t_read
    bounds = {"limit": max(t_res, io), "serial": t_res + io,
              "measured_overlap": max(t_res + (1.0 - overlap) * io, io)}
    out = {f"{k}_tokens_per_s": round(1.0 / v, 3) for k, v in bounds.items()}
    out.update(io_s_per_token=round(io, 6), bound_by="disk" if io > t_res else "compute")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure one expert's cold/warm read and "
                                                 "compute time; print JSON.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--samples", type=int, default=12, help="experts read (default 12)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.model_dir, args.samples)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
