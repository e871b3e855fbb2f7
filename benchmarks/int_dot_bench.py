"""The int8-dot kernels against torch's weight-only kernels, weights from memory.

    python benchmarks/int_dot_bench.py [--threads 1] [--repeats 5] [--out r.json]

For each matrix (int4 g64 [w1; w3] and w2 of ``small``, int4 [w1; w3] of Mixtral 8x7B, int8
LM head and [w1; w3] of ``small``) one decode row of x (bf16) is multiplied by torch's kernel
(``aten._weight_int4pack_mm_for_cpu`` / ``aten._weight_int8pack_mm``) and by
``offload_rt.quant.int_dot``'s; each batch runs a kernel over a rotation of copies of the matrix
(``--rotation-mib``, 256 MiB: more than the CPU's caches), the two kernels alternate batch by
batch, and the median microseconds per call of ``--repeats`` batches are reported with the
weight bytes per second. The limit held against them: one core's memory read rate, a float32
sum over 1 GiB measured in the same run (``memory_GBps``). ``--path`` / ``--packing`` time
another of the kernels' paths (AVX2 on an AVX-512 machine, say) or torch's AVX2 int4 packing.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

MATRICES = {  # name: (format, N, K)
    "small int4 w1;w3": ("int4", 7168, 1024), "small int4 w2": ("int4", 1024, 3584),
    "mixtral int4 w1;w3": ("int4", 28672, 4096),
    "small int8 lm_head": ("int8", 32000, 1024), "small int8 w1;w3": ("int8", 7168, 1024)}
GROUP = 64
ROTATION_MIB = 256  # default --rotation-mib


def _batch_us(fns: list[Callable[[], object]]) -> float:
    start = time.perf_counter()
    for f in fns:
        f()
    return (time.perf_counter() - start) / len(fns) * 1e6


def memory_gbps(repeats: int) -> float:
    x = torch.ones(2**28)  # 1 GiB of float32
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return round(x.numel() * 4 / statistics.median(times) / 1e9, 2)


def matrix(fmt: str, n: int, k: int, repeats: int, rotation: int, path: str = "best",
           scheme: tuple[int, str] | None = None) -> dict:
    from offload_rt.quant import int_dot
    from offload_rt.quant.int4 import cpu_layout
    from offload_rt.quant.int4_layout import pack, scheme_of_layout

    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    aten = torch.ops.aten
    if fmt == "int4":
        nbytes = n * k // 2 + k // GROUP * n * 4
        copies = max(2, -(-rotation // nbytes))
        scheme = scheme or scheme_of_layout(cpu_layout())
        assert scheme is not None
        ws = [(pack(torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen), scheme),
               (torch.randn(k // GROUP, n, 2, generator=gen) * 0.01).to(torch.bfloat16))
              for _ in range(copies)]
        kernels = {
            "torch": [lambda w=w, s=s: aten._weight_int4pack_mm_for_cpu(x, w, GROUP, s)
                      for w, s in ws],
            "int8_dot": [lambda w=w, s=s: int_dot.int4_dot_mm(x, w, GROUP, s, scheme, path)
                         for w, s in ws]}
    else:
        nbytes = n * k
        copies = max(2, -(-rotation // nbytes))
        ws8 = [(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen),
                (torch.rand(n, generator=gen) * 0.01).to(torch.bfloat16)) for _ in range(copies)]
        kernels = {
            "torch": [lambda w=w, s=s: aten._weight_int8pack_mm(x, w, s) for w, s in ws8],
            "int8_dot": [lambda w=w, s=s: int_dot.int8_dot_mm(x, w, s, path) for w, s in ws8]}
    for fns in kernels.values():
        _batch_us(fns)  # warm-up (and the kernel library's build)
    us: dict[str, list[float]] = {name: [] for name in kernels}
    for r in range(repeats):
        order = list(kernels)[r % 2:] + list(kernels)[:r % 2]
        for name in order:
            us[name].append(_batch_us(kernels[name]))
    med = {name: round(statistics.median(v), 1) for name, v in us.items()}
    used = int_dot.int4_path(scheme, path) if fmt == "int4" else int_dot.int8_path(k, path)
    return {"format": fmt, "shape": [n, k], "weight_bytes": nbytes, "copies": copies,
            "path": used, **({"packing": list(scheme)} if fmt == "int4" else {}), "us": med,
            "GBps": {name: round(nbytes / v / 1e3, 2) for name, v in med.items()},
            "speedup": round(med["torch"] / med["int8_dot"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--matrices", default=",".join(MATRICES), help="comma-separated names")
    p.add_argument("--rotation-mib", type=int, default=ROTATION_MIB,
                   help="bytes of copies each matrix rotates through (default 256 MiB: more "
                        "than the caches)")
    p.add_argument("--path", default="best", choices=("best", "portable", "avx2", "vnni"),
                   help="the int8-dot kernels' path (default: this CPU's best)")
    p.add_argument("--packing", choices=("64", "32"), default=None,
                   help="int4 records in torch's AVX-512 (64-row) or AVX2 (32-row) packing "
                        "(default: this CPU's)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = [m for m in a.matrices.split(",") if m]
    unknown = [m for m in names if m not in MATRICES]
    if unknown:
        raise SystemExit(f"--matrices: unknown {unknown}; choose of {list(MATRICES)}")
    doc = {"benchmark": "int_dot", "threads": a.threads, "repeats": a.repeats,
           "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "memory_GBps": memory_gbps(a.repeats),
           "rotation_mib": a.rotation_mib,
           "matrices": {m: matrix(*MATRICES[m], a.repeats, a.rotation_mib * 2**20, a.path,
                                  (int(a.packing), "halves") if a.packing else None)
                        for m in names}}
    text = json.dumps(doc)
    if a.out:
        a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
