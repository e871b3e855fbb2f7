"""What ``offload-rt quantize`` reads: a float model's config, experts and trunk tensors.

``CheckpointSource`` is a float folder (either layout); a generator of seeded weights
(``benchmarks/synthetic_source.py``) is another ``QuantSource``, so a model larger than the
disk's room for its float copy is written quantized directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from offload_rt import tensor_names as names
from offload_rt.checkpoint import Checkpoint
from offload_rt.config import ModelConfig
from offload_rt.quant.folder_files import files_to_copy, output_config
from offload_rt.quant.formats import ExpertFormat
from offload_rt.safetensors_file import read_tensor


class QuantSource(Protocol):
    """What the writer reads: a float model's config, experts and trunk tensors.

    ``config_file``: the file messages name for the model's shapes; ``model_dir``: the folder
    OUT_DIR must not hold (None for a generator); ``mistral``: the config uses params.json's
    field names."""

    config: ModelConfig
    config_file: Path
    model_dir: Path | None
    mistral: bool

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1, w3 [F, H] and w2 [H, F] as stored (float)."""

    def expert_nbytes(self, layer: int, expert: int) -> int:
        """The stored bytes of one expert's three matrices."""

    def trunk_dtype(self, canonical: str) -> torch.dtype:
        """The stored dtype of a trunk tensor (``tensor_names`` canonical name)."""

    def trunk(self, canonical: str) -> torch.Tensor:
        """A trunk tensor in HF rotary order, as stored."""

    def small_files(self) -> list[Path]:
        """Tokenizer, generation config, model card and licence files to copy."""

    def config_json(self, fmt: ExpertFormat) -> dict[str, Any]:
        """config.json of the output folder, with its ``quantization_config``."""


class CheckpointSource:
    """A float checkpoint folder (either layout) as a ``QuantSource``."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt, self.config, self.model_dir = ckpt, ckpt.config, ckpt.model_dir
        self.mistral = ckpt.layout == names.MISTRAL
        self.config_file = ckpt.model_dir / ("params.json" if self.mistral else "config.json")

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w1, w3, w2 = (read_tensor(info, drop_page_cache=True)
                      for info in self.ckpt.expert(layer, expert).matrices)
        return w1, w3, w2

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return self.ckpt.expert(layer, expert).nbytes

    def trunk_dtype(self, canonical: str) -> torch.dtype:
        return self.ckpt.info(canonical).dtype

    def trunk(self, canonical: str) -> torch.Tensor:
        return self.ckpt.read(canonical)

    def small_files(self) -> list[Path]:
        return files_to_copy(self.ckpt.model_dir)

    def config_json(self, fmt: ExpertFormat) -> dict[str, Any]:
        return output_config(self.ckpt, fmt)
