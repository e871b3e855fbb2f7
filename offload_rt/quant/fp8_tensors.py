"""The tensors of an fp8 checkpoint: which weights are F8_E4M3, their scales, checked up front.

A linear layer's weight is quantized when its file dtype is ``F8_E4M3``; its scale is the
tensor beside it with one of the scheme's suffixes (``<prefix>.weight_scale``...), of the shape
the scheme's strategy gives (``quant.fp8``). Which layers are quantized is read from the files
(the config's ``targets`` / ``ignore`` / ``modules_to_not_convert`` name modules in each
writer's own way, and vLLM also reads the files): any of the attention projections, routers,
LM head and experts may be; the experts all or none. Embeddings and norms must be float.
Trunk weights are dequantized at load into the compute dtype (``read_dequantized``); experts
stay fp8 (``quant.fp8_reader``). Every refusal is a ``CheckpointError`` naming the file and
tensor (or config.json and the field).
"""

from __future__ import annotations

from pathlib import Path

import torch

from offload_rt.config import ModelConfig
from offload_rt.errors import CheckpointError
from offload_rt.families.base import EXPERT_MATRICES, TensorNames
from offload_rt.model_fields import FORMATS
from offload_rt.quant.fp8 import FP8, dequantize, scale_block, scale_grid
from offload_rt.quant.fp8_scheme import Fp8Scheme
from offload_rt.safetensors_file import TensorInfo, read_tensor

SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ACTIVATION_SCALES = (".input_scale", ".output_scale", ".k_scale", ".v_scale")
_ASYMMETRIC = (".weight_zero_point",)


def check_header(scheme: Fp8Scheme | None, header: dict[str, TensorInfo], path: Path) -> None:
    """One weight file's header, before its names are checked: without an fp8 scheme no
    tensor may be F8_E4M3 (an fp8 checkpoint whose config.json lost its quantization_config);
    with one, no static activation scales or zero points."""
    if scheme is None:
        fp8 = sorted(name for name, info in header.items() if info.dtype == FP8)
        if fp8:
            raise CheckpointError(f"{path}: tensor '{fp8[0]}' has dtype 'F8_E4M3': a quantized "
                                  "checkpoint whose config.json has no quantization_config "
                                  f"saying how it is scaled; offload_rt reads {FORMATS}")
        return
    for name in sorted(header):
        if name.endswith(_ACTIVATION_SCALES):
            raise CheckpointError(
                f"{path}: tensor '{name}': static activation (or KV cache) scales are not "
                f"supported, although {scheme.source} declares no static activation "
                "quantization; offload_rt computes fp8 weights with unquantized activations")
        if name.endswith(_ASYMMETRIC):
            raise CheckpointError(f"{path}: tensor '{name}': asymmetric fp8 weights (zero "
                                  "points) are not supported")


def _scale_of(scheme: Fp8Scheme, weight: str, tensors: dict[str, TensorInfo]) -> TensorInfo:
    prefix = weight.removesuffix("weight")
    found = [tensors[prefix + s] for s in scheme.scale_suffixes if prefix + s in tensors]
    info = tensors[weight]
    if not found:
        names = " or ".join(f"'{prefix}{s}'" for s in scheme.scale_suffixes)
        raise CheckpointError(f"{info.path}: tensor '{weight}' is F8_E4M3 but its scale {names}"
                              " is missing from the weight files")
    if len(found) > 1:
        raise CheckpointError(f"{info.path}: tensor '{weight}' has two scales, "
                              f"{[s.name for s in found]}: which one applies is ambiguous")
    return found[0]


def _check_scale(scheme: Fp8Scheme, scale: TensorInfo, shape: tuple[int, ...]) -> None:
    rows, cols = shape
    block = scale_block(scheme.strategy, scheme.block, rows, cols)
    grid = scale_grid(rows, cols, block)
    accepted = {"tensor": [(), (1,)], "channel": [(rows, 1), (rows,)],
                "block": [grid]}[scheme.strategy]
    if scale.shape not in accepted:
        shapes = " or ".join(str(list(a)) for a in accepted)
        raise CheckpointError(
            f"{scale.path}: tensor '{scale.name}' has shape {list(scale.shape)}; the "
            f"{scheme.strategy} scale of a {list(shape)} weight is {shapes} ({scheme.source}: "
            "quantization_config)")
    if scale.dtype not in SCALE_DTYPES:
        raise CheckpointError(f"{scale.path}: tensor '{scale.name}' has dtype {scale.dtype}; "
                              "fp8 scales are float32, bfloat16 or float16")


def fp8_scales(scheme: Fp8Scheme, tensors: dict[str, TensorInfo],
               expected: dict[str, tuple[int, ...]], files: TensorNames,
               cfg: ModelConfig) -> dict[str, TensorInfo]:
    """Every F8_E4M3 weight's scale tensor, by weight name, checked: each weight is a linear
    layer's (``expected``: every tensor name -> the shape ``cfg`` implies; ``files``: the
    family's names), every expert matrix or none is fp8, scales have the strategy's shape and
    a float dtype, and no scale belongs to a weight that is not fp8."""
    embed = files.file_name("embed")
    linears = {n: s for n, s in expected.items() if len(s) == 2 and n != embed}
    experts = [files.expert_name(i, e, w) for i in range(cfg.num_layers)
               for e in range(cfg.num_experts) for w in EXPERT_MATRICES]
    fp8 = sorted(n for n, info in tensors.items() if info.dtype == FP8)
    if not fp8:
        raise CheckpointError(f"{scheme.source}: quantization_config (quant_method "
                              f"{scheme.method}) describes fp8 weights, but no tensor in the "
                              "weight files is F8_E4M3")
    scales = {}
    for name in fp8:
        if name not in linears:
            raise CheckpointError(f"{tensors[name].path}: tensor '{name}' is F8_E4M3; only the "
                                  "weights of linear layers (attention, router, LM head, "
                                  "experts) may be fp8")
        if tensors[name].shape != linears[name]:  # as the generic check says it
            raise CheckpointError(f"{tensors[name].path}: tensor '{name}' has shape "
                                  f"{list(tensors[name].shape)}, the config implies "
                                  f"{list(linears[name])}")
        scales[name] = _scale_of(scheme, name, tensors)
        _check_scale(scheme, scales[name], linears[name])
    _check_experts(set(fp8), experts, tensors)
    owned = {s.name for s in scales.values()}
    for name in sorted(tensors):
        if name.endswith(scheme.scale_endings) and name not in owned:
            raise CheckpointError(f"{tensors[name].path}: tensor '{name}' scales a weight that "
                                  "is not F8_E4M3 (or is missing)")
    return scales


def _check_experts(fp8: set[str], experts: list[str], tensors: dict[str, TensorInfo]) -> None:
    quantized = [n for n in experts if n in fp8]
    if quantized and len(quantized) != len(experts):
        odd = next((n for n in experts if n not in fp8 and n in tensors), None)
        if odd is None:  # only missing ones: the generic check names them
            return
        raise CheckpointError(
            f"{tensors[odd].path}: tensor '{odd}' has dtype {tensors[odd].dtype} while other "
            f"experts' matrices (e.g. '{quantized[0]}') are F8_E4M3: offload_rt reads the "
            "experts of a checkpoint in one format")


def read_dequantized(info: TensorInfo, scale: TensorInfo, scheme: Fp8Scheme,
                     dtype: torch.dtype) -> torch.Tensor:
    """An fp8 trunk weight [N, K], dequantized into ``dtype`` (``quant.fp8.dequantize``)."""
    rows, cols = info.shape
    block = scale_block(scheme.strategy, scheme.block, rows, cols)
    scales = _finite(read_tensor(scale).float(), scale).reshape(scale_grid(rows, cols, block))
    return dequantize(read_tensor(info), scales, block, dtype)


def scale_rows(scale: TensorInfo, grid: tuple[int, int], *, drop_page_cache: bool
               ) -> torch.Tensor:
    """An expert matrix's scale tensor as float32 ``grid`` (``quant.fp8_reader``); a scale
    that is inf, NaN or negative is a ``CheckpointError`` naming the tensor when the expert is
    read."""
    return _finite(read_tensor(scale, drop_page_cache=drop_page_cache).float(), scale
                   ).reshape(grid)


def _finite(scales: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """``scales`` unless one is inf or NaN (the weights would compute non-finite logits far
    from the cause) or negative (a scale is a magnitude, absmax / 448: every writer's is >= 0;
    0 is kept, an all-zero row's): ``CheckpointError`` naming the file and tensor."""
    bad = ~torch.isfinite(scales) | (scales < 0)
    if bool(bad.any()):
        value = scales[bad][0].item()
        raise CheckpointError(f"{info.path}: tensor '{info.name}' holds a scale of {value} "
                              f"({int(bad.sum())} of {scales.numel()} not finite or "
                              "negative): the checkpoint is corrupt")
    return scales
