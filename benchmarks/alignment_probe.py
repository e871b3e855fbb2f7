"""Which weight addresses change a CPU kernel's bits on this machine (evidence for
``offload_rt/engine/placement.py``).

For each dtype and row count, one expert FFN (``expert_ffn``: the kernels offload_rt runs) is
computed on the same numbers placed at byte offsets 0, item, 2 x item, ... 128 past a 4 KiB
boundary, and at the same offsets one and two pages further. It reports the offsets whose
result differs from offset 0 (``differs_within_page``) and whether any offset gave other bits in
another page (``differs_across_pages``: the placement rule assumes it never does). Prints one
JSON document; no timing, so a busy machine does not change it.

    python benchmarks/alignment_probe.py
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

ALIGN = 4096


def _cpu() -> dict[str, object]:
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    keep = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
    return {"model": model, "flags": sorted(f for f in keep if f in flags),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def probe(dtype: torch.dtype, rows: int, hidden: int, inter: int,
          max_offset: int = 128) -> dict[str, object]:
    from offload_rt.model.experts import expert_ffn

    gen = torch.Generator().manual_seed(rows)
    packed = torch.randn(3 * hidden * inter, generator=gen).to(dtype)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    item = packed.element_size()
    storage = torch.empty(packed.numel() + 4 * ALIGN, dtype=dtype)
    base = (-storage.data_ptr()) % ALIGN // item

    def run(offset: int) -> torch.Tensor:
        start = base + offset // item
        buf = storage[start:start + packed.numel()]
        buf.copy_(packed)
        return expert_ffn(x, buf, hidden, inter)

    want = run(0)
    within, across = [], []
    for offset in range(0, max_offset + 1, item):
        first = run(offset)
        if not torch.equal(first, want):
            within.append(offset)
        if any(not torch.equal(run(offset + k * ALIGN), first) for k in (1, 2)):
            across.append(offset)
    return {"dtype": str(dtype).replace("torch.", ""), "rows": rows, "hidden": hidden,
            "intermediate": inter, "differs_within_page": within,
            "differs_across_pages": across}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    results = [probe(dtype, rows, a.hidden, a.intermediate)
               for dtype in (torch.float32, torch.bfloat16, torch.float16)
               for rows in (1, 2, 16, 64)]
    print(json.dumps({"benchmark": "alignment_probe", "cpu": _cpu(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
