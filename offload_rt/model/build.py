"""Materialize the trunk from a checkpoint: modules built on ``meta``, weights assigned from the
files, so no second copy of the model ever exists in RAM."""

from __future__ import annotations

from collections.abc import Callable

import torch

from offload_rt.checkpoint import Checkpoint
from offload_rt.model.transformer import Transformer
from offload_rt.tensor_names import trunk_shapes

# Canonical layer part -> its parameter in ``Block`` (the rest: ``<part>.weight``).
_PARAMETERS = {
    **{w: f"attn.{w}.weight" for w in ("wq", "wk", "wv", "wo")},
    **{f"b{p}": f"attn.w{p}.bias" for p in "qkv"},
    "q_norm": "attn.q_norm.weight", "k_norm": "attn.k_norm.weight",
    **{f"shared_{w}": f"shared.{w}.weight" for w in ("w1", "w3", "w2", "gate")},
}


def parameter_name(canonical: str) -> str:
    """Canonical tensor name -> parameter name in ``Transformer``."""
    if canonical.startswith("layers."):
        _, index, part = canonical.split(".", 2)
        return f"layers.{index}.{_PARAMETERS.get(part, part + '.weight')}"
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

