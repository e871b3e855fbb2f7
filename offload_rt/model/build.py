"""Materialize the trunk from a checkpoint: modules built on ``meta``, weights assigned from the
files, so no second copy of the model ever exists in RAM."""

from __future__ import annotations

from collections.abc import Callable

import torch

from offload_rt.checkpoint import Checkpoint
from offload_rt.model.transformer import Transformer
from offload_rt.tensor_names import trunk_shapes

_ATTN = ("wq", "wk", "wv", "wo")


def parameter_name(canonical: str) -> str:
    """Canonical tensor name -> parameter name in ``Transformer``."""
    if canonical.startswith("layers."):
        _, index, part = canonical.split(".", 2)
        return f"layers.{index}.attn.{part}.weight" if part in _ATTN \
            else f"layers.{index}.{part}.weight"
    return f"{canonical}.weight"


Progress = Callable[[int, int], None]  # (done, total) tensors or experts


def build_trunk(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device | str,
                progress: Progress | None = None) -> Transformer:
    """The resident part of the model (everything but experts), in ``dtype`` on ``device``."""
    model = Transformer(ckpt.config, device="meta")
    names = list(trunk_shapes(ckpt.config))
    state = {}
    for i, canonical in enumerate(names):
        state[parameter_name(canonical)] = ckpt.read(canonical, dtype).to(device)
        if progress is not None:
            progress(i + 1, len(names))
    if ckpt.config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)

