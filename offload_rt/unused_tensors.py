"""Tensors of a model folder that the model does not use: ignored, or refused by name.

The model uses the tensors its config implies (``Checkpoint._expected``) and the scales its
declared quantization reads (an fp8 checkpoint's, an int8 trunk's). Of the rest, buffers some
exporters add that carry no weights (``tensor_names.IGNORED_SUFFIXES``) are ignored. A
quantization scale (a name whose last part holds ``scale``: ``weight_scale``, ``k_scale``,
``qscale_weight``...; the quantized formats' own names are refused earlier, by
``model_fields.check_tensor_names``) is refused naming its file and the tensor: a folder of
quantized weights whose config does not declare it would load as float and compute a wrong
answer without an error. Any other tensor is a sign of another architecture.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from offload_rt.errors import CheckpointError
from offload_rt.quant.folder import QuantizedExperts
from offload_rt.quant.fp8_scheme import Fp8Scheme
from offload_rt.safetensors_file import TensorInfo
from offload_rt.tensor_names import IGNORED_SUFFIXES


def is_scale(name: str) -> bool:
    """Whether tensor ``name`` is named as a quantization scale (its last part holds "scale")."""
    return "scale" in name.rsplit(".", 1)[-1]


def declared_quantization(config: Path, quantization: QuantizedExperts | Fp8Scheme | None
                          ) -> str:
    """What the folder's config file ``config`` says its scales belong to (``check_unused``'s
    ``declared``), from the quantization it declares (None: none)."""
    if isinstance(quantization, Fp8Scheme):
        return (f"{config} declares fp8 weights (quant_method {quantization.method}), whose "
                f"scales end in {list(quantization.scale_endings)} beside F8_E4M3 weights")
    if quantization is not None and quantization.trunk is not None:
        return (f"{config} declares an int8 trunk (quantization_config.trunk), whose scales "
                "belong to the int8 attention projections and LM head only")
    if quantization is not None:
        return (f"{config} declares quantized experts (quantization_config.experts), whose "
                "records hold their own scales, and a float trunk")
    return f"{config} declares no quantization (no quantization_config)"


def check_unused(tensors: dict[str, TensorInfo], used: Collection[str], model_dir: Path,
                 family: str, declared: str) -> None:
    """``CheckpointError`` for a tensor of ``tensors`` that is not in ``used`` nor a buffer
    ``IGNORED_SUFFIXES`` names: a scale first (``declared``: what the folder's config says of
    its quantization, e.g. "config.json declares no quantization"), by file and tensor."""
    unused = sorted(n for n in tensors if n not in used and not n.endswith(IGNORED_SUFFIXES))
    scales = [n for n in unused if is_scale(n)]
    if scales:
        raise _stray_scale(tensors[scales[0]], tensors, declared, len(scales))
    if unused:
        raise CheckpointError(f"{model_dir}: unexpected tensors {unused[:5]} ({len(unused)} in "
                              f"all): not a {family} checkpoint (config.json's model_type)?")


def _stray_scale(scale: TensorInfo, tensors: dict[str, TensorInfo], declared: str,
                 count: int) -> CheckpointError:
    prefix = scale.name.rsplit(".", 1)[0]
    weight = tensors.get(prefix if prefix.endswith(".weight") else prefix + ".weight")
    beside = "" if weight is None else f" beside '{weight.name}' ({weight.dtype})"
    more = f" ({count} such tensors in all)" if count > 1 else ""
    return CheckpointError(
        f"{scale.path}: tensor '{scale.name}' is a quantization scale{beside}, but {declared}"
        f"{more}: read as float, quantized weights would compute a wrong answer. Load the "
        "folder whose config declares its quantization, or remove the tensor")
