"""What an fp8 checkpoint's ``quantization_config`` says about its weights (docs/model_fields.md).

Two writers' configs are read; both store a quantized linear's weight as ``<name>.weight``
(``F8_E4M3``, [N, K]) next to a scale tensor, and w = weight.float() * scale (the scale repeated
over its block of the weight; ``quant.fp8``):

* compressed-tensors (llm-compressor; vLLM's format), ``"quant_method": "compressed-tensors"``
  with ``"format": "float-quantized"`` (older writers: ``"naive-quantized"``): each
  ``config_groups`` entry's ``weights`` has ``type: float``, ``num_bits: 8``,
  ``symmetric: true`` and a ``strategy``: ``tensor`` (``weight_scale`` [1]), ``channel``
  ([N, 1]) or ``block`` (``block_structure`` [bn, bk]: [ceil(N/bn), ceil(K/bk)]). Source:
  compressed_tensors' ``initialize_qparams`` (scale shapes) and ``_dequantize``
  (``x_q.to(scale.dtype) * scale``); symmetric zero points are not saved.
* transformers' ``"quant_method": "fp8"`` (``FineGrainedFP8Config``: DeepSeek-V3, Qwen3 FP8):
  ``weight_scale_inv`` [ceil(N/bn), ceil(K/bk)] for ``weight_block_size`` [bn, bk] (despite its
  name, a multiplier: transformers' ``Fp8Dequantize``); without ``weight_block_size`` (AutoFP8,
  e.g. Neural Magic's Mixtral FP8 checkpoints) one per-tensor scale, ``weight_scale`` [] or
  ``weight_scale_inv`` [].

Activations are not quantized here: experts and the trunk compute in the compute dtype from the
dequantized weights (W8A16, the reference ``tests/test_quant_fp8.py`` checks). Dynamic
activation quantization (``input_activations.dynamic: true``, ``activation_scheme: dynamic``)
stores nothing (its scales are computed from each token at run time by a W8A8 kernel), so
the checkpoint's model is its dequantized weights and is computed exactly. Static activation
quantization stores calibrated ``input_scale`` tensors that clip and round every input: a
part of the model this runtime would drop, so it is refused by name; so is every other
variant (another format or type, asymmetric weights, groups, KV cache or output quantization,
sparsity, transforms, ``ue8m0`` scales, fp4 experts). Each refusal is a ``CheckpointError``
naming config.json and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offload_rt.errors import CheckpointError
from offload_rt.quant.fp8 import STRATEGIES

CT_FORMATS = ("float-quantized", "naive-quantized")
CT_STATUSES = (None, "compressed", "frozen")  # frozen: older writers, weights already fp8


@dataclass(frozen=True)
class Fp8Scheme:
    """An fp8 checkpoint's weights: ``strategy`` (tensor, channel or block), ``block``
    ([rows, cols] per scale, block strategy only), the suffixes a weight's scale tensor may
    have (``weight_scale``...), and the config.json it came from."""

    method: str
    strategy: str
    block: tuple[int, int] | None
    scale_suffixes: tuple[str, ...]
    source: Path

    @property
    def scale_endings(self) -> tuple[str, ...]:
        """Tensor name endings of the scales (``.weight_scale``...)."""
        return tuple("." + s for s in self.scale_suffixes)

    def spec(self) -> dict[str, Any]:
        """The experts' format as ``quant.fp8.Fp8Format`` takes it (and statistics show it)."""
        spec: dict[str, Any] = {"format": "fp8", "strategy": self.strategy}
        if self.block is not None:
            spec["block"] = list(self.block)
        return spec


class _Refusal:
    def __init__(self, path: Path, method: str) -> None:
        self.path, self.method = path, method

    def __call__(self, field: str, why: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: quantization_config.{field}: {why} (quant_method {self.method}); "
            "offload_rt reads fp8 checkpoints with F8_E4M3 weights scaled per tensor, channel "
            "or block, and no static activation scales (docs/model_fields.md)")


def read_fp8_scheme(quant: dict[str, Any], path: Path) -> Fp8Scheme:
    """``quantization_config`` of config.json at ``path`` (a dict whose ``quant_method`` is in
    ``model_fields.FP8_QUANT_METHODS``), checked; ``CheckpointError`` naming the field
    otherwise."""
    method = str(quant["quant_method"])
    bad = _Refusal(path, method)
    if method == "compressed-tensors":
        return _compressed_tensors(quant, path, bad)
    return _transformers_fp8(quant, path, bad)


def _compressed_tensors(quant: dict[str, Any], path: Path, bad: _Refusal) -> Fp8Scheme:
    fmt = quant.get("format")
    if fmt not in CT_FORMATS:
        raise bad("format", f"{fmt!r} is not supported (only {' or '.join(CT_FORMATS)}: fp8 "
                            "weights stored as F8_E4M3)")
    if quant.get("quantization_status") not in CT_STATUSES:
        raise bad("quantization_status", f"{quant.get('quantization_status')!r}: not a saved "
                                         "(compressed) checkpoint")
    for field in ("kv_cache_scheme", "transform_config"):
        if quant.get(field):
            raise bad(field, f"{quant[field]!r}: not supported (KV cache quantization and "
                             "weight transforms are not implemented)")
    sparsity = quant.get("sparsity_config")
    if sparsity and (not isinstance(sparsity, dict) or sparsity.get("format") != "dense"):
        raise bad("sparsity_config", f"{sparsity!r}: sparse weights are not supported")
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise bad("config_groups", f"{groups!r}: expected an object of quantization groups")
    schemes = {_group(name, group, bad) for name, group in groups.items()}
    if len(schemes) > 1:
        raise bad("config_groups", f"groups quantize weights differently ({sorted(schemes)}); "
                                   "offload_rt reads one fp8 weight scheme per checkpoint")
    strategy, block = schemes.pop()
    return Fp8Scheme("compressed-tensors", strategy, block, ("weight_scale",), path)


def _group(name: str, group: object, bad: _Refusal) -> tuple[str, tuple[int, int] | None]:
    """One ``config_groups`` entry: its weights' (strategy, block), after every check."""
    where = f"config_groups.{name}"
    if not isinstance(group, dict):
        raise bad(where, f"{group!r}: expected an object")
    if group.get("format") not in (None, *CT_FORMATS):
        raise bad(f"{where}.format", f"{group['format']!r} is not supported")
    if group.get("output_activations") is not None:
        raise bad(f"{where}.output_activations", "output quantization is not supported")
    _activations(group.get("input_activations"), f"{where}.input_activations", bad)
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise bad(f"{where}.weights", f"{weights!r}: expected the weights' quantization")
    return _weights(weights, f"{where}.weights", bad)


def _activations(args: object, where: str, bad: _Refusal) -> None:
    if args is None:
        return
    if not isinstance(args, dict) or args.get("dynamic") is not True:
        dynamic = args.get("dynamic") if isinstance(args, dict) else args
        raise bad(f"{where}.dynamic", f"{dynamic!r}: static activation quantization "
                                      "(calibrated input_scale tensors) is not supported; "
                                      "only dynamic activations (dynamic: true), which "
                                      "store no scales")


def _weights(args: dict[str, Any], where: str, bad: _Refusal) -> tuple[str, tuple[int, int] | None]:
    expected = {"type": "float", "num_bits": 8, "symmetric": True, "dynamic": False}
    for field, value in expected.items():
        if args.get(field, value) != value:
            raise bad(f"{where}.{field}", f"{args[field]!r} is not supported (fp8 weights are "
                                          f"{field} {value!r})")
    for field in ("group_size", "actorder", "zp_dtype"):
        if args.get(field) not in (None, False):
            raise bad(f"{where}.{field}", f"{args[field]!r} is not supported")
    strategy = args.get("strategy")
    if strategy not in STRATEGIES:
        raise bad(f"{where}.strategy", f"{strategy!r} is not one of {list(STRATEGIES)}")
    if strategy != "block":
        return str(strategy), None
    return "block", _block(args.get("block_structure"), f"{where}.block_structure", bad)


def _block(value: object, where: str, bad: _Refusal) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise bad(where, f"{value!r}: expected [rows, columns], two positive integers")
    return value[0], value[1]


def _transformers_fp8(quant: dict[str, Any], path: Path, bad: _Refusal) -> Fp8Scheme:
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise bad("activation_scheme", f"{scheme!r}: static activation quantization "
                                       "(calibrated input_scale tensors) is not supported; "
                                       "only 'dynamic', which stores no scales")
    for field, value in (("scale_fmt", "float"), ("expert_dtype", "fp8")):
        if quant.get(field, value) != value:
            raise bad(field, f"{quant[field]!r} is not supported (only {value!r})")
    if quant.get("kv_cache_scheme"):
        raise bad("kv_cache_scheme", f"{quant['kv_cache_scheme']!r}: KV cache quantization is "
                                     "not supported")
    suffixes = ("weight_scale_inv", "weight_scale")
    if quant.get("weight_block_size") is None:
        return Fp8Scheme("fp8", "tensor", None, suffixes, path)
    block = _block(quant["weight_block_size"], "weight_block_size", bad)
    return Fp8Scheme("fp8", "block", block, suffixes, path)
