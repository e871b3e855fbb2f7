"""int4 packings (``offload_rt/quant/int4_layout.py``): a record's scheme comes from its layout
fingerprint, matches what torch packs under each instruction set, and the dequantize + GEMM path
follows the record's packing whatever CPU runs it (AVX2 and AVX-512 pack differently).

torch picks its int4 packer by the instruction set it dispatches to, which
``ATEN_CPU_CAPABILITY`` lowers: each capability up to this CPU's runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from offload_rt.quant import int4_layout, kernels
from offload_rt.quant.formats import Int4Format
from offload_rt.quant.int4 import (
    cpu_layout,
    dequantize_int4,
    layout_fingerprint,
    layout_probe,
    quantize_int4,
)

CAPABILITIES = ("default", "avx2", "avx512")
PROBE = """
import json, torch
from offload_rt.quant import int4_layout, kernels
from offload_rt.quant.int4 import cpu_layout, dequantize_int4, pack_for_cpu, quantize_int4
layout = cpu_layout()
scheme = int4_layout.scheme_of_layout(layout)
out = {"capability": torch.backends.cpu.get_cpu_capability(), "layout": layout,
       "scheme": scheme, "pack": [], "unpack": []}
gen = torch.Generator().manual_seed(7)
for n, k in ((64, 32), (192, 96), (256, 1024), (1024, 3584)):
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    packed = pack_for_cpu(q)
    out["pack"].append(torch.equal(int4_layout.pack(q, scheme), packed))
    out["unpack"].append(torch.equal(int4_layout.unpack_t(packed, scheme).t(), q.to(torch.uint8)))
w = torch.randn(256, 128, generator=gen) / 128**0.5
q, sz = quantize_int4(w, 32, torch.bfloat16)
x = torch.randn(kernels.INT4_DEQUANT_MIN_ROWS, 128, generator=gen).bfloat16()
want = x.double() @ dequantize_int4(q, sz, 32, torch.float64).T
got = {"kernel": torch.ops.aten._weight_int4pack_mm_for_cpu(x, pack_for_cpu(q), 32, sz),
       "dequant": kernels.int4_mm(x, pack_for_cpu(q), 32, sz, scheme)}
out["error"] = {k: float((v.double() - want).abs().max() / want.abs().max())
                for k, v in got.items()}
print(json.dumps(out))
"""


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_the_layout_fingerprint_names_torchs_packing(capability: str) -> None:
    """Under each instruction set: the scheme found from ``cpu_layout()``'s fingerprint packs
    and unpacks exactly as torch does, and int4_mm's dequantize + GEMM path computes the
    product torch's kernel computes."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, check=True, timeout=300)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    if got["capability"].lower() != capability:
        pytest.skip(f"this CPU does not run torch's {capability} kernels ({got['capability']})")
    assert got["scheme"] is not None, got["layout"]
    assert all(got["pack"]) and all(got["unpack"]), got
    assert got["error"]["kernel"] < 1.6e-2 and got["error"]["dequant"] < 1.6e-2, got["error"]


def _layout_of(scheme: int4_layout.Scheme) -> str:
    return f"other-{layout_fingerprint(int4_layout.pack(layout_probe(), scheme))}"


@pytest.mark.parametrize("scheme", int4_layout.SCHEMES)
def test_dequantization_follows_the_records_layout(scheme: int4_layout.Scheme) -> None:
    """Records packed in each scheme (by fingerprint, whatever this CPU packs): the format
    finds the scheme and the dequantize + GEMM path computes the right product from them."""
    n, k, group = 256, 128, 32
    fmt = Int4Format(k, n, group, torch.float32, _layout_of(scheme))
    assert fmt.scheme == scheme
    gen = torch.Generator().manual_seed(11)
    q, sz = quantize_int4(torch.randn(n, k, generator=gen), group, torch.float32)
    x = torch.randn(kernels.INT4_DEQUANT_MIN_ROWS, k, generator=gen)
    assert kernels.uses_int4_dequant(x, n, fmt.scheme)
    got = kernels.int4_mm(x, int4_layout.pack(q, scheme), group, sz, fmt.scheme)
    want = x.double() @ dequantize_int4(q, sz, group, torch.float64).T
    assert (got.double() - want).abs().max() < 1e-4 * want.abs().max()


def test_an_unknown_fingerprint_never_dequantizes() -> None:
    fmt = Int4Format(128, 256, 32, torch.bfloat16, "avx2-0123456789abcdef")
    assert fmt.scheme is None
    x = torch.zeros(4 * kernels.INT4_DEQUANT_MIN_ROWS, 128, dtype=torch.bfloat16)
    assert not kernels.uses_int4_dequant(x, 256, fmt.scheme)


def test_this_machines_records_name_its_scheme() -> None:
    """The records this machine writes (``cpu_layout()``) carry a fingerprint of a known
    scheme, so int4 prefill here takes the dequantize + GEMM path."""
    fmt = Int4Format(128, 256, 32, torch.bfloat16)
    assert fmt.cpu_layout == cpu_layout() and fmt.scheme in int4_layout.SCHEMES
