"""make_checkpoint.py's seeded weights as a ``QuantSource``: written quantized directly.

    python benchmarks/make_checkpoint.py mixtral-8x7b --out /tmp/bench/mixtral-int4 \\
        --experts int4 --group-size 128

Mixtral 8x7B's bfloat16 weights (93 GB) do not fit this machine kind's free disk beside their
quantized copy, so ``--experts`` skips the float folder: each layer's tensors are drawn from the
same generators ``write_checkpoint`` uses (so the folder equals ``make_checkpoint`` +
``offload-rt quantize`` byte for byte: ``tests/test_benchmarks_smoke.py`` checks it) and handed
to ``offload_rt.quant.quantize.write_quantized``. Memory: one layer's float tensors (2.8 GB for
Mixtral 8x7B) plus the trunk tensors of the layers not yet written.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from make_checkpoint import Preset, hf_config, layer_tensors, outer_tensors

from offload_rt import tensor_names as names
from offload_rt.config import ModelConfig, config_from_hf
from offload_rt.quant.folder_files import quantization_config
from offload_rt.quant.formats import ExpertFormat


def _config(data: dict[str, Any]) -> ModelConfig:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(data, indent=2))
        return config_from_hf(path)


class SyntheticSource:
    """A preset's seeded weights, one layer drawn at a time (``offload_rt.quant.quantize``'s
    ``QuantSource``). Experts are asked for in layer order, each layer's trunk after them."""

    mistral = False
    model_dir = None

    def __init__(self, preset: Preset, seed: int) -> None:
        self.preset, self.seed = preset, seed
        self.hf = hf_config(preset)
        self.config = _config(self.hf)
        self.config_file = Path(f"<{preset} seed {seed}>/config.json")
        self._hf = names.names_of(names.HF, self.config.family)
        self._names = {self._hf.file_name(c): c for c in names.trunk_shapes(self.config)}
        self._trunk: dict[str, torch.Tensor] = {self._names[n]: t for n, t in
                                                outer_tensors(preset, seed).items()}
        self._layer, self._experts = -1, {}  # type: ignore[var-annotated]

    def _draw(self, layer: int) -> None:
        if layer == self._layer:
            return
        self._experts = {}
        for name, tensor in layer_tensors(self.preset, layer, self.seed):
            if name in self._names:
                self._trunk[self._names[name]] = tensor
            else:
                self._experts[name] = tensor
        self._layer = layer

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._draw(layer)
        w1, w3, w2 = (self._experts.pop(self._hf.expert_name(layer, expert, m))
                      for m in ("w1", "w3", "w2"))
        return w1, w3, w2

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return self.preset.expert_bytes

    def trunk_dtype(self, canonical: str) -> torch.dtype:
        return torch.bfloat16

    def trunk(self, canonical: str) -> torch.Tensor:
        if canonical not in self._trunk:  # a layer whose experts were not asked for first
            self._draw(int(canonical.split(".")[1]))
        return self._trunk.pop(canonical)

    def small_files(self) -> list[Path]:
        return []

    def config_json(self, fmt: ExpertFormat) -> dict[str, Any]:
        return {**self.hf, "quantization_config": quantization_config(fmt)}
