"""Materialize the trunk from a checkpoint: modules built on ``meta``, weights assigned from the
files, so no second copy of the model ever exists in RAM; with ``trunk="int8"`` the attention
projections and LM head quantized tensor by tensor as they are read, or read as int8 from a
folder that stores them so (``quant.trunk_int8``)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from offload_rt.checkpoint import Checkpoint
from offload_rt.model.int8_linear import quantize_rows, use_int8_linears
from offload_rt.model.transformer import Transformer
from offload_rt.process_memory import release_freed_memory
from offload_rt.quant.formats import default_scale_dtype
from offload_rt.tensor_names import int8_trunk_shapes, trunk_shapes

log = logging.getLogger(__name__)

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
                progress: Progress | None = None, trunk: str = "float") -> Transformer:
    """The resident part of the model (everything but experts), in ``dtype`` on ``device``.

    ``trunk="int8"``: the matrices ``tensor_names.int8_trunk_shapes`` names become
    ``Int8Linear``s (scales in ``default_scale_dtype(dtype)``), each quantized as it is read and
    its float copy dropped, so the float trunk is never whole in memory: at most one float
    tensor and one block's temporaries (``int8_linear.quantize_rows``) beside what is built.
    A folder with a stored int8 trunk (``ckpt.int8_trunk``, only with ``trunk="int8"``:
    ``quant.select.select_trunk``) gives its int8 matrices and scales as stored.
    """
    if ckpt.int8_trunk is not None and trunk != "int8":
        raise ValueError(f"{ckpt.model_dir} stores an int8 trunk: build it with trunk='int8' "
                         "(quant.select.select_trunk)")
    model = Transformer(ckpt.config, device="meta")
    scale_dtype = _scale_dtype(ckpt, dtype)
    quantized = _int8_matrices(ckpt, model, dtype, scale_dtype) if trunk == "int8" else set()
    names = list(trunk_shapes(ckpt.config))
    state = {}
    for i, canonical in enumerate(names):
        if canonical in quantized:
            module = parameter_name(canonical).removesuffix(".weight")
            q, scale = _int8_matrix(ckpt, canonical, dtype, scale_dtype)
            state[f"{module}.weight"], state[f"{module}.scale"] = q.to(device), scale.to(device)
        else:
            state[parameter_name(canonical)] = ckpt.read(canonical, dtype).to(device)
        if progress is not None:
            progress(i + 1, len(names))
    if ckpt.config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _scale_dtype(ckpt: Checkpoint, dtype: torch.dtype) -> torch.dtype:
    """An int8 trunk's scale dtype: the folder's when it stores one, else
    ``default_scale_dtype(dtype)``."""
    stored = ckpt.int8_trunk
    return stored.scale_dtype if stored is not None else default_scale_dtype(dtype)


def _int8_matrix(ckpt: Checkpoint, canonical: str, dtype: torch.dtype,
                 scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One int8 trunk matrix: (int8 [out, in], scale [out]) as the folder stores it, or
    quantized from its float weight read in ``dtype`` (whose pages are then given back)."""
    if ckpt.int8_trunk is not None:
        return ckpt.read_int8(canonical)
    tensor = ckpt.read(canonical, dtype)
    q, scale = quantize_rows(tensor, scale_dtype)
    del tensor
    release_freed_memory()  # the float copy's pages, not only its allocation
    return q, scale


def _int8_matrices(ckpt: Checkpoint, model: Transformer, dtype: torch.dtype,
                   scale_dtype: torch.dtype) -> set[str]:
    """Swap ``model``'s int8 trunk matrices (on ``meta``) for ``Int8Linear``s; their names."""
    quantized = set(int8_trunk_shapes(ckpt.config))
    if ckpt.config.tie_word_embeddings:
        log.info("%s: the LM head is tied to the embeddings (tie_word_embeddings), so it stays "
                 "in %s with --trunk int8", ckpt.model_dir, str(dtype).removeprefix("torch."))
    use_int8_linears(model, [parameter_name(c).removesuffix(".weight") for c in quantized],
                     scale_dtype)
    return quantized
