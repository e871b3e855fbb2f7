"""What the hardware allows an expert-offloading decode step, from quantities measured here.

    python benchmarks/physical_limit.py MODEL_DIR [--samples 12] [--experts int8|int4
        [--group-size 64]]   # prints the measured JSON

Measured (this module, in a fresh process; ``decode_bench.py`` runs it in the same benchmark),
for the experts' format of a run (a quantized folder's records, or ``--experts``):
  * ``read_cold_s``: one expert read from disk into a cache slot by offload_rt's own reader as
    the engine reads (``O_DIRECT`` into the slot), every model file evicted from the page cache
    (POSIX_FADV_DONTNEED) before each read; quantizing at load: the float matrices' read only;
  * ``read_warm_s``: the reader of the warm mode (buffered, page cache kept), pages cached;
  * ``encode_s`` (quantizing at load): encoding one expert's float matrices into its record;
  * ``compute_s``: one expert's SwiGLU for one token (the format's ``ffn``).
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


def _parallel_cold_read(ckpt: object, files: list[Path], threads: int, fmt: object,
                        per_thread: int = 4) -> float:
    """Seconds per expert when ``threads`` readers each read ``per_thread`` cold experts at once
    (the engine reads on its prefetch thread and the caller's at the same time; a virtual disk
    may deliver more with several requests in flight)."""
    from concurrent.futures import ThreadPoolExecutor

    from cache_policies import ExpertKey

    cfg = ckpt.config
    keys = _spread(cfg.num_layers, cfg.num_experts, threads * per_thread)
    slots, reader, _, placement = _format_io(ckpt, fmt, threads)

    def work(i: int) -> None:
        for layer, expert in keys[i::threads]:
            key = ExpertKey(layer, expert)
            reader(key, slots.place(i, placement.read_phase(key)))

    drop_page_cache(files)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    return (time.perf_counter() - start) / len(keys)


def _format_io(ckpt: object, fmt: object, slots: int) -> tuple:
    """(slots, cold reader, warm reader, placement) as the engine makes them for ``fmt``'s
    file bytes (``quant.reader.reader_for``): a record read as is, an fp8 checkpoint's tensors,
    or (quantizing at load) the float matrices alone."""
    from offload_rt.engine.placement import ExpertPlacement
    from offload_rt.engine.slots import SlotPool
    from offload_rt.quant.formats import FloatFormat
    from offload_rt.quant.reader import reader_for

    cpu = torch.device("cpu")
    if ckpt.quantization is None and fmt.name not in ("float", "fp8"):  # reads float experts
        fmt = FloatFormat(ckpt.config.hidden_size, ckpt.config.intermediate_size, ckpt.dtype)
    pool = SlotPool(slots, fmt.numel, fmt.storage_dtype, cpu)
    return (pool, reader_for(ckpt, fmt, direct=True), reader_for(ckpt, fmt, direct=False),
            ExpertPlacement.for_format(ckpt, fmt, cpu))


def _encode_s(ckpt: object, fmt: object, repeats: int = 5) -> float | None:
    """Seconds ``fmt`` takes to encode one expert already in RAM (None: nothing to encode)."""
    if ckpt.quantization is not None or fmt.name in ("float", "fp8"):
        return None
    from cache_policies import ExpertKey
    from offload_rt.quant.reader import QuantizingReader

    reader, record = QuantizingReader(ckpt, fmt, direct=False), torch.empty(fmt.nbytes,
                                                                          dtype=torch.uint8)
    h, f = ckpt.config.hidden_size, ckpt.config.intermediate_size
    packed = torch.empty(3 * h * f, dtype=reader.scratch_dtype)
    reader.float_reader(ExpertKey(0, 0), packed)
    w1, w3, w2 = packed[:f * h].view(f, h), packed[f * h:2 * f * h].view(f, h), \
        packed[2 * f * h:].view(h, f)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fmt.encode_into(record, w1, w3, w2)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model_dir: Path, samples: int = 12, compute_repeats: int = 50,
            options: dict | None = None) -> dict:
    """Cold and warm read time of one expert as its file holds it, its encoding when quantized
    at load, and its compute time for one token, in the format ``options`` (``experts``,
    ``group_size``: as ``offload_rt.load``; None: the folder's own) selects."""
    from cache_policies import ExpertKey
    from offload_rt.checkpoint import Checkpoint
    from offload_rt.quant.select import select_format

    options = options or {}
    ckpt = Checkpoint.open(model_dir)
    cfg, files = ckpt.config, model_files(model_dir)
    fmt = select_format(ckpt, options.get("experts"), options.get("group_size"), ckpt.dtype,
                        torch.device("cpu"))
    slots, cold_reader, warm_reader, placement = _format_io(ckpt, fmt, 1)
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
    parallel = {str(q): _parallel_cold_read(ckpt, files, q, fmt) for q in (2, 4)}
    nbytes = out.numel() * out.element_size()
    # fp8: the last expert read (records are made from a checkpoint's tensors, not encoded)
    compute = _compute_s(fmt, cfg.hidden_size, ckpt.dtype, compute_repeats,
                         out.clone() if fmt.name == "fp8" else None)
    rc = _summary(cold)
    best = min([rc["median"], *parallel.values()])
    return {"format": fmt.spec(), "expert_bytes": nbytes, "record_bytes": fmt.nbytes,
            "read_cold_s": rc, "read_warm_s": _summary(warm),
            "read_cold_parallel_s": parallel, "read_cold_effective_s": best,
            "disk_cold_effective_GBps": round(nbytes / best / 1e9, 3),
            "encode_s": _encode_s(ckpt, fmt), "compute_s": _summary(compute),
            "disk_cold_GBps": round(nbytes / rc["median"] / 1e9, 3),
            "num_layers": cfg.num_layers, "num_experts": cfg.num_experts, "top_k": cfg.top_k,
            "torch_threads": torch.get_num_threads()}


def _compute_s(fmt: object, hidden: int, dtype: torch.dtype, repeats: int,
               record: torch.Tensor | None = None) -> list[float]:
    """Seconds of ``fmt.ffn`` on one token: ``record``, else a random expert in the format."""
    gen = torch.Generator().manual_seed(0)
    f = fmt.inter
    if record is None:
        w = [torch.randn(*shape, generator=gen) / shape[1] ** 0.5 for shape in
             ((f, hidden), (f, hidden), (hidden, f))]
        record = fmt.encode(*[m.to(dtype) for m in w])
    x = torch.randn(1, hidden, generator=gen).to(dtype)  # [1, H]: one decode token
    times = []
    with torch.inference_mode():
        for i in range(repeats + 5):
            start = time.perf_counter()
            fmt.ffn(x, record)
            if i >= 5:
                times.append(time.perf_counter() - start)
    return times


def limit(t_res: float, t_read: float, loads: float, overlap: float,
          t_cpu: float = 0.0) -> dict:
    """Seconds-per-token bounds for ``loads`` expert reads of ``t_read`` each per token, each
    also costing ``t_cpu`` seconds of the CPU the step computes on (quantizing at load)."""
    io, cpu = loads * t_read, t_res + loads * t_cpu
    bounds = {"limit": max(cpu, io), "serial": cpu + io,
              "measured_overlap": max(cpu + (1.0 - overlap) * io, io)}
    out = {f"{k}_tokens_per_s": round(1.0 / v, 3) for k, v in bounds.items()}
    out.update(io_s_per_token=round(io, 6), cpu_s_per_token=round(cpu, 6),
               bound_by="disk" if io > cpu else "compute")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure one expert's cold/warm read and "
                                                 "compute time; print JSON.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--samples", type=int, default=12, help="experts read (default 12)")
    parser.add_argument("--experts", choices=("int8", "int4"), help="quantize at load")
    parser.add_argument("--group-size", type=int)
    args = parser.parse_args(argv)
    options = {k: v for k, v in (("experts", args.experts), ("group_size", args.group_size))
               if v is not None}
    print(json.dumps(measure(args.model_dir, args.samples, options=options)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
