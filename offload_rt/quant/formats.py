"""Expert formats: what a record holds and how an expert FFN is computed from it.

| format | record | compute |
| --- | --- | --- |
| float | ``[w1 | w3 | w2]`` flattened, compute dtype | ``model.experts.expert_ffn`` |
| int8 | w13 int8 [2F, H], s13 [2F], w2 int8 [H, F], s2 [H] | ``quant.kernels.int8_mm`` |
| int4 | w13 packed [2F, H/2], sz13 [H/G, 2F, 2], w2 packed [H, F/2], sz2 [F/G, H, 2] | ``quant.kernels.int4_mm`` |
| fp8 | w13 float8_e4m3fn [2F, H], s13 float32, w2 [H, F], s2 (an fp8 checkpoint's; ``quant.fp8``) | dequantized + ``cpu_linear.linear`` |

(w13 is w1 stacked on w3: one matrix product gives gate and up, as the float format does.) The
quantized formats compute in their scale dtype (inputs are cast to it, outputs back). On a CPU
the kernel is chosen by the number of tokens (``quant.kernels``: torch's weight-only kernels
for few rows, the weights dequantized block by block + GEMM for many, a static rule by row
count measured by ``benchmarks/linear_bench.py``; after ``use_kernel("int8-dot")``
offload_rt's int8-activation kernels, ``quant.int_dot``, instead of torch's); on a GPU int8 is
dequantized into a scratch buffer for one GEMM (torch has no CUDA int8 weight-only kernel);
int4 records hold a CPU kernel layout and are refused on a GPU. Every path computes an expert
from its record alone, so resident and offloaded runs of one format stay bit-identical.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from offload_rt.errors import CheckpointError
from offload_rt.model.experts import expert_ffn
from offload_rt.options import QUANT_KERNELS
from offload_rt.quant import int_dot, kernels
from offload_rt.quant.int4 import cpu_layout, pack_for_cpu, quantize_int4
from offload_rt.quant.int4_layout import scheme_of_layout
from offload_rt.quant.int8 import dequantize_int8, quantize_int8
from offload_rt.quant.record import PART_ALIGN, RecordLayout

GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept
NAMES = ("float", "int8", "int4")
ENCODE_BLOCK = 2**20  # weights quantized at a time: bounds encode's float32 temporaries
SCALE_DTYPES = ("bfloat16", "float16", "float32")


class ExpertFormat(Protocol):
    """One expert's storage (``numel`` elements of ``storage_dtype``) and computation."""

    name: str
    storage_dtype: torch.dtype
    numel: int
    alignment: int  # bytes a record's start must be a multiple of (its typed views need it)
    scale_dtype: torch.dtype | None  # what ``ffn`` computes in; None: the input's dtype

    @property
    def nbytes(self) -> int: ...

    def encode(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """Float matrices w1, w3 [F, H], w2 [H, F] -> one record [numel] of storage_dtype."""

    def encode_into(self, record: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                    w2: torch.Tensor) -> None:
        """``encode`` into ``record`` ([numel] of storage_dtype, ``alignment``-aligned) in
        place: the same bytes, without a second record or a copy of the matrices."""

    def ffn(self, x: torch.Tensor, record: torch.Tensor) -> torch.Tensor:
        """SwiGLU expert: x [T, H] (compute dtype) -> [T, H]."""

    def spec(self) -> dict[str, Any]:
        """The format as recorded in a checkpoint's config.json."""


def default_scale_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The scale dtype of experts quantized at load: the compute dtype when it is 16-bit, else
    bfloat16 (scales in 16 bits keep records small; a float32 and a bfloat16 run of one float
    folder then hold the same records)."""
    return compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class FloatFormat:
    """Unquantized: the packed ``[w1 | w3 | w2]`` buffer the engine has always moved."""

    name = "float"
    scale_dtype = None

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype) -> None:
        self.hidden, self.inter, self.storage_dtype = hidden, inter, dtype
        self.numel = 3 * hidden * inter
        self.alignment = _itemsize(dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.storage_dtype)

    def encode(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return torch.cat([w.reshape(-1) for w in (w1, w3, w2)]).to(self.storage_dtype)

    def encode_into(self, record: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                    w2: torch.Tensor) -> None:
        start = 0
        for w in (w1, w3, w2):
            record[start:start + w.numel()].view(w.shape).copy_(w)
            start += w.numel()

    def ffn(self, x: torch.Tensor, record: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x, record, self.hidden, self.inter)

    def spec(self) -> dict[str, Any]:
        return {"format": "float", "dtype": _dtype_name(self.storage_dtype)}


class _QuantizedFormat:
    """Shared by int8 and int4: a uint8 record of named parts, computed in ``scale_dtype``.

    Encoding quantizes a block of rows at a time (about ``ENCODE_BLOCK`` weights; rows are
    independent in both formats), straight into the record's parts, so its float32
    temporaries stay bounded whatever the expert's size (Mixtral 8x7B: ~17 MiB instead of
    ~1.8 GiB) and give the same bytes as whole matrices would (``tests/test_quant_encode.py``).
    """

    storage_dtype = torch.uint8
    alignment = PART_ALIGN
    row_align = 1  # rows per block are a multiple of it (int4: the CPU packer's row blocks)
    layout: RecordLayout
    scale_dtype: torch.dtype
    kernel = "torch"  # or int_dot.NAME (use_kernel): the CPU kernel of few rows

    def use_kernel(self, kernel: str) -> None:
        """Compute with ``kernel`` ("torch" or "int8-dot": ``kernels.int8_mm`` /
        ``kernels.int4_mm``) on the CPU; int8-dot is built now (``native.KernelBuildError`` if
        it cannot be). ValueError for a kernel these records cannot run."""
        if kernel not in QUANT_KERNELS:
            raise ValueError(f"kernel {kernel!r}: choose one of {', '.join(QUANT_KERNELS)}")
        if kernel == int_dot.NAME:
            int_dot.load()
        self.kernel = kernel

    @property
    def numel(self) -> int:
        return self.layout.nbytes

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def encode(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        record = torch.empty(self.nbytes, dtype=torch.uint8)
        self.encode_into(record, w1, w3, w2)
        return record

    def encode_into(self, record: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                    w2: torch.Tensor) -> None:
        v = self.layout.views(record)
        self._rows_into(v["w13"], v["s13"], [w1, w3])  # w13: w1 stacked on w3
        self._rows_into(v["w2"], v["s2"], [w2])
        self.layout.zero_padding(record)

    def _rows_into(self, q: torch.Tensor, s: torch.Tensor, mats: list[torch.Tensor]) -> None:
        """Quantize the rows of ``mats`` (stacked) into the parts ``q`` and ``s`` by blocks;
        in one piece when a block boundary could not fall on a packing block's."""
        k = mats[0].shape[1]
        block = max(1, ENCODE_BLOCK // k // self.row_align) * self.row_align
        if any(m.shape[0] % self.row_align for m in mats):
            mats = [torch.cat(mats)] if len(mats) > 1 else mats
            block = mats[0].shape[0]
        row = 0
        for m in mats:
            for r in range(0, m.shape[0], block):
                self._quantize_rows(q, s, row + r, m[r:r + block])
            row += m.shape[0]

    def _quantize_rows(self, q: torch.Tensor, s: torch.Tensor, row: int, w: torch.Tensor) -> None:
        raise NotImplementedError

    def scales(self, record: torch.Tensor) -> list[torch.Tensor]:
        """The record's scale parts (int8: scales; int4: scales and zero points): non-finite
        exactly when a quantized row held NaN or infinity."""
        v = self.layout.views(record)
        return [v["s13"], v["s2"]]

    def ffn(self, x: torch.Tensor, record: torch.Tensor) -> torch.Tensor:
        v = self.layout.views(record)
        xs = x.to(self.scale_dtype)
        gate, up = self._mm(xs, v["w13"], v["s13"]).chunk(2, dim=-1)  # [T, F] each
        return self._mm(F.silu(gate) * up, v["w2"], v["s2"]).to(x.dtype)

    def _mm(self, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Format(_QuantizedFormat):
    name = "int8"

    def __init__(self, hidden: int, inter: int, scale_dtype: torch.dtype) -> None:
        self.hidden, self.inter, self.scale_dtype = hidden, inter, scale_dtype
        self.layout = RecordLayout([("w13", torch.int8, (2 * inter, hidden)),
                                    ("s13", scale_dtype, (2 * inter,)),
                                    ("w2", torch.int8, (hidden, inter)),
                                    ("s2", scale_dtype, (hidden,))])

    def _quantize_rows(self, q: torch.Tensor, s: torch.Tensor, row: int, w: torch.Tensor) -> None:
        q[row:row + w.shape[0]], s[row:row + w.shape[0]] = quantize_int8(w, self.scale_dtype)

    def _mm(self, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return kernels.int8_mm(x, w, s, self.kernel)
        return F.linear(x, dequantize_int8(w, s, x.dtype))

    def spec(self) -> dict[str, Any]:
        return {"format": "int8", "scale_dtype": _dtype_name(self.scale_dtype)}


class Int4Format(_QuantizedFormat):
    name = "int4"
    row_align = 64  # torch's CPU packer packs blocks of 64 (AVX-512), 32 (AVX2) or 2 rows

    def __init__(self, hidden: int, inter: int, group: int, scale_dtype: torch.dtype,
                 layout: str | None = None) -> None:
        if group not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group}")
        for what, n in (("hidden_size", hidden), ("intermediate_size", inter)):
            if n % group:
                raise ValueError(f"int4 with group size {group} needs {what} ({n}) to be a "
                                 f"multiple of it")
        self.hidden, self.inter, self.group, self.scale_dtype = hidden, inter, group, scale_dtype
        self.cpu_layout = layout or cpu_layout()
        self.scheme = scheme_of_layout(self.cpu_layout)  # how its nibbles are packed (or None)
        self.layout = RecordLayout([("w13", torch.uint8, (2 * inter, hidden // 2)),
                                    ("s13", scale_dtype, (hidden // group, 2 * inter, 2)),
                                    ("w2", torch.uint8, (hidden, inter // 2)),
                                    ("s2", scale_dtype, (inter // group, hidden, 2))])

    def _quantize_rows(self, q: torch.Tensor, s: torch.Tensor, row: int, w: torch.Tensor) -> None:
        values, scale_zero = quantize_int4(w, self.group, self.scale_dtype)  # [n, K], [K/G, n, 2]
        q[row:row + w.shape[0]] = pack_for_cpu(values)
        s[:, row:row + w.shape[0]] = scale_zero

    def use_kernel(self, kernel: str) -> None:
        if kernel == int_dot.NAME and self.scheme is None:
            raise ValueError(f"the int8-dot kernel reads torch's known int4 packings; these "
                             f"records' cpu_layout '{self.cpu_layout}' is none of them")
        super().use_kernel(kernel)

    def _mm(self, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return kernels.int4_mm(x, w, self.group, s, self.scheme, self.kernel)

    def spec(self) -> dict[str, Any]:
        return {"format": "int4", "group_size": self.group,
                "scale_dtype": _dtype_name(self.scale_dtype), "cpu_layout": self.cpu_layout}


def make_format(spec: dict[str, Any] | None, hidden: int, inter: int,
                compute_dtype: torch.dtype, device: torch.device, source: str) -> ExpertFormat:
    """The format a checkpoint's ``spec`` (None: unquantized) describes, checked against this
    machine. ``source`` names the file the spec came from in errors (CheckpointError)."""
    if spec is None or spec.get("format") == "float":
        return FloatFormat(hidden, inter, compute_dtype)
    name = spec.get("format")
    try:
        scale_dtype = _scale_dtype(spec.get("scale_dtype", "bfloat16"))
        if name == "int8":
            return Int8Format(hidden, inter, scale_dtype)
        if name == "int4":
            return _int4_here(spec, hidden, inter, scale_dtype, device, source)
    except (ValueError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"{source}: expert format {spec}: {exc}") from exc
    raise CheckpointError(f"{source}: unknown expert format {name!r} (offload_rt reads float, "
                          "int8 and int4)")


def _scale_dtype(name: object) -> torch.dtype:
    if name not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype {name!r} is not one of {list(SCALE_DTYPES)}")
    return getattr(torch, str(name))


def _int4_here(spec: dict[str, Any], hidden: int, inter: int, scale_dtype: torch.dtype,
               device: torch.device, source: str) -> Int4Format:
    group = spec.get("group_size")
    if isinstance(group, bool) or not isinstance(group, int):
        raise TypeError(f"group_size must be an integer, got {group!r}")
    fmt = Int4Format(hidden, inter, group, scale_dtype, spec.get("cpu_layout"))
    if device.type != "cpu":
        raise CheckpointError(f"{source}: int4 records hold torch's CPU kernel layout; they run "
                              f"on --device cpu only (use int8 experts on {device.type})")
    here = cpu_layout()
    if fmt.cpu_layout != here:
        raise CheckpointError(
            f"{source}: int4 records were packed for CPU kernels '{fmt.cpu_layout}', but torch "
            f"on this machine packs '{here}' (the layout follows the CPU's instruction set): "
            "run offload-rt quantize on this machine, or use int8 experts")
    return fmt
