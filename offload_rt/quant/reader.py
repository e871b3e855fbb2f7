"""Expert readers for any format: records copied as bytes, or float experts quantized as read.

``reader_for`` picks one: a quantized folder's records, and float experts run as float, are read
by ``ExpertReader`` (straight into the slot, by ``O_DIRECT`` where placed at the file's phase);
float experts run as int8/int4 (``--experts`` on a float folder) by ``QuantizingReader``, which
reads the three float matrices into a scratch buffer and encodes the record into the slot. The
cache, the budget and the host -> device link then hold and move records; the disk still
reads float bytes (``nbytes``, what ``bytes_from_disk`` counts). An fp8 checkpoint's experts
are read by ``quant.fp8_reader.Fp8Reader`` (its six tensors into the record).
"""

from __future__ import annotations

import torch

from cache_policies import ExpertKey
from offload_rt.checkpoint import Checkpoint
from offload_rt.engine.expert_reader import ExpertReader
from offload_rt.engine.placement import ExpertPlacement
from offload_rt.engine.slots import SlotPool
from offload_rt.quant.formats import ExpertFormat
from offload_rt.quant.fp8 import Fp8Format
from offload_rt.quant.fp8_reader import Fp8Reader

CPU = torch.device("cpu")


class QuantizingReader:
    """``reader(key, out)``: expert ``key``'s float matrices from ``ckpt`` encoded by ``fmt``
    into ``out`` (uint8, ``fmt.nbytes``, in place: ``encode_into``). Thread-safe: each call
    reads into its own scratch buffer (one float expert in the file's dtype, placed at its
    file phase so an ``O_DIRECT`` read lands in place), freed when the call returns."""

    def __init__(self, ckpt: Checkpoint, fmt: ExpertFormat, *, direct: bool) -> None:
        self.ckpt, self.fmt = ckpt, fmt
        self.float_reader = ExpertReader(ckpt, direct=direct)
        self.scratch_dtype = ckpt.expert(0, 0).parts[0].dtype  # no conversion on the way
        self._placement = ExpertPlacement(ckpt, self.scratch_dtype, CPU)

    @property
    def direct_matrices(self) -> int:
        """Matrices the disk wrote straight into a scratch buffer (statistics)."""
        return self.float_reader.direct_matrices

    def nbytes(self, key: ExpertKey) -> int:
        """Bytes of ``key`` in its file: its float matrices."""
        return self.float_reader.nbytes(key)

    def __call__(self, key: ExpertKey, out: torch.Tensor) -> None:
        h, f = self.ckpt.config.hidden_size, self.ckpt.config.intermediate_size
        scratch = SlotPool(1, 3 * h * f, self.scratch_dtype, CPU)
        packed = scratch.place(0, self._placement.read_phase(key))
        self.float_reader(key, packed)
        w1, w3, w2 = packed[:f * h].view(f, h), packed[f * h:2 * f * h].view(f, h), \
            packed[2 * f * h:].view(h, f)
        self.fmt.encode_into(out, w1, w3, w2)


def reader_for(ckpt: Checkpoint, fmt: ExpertFormat, *, direct: bool
               ) -> ExpertReader | QuantizingReader | Fp8Reader:
    """The reader that fills ``fmt``'s slots from ``ckpt``: ``Fp8Reader`` for an fp8
    checkpoint's experts, ``QuantizingReader`` when the folder holds float experts and
    ``fmt`` is quantized, else ``ExpertReader``."""
    if isinstance(fmt, Fp8Format):
        return Fp8Reader(ckpt, fmt, direct=direct)
    if ckpt.quantization is None and fmt.name != "float":
        return QuantizingReader(ckpt, fmt, direct=direct)
    return ExpertReader(ckpt, direct=direct)
