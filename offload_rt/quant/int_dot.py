"""The "int8-dot" kernels: activations quantized to int8 per group, integer dot products with
int4 (``int4_dot_mm``) or int8 (``int8_dot_mm``) weights.

torch's weight-only int4 kernel (``aten._weight_int4pack_mm_for_cpu``) converts every weight to
float and multiplies in float32: on this project's AVX-512 machine it runs at ~10 GB/s of
weights on one thread, compute-bound, while the memory delivers 24-27 GB/s. llama.cpp's Q4 x Q8
approach multiplies 4-bit weights by 8-bit activations in integers (``vpdpbusd``: 64
multiply-adds per instruction). This kernel does the same on offload_rt's int4 records as they
are (torch's packing, the record's own scales and zero points, nothing repacked), in C
(``native/int_dot.c``, built on first use: ``quant.native``).

Per row t of x and group G of the weights' group size g:

    amax = max |x[t, G]|;  sx = amax / 127;  xq = clamp(rint(x * (127 / amax)), -127, 127)
    X = sum xq;  J[n] = sum xq * q[n] - 8 X        (exact int32; w = (q - 8) * scale + zero)
    out[t, n] = sum over G, in order, of  sx * (float(J) * scale[G, n] + float(X) * zero[G, n])

in float32, each operation rounded on its own (the C is built with ``-ffp-contract=off``), then
rounded to x's dtype. A group that is all zeros gives sx = 0; one holding NaN or infinity gives
NaN outputs. Because the sums are integers and the float steps are fixed, the AVX-512 VNNI path,
the AVX2 path (``vpmaddubsw`` + ``vpmaddwd``: torch's AVX-512 and AVX2 packings), the portable C
path and ``int4_reference`` (torch) give the same bits on every machine
(``tests/test_int_dot.py``). It is not the bits of torch's kernel: the activations lose
precision to int8 (measured in the README's quality table), so it is a choice a run makes
(``--quant-kernel int8-dot``), applied the same to resident and offloaded experts.

int8 weights (int8 experts, an int8 trunk: one scale per output channel) are multiplied the same
way, with the activations' group ``int8_group(K)`` (128 input channels where K allows):

    out[t, n] = (sum over G, in order, of sx * float(sum_{k in G} xq * w[n, k])) * scale[n]

On AVX-512 VNNI each row of w is one stream of ``vpdpwssd`` (32 products per instruction).
torch's ``aten._weight_int8pack_mm`` reads ~8 GB/s on one thread on the benchmark machine; this
~19 (``benchmarks/int_dot_bench.py``).
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from offload_rt.quant import native
from offload_rt.quant.int4_layout import Scheme

log = logging.getLogger(__name__)

NAME = "int8-dot"
# the C code's paths (``path=`` of the kernels: "best" is this CPU's fastest; tests force others)
PATHS = {"best": 0, "portable": 1, "avx2": 2, "vnni": 3}
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = native.library("int_dot", f"--quant-kernel {NAME}")
    lib.ort_quantize_rows.argtypes = [_ptr, _int, _i64, _i64, _i64, _ptr, _ptr, _ptr]
    lib.ort_int4_dot.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _i64, _int, _int,
                                 _ptr, _int, _ptr, _int, _int, _int]
    lib.ort_int4_dot_path.argtypes = [_int, _int, _int]
    lib.ort_int8_dot.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _int, _ptr,
                                 _int, _int, _int]
    lib.ort_int8_dot_path.argtypes = [_i64, _int]
    if lib.ort_int8_dot_path(128, 0) == PATHS["portable"]:
        log.warning("--quant-kernel %s: this CPU has neither AVX-512 VNNI nor AVX2, so the "
                    "kernels run their portable C loop: the same results, but slower than the "
                    "vector paths and possibly than torch's kernels", NAME)
    return lib


def load() -> None:
    """Build (first use) and load the kernel now: ``native.KernelBuildError`` if it cannot."""
    _lib()


def int8_group(k: int) -> int:
    """The activations' group for int8 weights of K input channels: 128, 64 or 32 where one
    divides K (the vector path's sizes), else K's largest divisor up to 256."""
    return next(d for d in (128, 64, 32, *range(min(k, 256), 0, -1)) if k % d == 0)


def _path_name(code: int) -> str | None:
    return next((name for name, c in PATHS.items() if c == code), None)


def int8_path(k: int, path: str = "best") -> str | None:
    """The path this CPU runs int8 weights of K input channels on ("vnni": AVX-512 VNNI,
    "avx2", "portable": plain C) when ``path`` is asked for; None if it lacks that one."""
    return _path_name(_lib().ort_int8_dot_path(int8_group(k), PATHS[path]))


def int4_path(scheme: Scheme, path: str = "best") -> str | None:
    """The path for int4 records packed in ``scheme``, as ``int8_path`` (the vector paths
    read torch's AVX-512 and AVX2 packings, "vnni" the AVX-512 one only)."""
    return _path_name(_lib().ort_int4_dot_path(scheme[0], scheme[1] == "pairs", PATHS[path]))


def int4_dot_mm(x: torch.Tensor, w: torch.Tensor, group: int, sz: torch.Tensor,
                scheme: Scheme, path: str = "best") -> torch.Tensor:
    """x [T, K] (bfloat16, float16 or float32, CPU), w packed uint8 [N, K/2] in ``scheme``, sz
    [K/G, N, 2] (scale, zero; bfloat16, float16 or float32) -> [T, N] in x's dtype (module
    docstring). ``path`` forces one of ``PATHS`` (tests; ValueError if this CPU lacks it)."""
    t, k = x.shape
    n = w.shape[0]
    _check_dtypes("int4_dot_mm", x, sz)
    if k % group or group % 8 or group > 256 or n % scheme[0] or w.shape[1] * 2 != k:
        raise ValueError(f"int4_dot_mm: x [{t}, {k}], w {list(w.shape)}, group {group} and "
                         f"packing {scheme} do not fit")
    x, w, sz = x.contiguous(), w.contiguous(), sz.contiguous()
    xq, sx, xs = _quantized_rows(x, group)
    out, bf16 = _output(x, n)
    failed = _lib().ort_int4_dot(xq.data_ptr(), sx.data_ptr(), xs.data_ptr(), t, k, group,
                                 w.data_ptr(), n, scheme[0], scheme[1] == "pairs",
                                 sz.data_ptr(), _DTYPE_CODES[sz.dtype], out.data_ptr(), bf16,
                                 torch.get_num_threads(), PATHS[path])
    if failed == 3:
        raise ValueError(f"int4_dot_mm: this CPU has no {path} path for packing {scheme}")
    assert not failed
    return out if bf16 else out.to(x.dtype)


def _check_dtypes(name: str, x: torch.Tensor, scales: torch.Tensor) -> None:
    if x.dtype not in _DTYPE_CODES or scales.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name} takes bfloat16/float16/float32 x and scales, not "
                        f"{x.dtype} / {scales.dtype}")


def _output(x: torch.Tensor, n: int) -> tuple[torch.Tensor, bool]:
    """The kernels' output [T, n]: bfloat16 written by the C code for bfloat16 x (True),
    float32 otherwise (converted to x's dtype after)."""
    bf16 = x.dtype == torch.bfloat16
    return torch.empty(x.shape[0], n, dtype=torch.bfloat16 if bf16 else torch.float32), bf16


def _quantized_rows(x: torch.Tensor, group: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_activations`` by the C code: (xq, sx, X)."""
    t, k = x.shape
    xq = torch.empty(t, k, dtype=torch.int8)
    sx = torch.empty(t, k // group, dtype=torch.float32)
    xs = torch.empty(t, k // group, dtype=torch.int32)
    _lib().ort_quantize_rows(x.data_ptr(), _DTYPE_CODES[x.dtype], t, k, group, xq.data_ptr(),
                             sx.data_ptr(), xs.data_ptr())
    return xq, sx, xs


def int8_dot_mm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
                path: str = "best") -> torch.Tensor:
    """x [T, K] (bfloat16, float16 or float32, CPU), w int8 [N, K], s [N] (bfloat16, float16 or
    float32) -> x @ (w * s).T [T, N] in x's dtype, activations in int8 per ``int8_group(K)``
    (module docstring). ``path`` forces one of ``PATHS`` (tests; ValueError if this CPU lacks
    it)."""
    t, k = x.shape
    n = w.shape[0]
    _check_dtypes("int8_dot_mm", x, s)
    if w.shape != (n, k) or w.dtype != torch.int8 or s.shape != (n,):
        raise ValueError(f"int8_dot_mm: x [{t}, {k}], w {list(w.shape)} {w.dtype} and scales "
                         f"{list(s.shape)} do not fit")
    x, w, s = x.contiguous(), w.contiguous(), s.contiguous()
    group = int8_group(k)
    xq, sx, _ = _quantized_rows(x, group)
    out, bf16 = _output(x, n)
    failed = _lib().ort_int8_dot(xq.data_ptr(), sx.data_ptr(), t, k, group, w.data_ptr(), n,
                                 s.data_ptr(), _DTYPE_CODES[s.dtype], out.data_ptr(), bf16,
                                 torch.get_num_threads(), PATHS[path])
    if failed == 3:
        raise ValueError(f"int8_dot_mm: this CPU has no {path} path")
    if failed:
        raise MemoryError(f"int8_dot_mm: no memory for {t} x {k} int16 activations")
    return out if bf16 else out.to(x.dtype)


def int8_reference(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``int8_dot_mm``'s result in torch: the bits it must give (tests)."""
    t, k = x.shape
    group = int8_group(k)
    ng = k // group
    xq, sx, _ = quantize_activations(x, group)
    prods = torch.einsum("tgk,ngk->tgn", xq.view(t, ng, group).to(torch.int64),
                         w.view(-1, ng, group).to(torch.int64)).to(torch.float32)
    acc = torch.zeros(t, w.shape[0], dtype=torch.float32)
    for g in range(ng):
        acc = acc + sx[:, g, None] * prods[:, g]
    return (acc * s.float()).to(x.dtype)


def quantize_activations(x: torch.Tensor, group: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, K] -> (xq int8 [T, K], sx float32 [T, K/g], X int32 [T, K/g]) as the module
    docstring says, in torch."""
    t, k = x.shape
    xg = x.float().view(t, k // group, group)
    amax = xg.abs().amax(dim=-1, keepdim=True)  # NaN when the group holds NaN
    finite = torch.isfinite(amax)
    usable = finite & (amax > 0)
    # a true division (``127.0 / tensor`` is reciprocal * 127 in torch: rounded twice)
    inv = torch.where(usable, torch.full_like(amax, 127.0).div(torch.where(usable, amax, 1.0)),
                      0.0)
    xq = torch.round(torch.where(usable, xg, 0.0) * inv).clamp_(-127, 127).to(torch.int8)
    sx = torch.where(usable, amax / 127.0, torch.where(finite, 0.0, float("nan")))
    return xq.view(t, k), sx.view(t, -1), xq.to(torch.int32).sum(dim=-1).to(torch.int32)


def int4_reference(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int
                   ) -> torch.Tensor:
    """The kernel's result in torch, from the unpacked values q [N, K] in 0..15: the bits
    ``int4_dot_mm`` must give (tests)."""
    t, k = x.shape
    n = q.shape[0]
    xq, sx, xsum = quantize_activations(x, group)
    ng = k // group
    prods = torch.einsum("tgk,ngk->tgn", xq.view(t, ng, group).to(torch.int64),
                         q.view(n, ng, group).to(torch.int64))  # exact
    j = (prods - 8 * xsum.to(torch.int64)[..., None]).to(torch.float32)  # [T, G, N]
    scale, zero = sz.float().unbind(-1)  # [G, N] each
    out = torch.zeros(t, n, dtype=torch.float32)
    for g in range(ng):
        a = j[:, g] * scale[g]
        b = xsum[:, g, None].to(torch.float32) * zero[g]
        out = out + sx[:, g, None] * (a + b)
    return out.to(x.dtype)
