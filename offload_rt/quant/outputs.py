"""What ``offload-rt quantize`` stores for each expert and each trunk tensor.

Experts (``ExpertOutput``): one U8 record per expert in an int8/int4 format
(``RecordOutput``, docs/quantized_format.md), or the six tensors of an fp8 checkpoint
(``Fp8Output``: w1, w3, w2 in F8_E4M3 and their scales; ``quant.fp8_writer``). Trunk
(``TrunkOutput``): every tensor as stored, or with ``--trunk int8`` the attention projections
and LM head as int8 + scale (``quant.trunk_int8``). Each says which tensors it writes (names,
dtypes, shapes: the shard headers are computed first) and then produces them, and what it
adds to config.json's ``quantization_config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from offload_rt import tensor_names as names
from offload_rt.config import ModelConfig
from offload_rt.errors import CheckpointError
from offload_rt.quant.formats import ExpertFormat
from offload_rt.quant.fp8 import FP8
from offload_rt.quant.fp8_writer import (
    SCALE_SUFFIX,
    compressed_tensors_config,
    quantize_fp8_channel,
)
from offload_rt.quant.trunk_int8 import quantize_matrix, scale_name, trunk_spec
from offload_rt.quant.writer import TensorEntry

Tensors = list[tuple[str, torch.Tensor]]


class ExpertOutput(Protocol):
    """How one expert is written; ``name``: the format, for the summary line."""

    name: str
    nbytes: int  # bytes written per expert
    fmt: ExpertFormat  # the format the folder's experts run as

    def entries(self, layer: int, expert: int) -> tuple[TensorEntry, ...]:
        """The tensors expert (layer, expert) is stored as, in file order."""

    def tensors(self, layer: int, expert: int, w1: torch.Tensor, w3: torch.Tensor,
                w2: torch.Tensor) -> Tensors:
        """(name, tensor) of each entry, from w1, w3 [F, H] and w2 [H, F] as stored."""

    def quantization_config(self, record: dict[str, Any]) -> dict[str, Any]:
        """config.json's ``quantization_config``, given the record format's one."""


@dataclass(frozen=True)
class RecordOutput:
    """One U8 record per expert in ``fmt`` (int8, int4)."""

    fmt: ExpertFormat
    family: str

    @property
    def name(self) -> str:
        spec = self.fmt.spec()
        return spec["format"] + (f" (group size {spec['group_size']})" if "group_size" in spec
                                 else "")

    @property
    def nbytes(self) -> int:
        return self.fmt.nbytes

    def entries(self, layer: int, expert: int) -> tuple[TensorEntry, ...]:
        return (TensorEntry(names.record_name(layer, expert, self.family), torch.uint8,
                            (self.fmt.nbytes,)),)

    def tensors(self, layer: int, expert: int, w1: torch.Tensor, w3: torch.Tensor,
                w2: torch.Tensor) -> Tensors:
        record = self.fmt.encode(w1, w3, w2)
        scales = getattr(self.fmt, "scales", None)
        if scales is not None:
            for w, scale in zip(("w1, w3", "w2"), scales(record), strict=True):
                require_finite(scale, f"layer {layer}, expert {expert}, {w}")
        return [(names.record_name(layer, expert, self.family), record)]

    def quantization_config(self, record: dict[str, Any]) -> dict[str, Any]:
        return record


class NonFiniteWeights(CheckpointError):
    """A source tensor holds NaN or infinity: its quantized copy would be a corrupt folder."""


def require_finite(scale: torch.Tensor, what: str) -> None:
    """``NonFiniteWeights`` naming ``what`` when a quantized row's ``scale`` is not finite
    (every scheme here gives a row holding NaN or infinity a non-finite scale). Checking the
    scales costs nothing next to the weights (bf16 ``isfinite`` over a Mixtral 8x7B matrix:
    ~1 s on 2 cores)."""
    bad = ~torch.isfinite(scale.float())
    if bool(bad.any()):
        raise NonFiniteWeights(f"{what}: {int(bad.sum())} of {scale.shape[0]} rows (output "
                               "channels) hold NaN or infinity, which no quantized format can "
                               "store; the model computes NaN with them: fix the source "
                               "weights (the float folder runs and reports non-finite logits)")


@dataclass(frozen=True)
class Fp8Output:
    """Each expert matrix in F8_E4M3 with a float32 scale per output channel
    (``quant.fp8_writer``); ``ignore``: every other linear module, for the config."""

    cfg: ModelConfig
    ignore: tuple[str, ...]
    fmt: ExpertFormat  # quant.fp8.Fp8Format, channel strategy
    name: str = "fp8"

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries(0, 0))

    def _names(self, layer: int, expert: int) -> list[str]:
        return [names.expert_name(names.HF, layer, expert, w, self.cfg.family)
                for w in names.EXPERT_MATRICES]

    def entries(self, layer: int, expert: int) -> tuple[TensorEntry, ...]:
        shapes = names.expert_shapes(self.cfg)
        out = []
        for w, name in zip(names.EXPERT_MATRICES, self._names(layer, expert), strict=True):
            rows, cols = shapes[w]
            out += [TensorEntry(name, FP8, (rows, cols)),
                    TensorEntry(name.removesuffix("weight") + SCALE_SUFFIX, torch.float32,
                                (rows, 1))]
        return tuple(out)

    def tensors(self, layer: int, expert: int, w1: torch.Tensor, w3: torch.Tensor,
                w2: torch.Tensor) -> Tensors:
        out: Tensors = []
        for name, w in zip(self._names(layer, expert), (w1, w3, w2), strict=True):
            q, scale = quantize_fp8_channel(w)
            require_finite(scale, name)
            out += [(name, q), (name.removesuffix("weight") + SCALE_SUFFIX, scale)]
        return out

    def quantization_config(self, record: dict[str, Any]) -> dict[str, Any]:
        return compressed_tensors_config(list(self.ignore))


def fp8_ignore(cfg: ModelConfig) -> tuple[str, ...]:
    """The module names of every trunk linear layer (2-D tensors but the embedding): what a
    compressed-tensors config's ``ignore`` lists when only the experts are fp8."""
    return tuple(names.file_name(names.HF, c, cfg.family).removesuffix(".weight")
                 for c, shape in names.trunk_shapes(cfg).items() if len(shape) == 2
                 and c != "embed")


@dataclass(frozen=True)
class TrunkOutput:
    """Trunk tensors as stored (``int8`` False) or with the ``int8_trunk_shapes`` matrices as
    int8 + scale in ``scale_dtype`` (``quant.trunk_int8``)."""

    cfg: ModelConfig
    int8: bool
    scale_dtype: torch.dtype

    def quantized(self, canonical: str) -> bool:
        return self.int8 and canonical in names.int8_trunk_shapes(self.cfg)

    def entries(self, canonical: str, stored: torch.dtype,
                shape: tuple[int, ...]) -> tuple[TensorEntry, ...]:
        name = names.file_name(names.HF, canonical, self.cfg.family)
        if not self.quantized(canonical):
            return (TensorEntry(name, stored, shape),)
        return (TensorEntry(name, torch.int8, shape),
                TensorEntry(scale_name(name), self.scale_dtype, (shape[0],)))

    def tensors(self, canonical: str, tensor: torch.Tensor) -> Tensors:
        name = names.file_name(names.HF, canonical, self.cfg.family)
        if not self.quantized(canonical):
            return [(name, tensor)]
        q, scale = quantize_matrix(tensor, self.scale_dtype)
        require_finite(scale, name)
        return [(name, q), (scale_name(name), scale)]

    def quantization_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` (the experts' ``quantization_config``) plus ``trunk`` when int8."""
        return {**config, "trunk": trunk_spec(self.scale_dtype)} if self.int8 else config
