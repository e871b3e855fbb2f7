"""The experts' format of a run: the folder's, or float experts quantized as they are read.

| folder | ``experts`` option | format |
| --- | --- | --- |
| float experts | None or ``float`` | ``FloatFormat`` in the compute dtype |
| float experts | ``int8`` / ``int4`` | quantized at load (``quant.reader``); scales in ``default_scale_dtype`` |
| quantized (config.json ``quantization_config``) | None or its own format | the folder's records |
| quantized | another format | ``OptionError`` naming both (records cannot be turned back into the float weights exactly) |
| fp8 checkpoint, fp8 experts (``Checkpoint.fp8_experts``) | None | ``quant.fp8.Fp8Format`` (its trunk is dequantized at load) |
| fp8 checkpoint, fp8 experts | any | ``OptionError`` naming both, as a quantized folder |

An fp8 checkpoint whose experts are float (only its trunk quantized) is a float folder here.

The trunk's format (``select_trunk``), by the same rule: a float trunk runs as ``--trunk``
says (None: float); a folder's stored int8 trunk (``offload-rt quantize --trunk int8``) runs
as int8, and ``--trunk float`` with it is refused (the float weights are not in the folder).
"""

from __future__ import annotations

import torch

from offload_rt.checkpoint import Checkpoint
from offload_rt.errors import CheckpointError, OptionError
from offload_rt.quant.formats import (
    GROUP_SIZES,
    ExpertFormat,
    FloatFormat,
    Int4Format,
    Int8Format,
    default_scale_dtype,
    make_format,
)
from offload_rt.quant.fp8 import Fp8Format

DEFAULT_GROUP_SIZE = 64


def select_format(ckpt: Checkpoint, experts: str | None, group_size: int | None,
                  dtype: torch.dtype, device: torch.device,
                  quant_kernel: str | None = None) -> ExpertFormat:
    """The format ``ckpt``'s experts run in with the ``--experts``/``--group-size`` options
    (None: the folder's), checked against this machine and ``device``; int8 and int4 experts
    computed with ``--quant-kernel`` (None: torch's). ``OptionError`` naming the flags
    (``native.KernelBuildError`` when the int8-dot kernel cannot be built), or
    ``CheckpointError`` naming the folder's config.json."""
    fmt = _select_format(ckpt, experts, group_size, dtype, device)
    if quant_kernel not in (None, "torch") and isinstance(fmt, (Int8Format, Int4Format)):
        try:
            fmt.use_kernel(quant_kernel)
        except ValueError as exc:
            raise OptionError(f"--quant-kernel {quant_kernel}: {exc}") from exc
    return fmt


def _select_format(ckpt: Checkpoint, experts: str | None, group_size: int | None,
                   dtype: torch.dtype, device: torch.device) -> ExpertFormat:
    cfg = ckpt.config
    h, f = cfg.hidden_size, cfg.intermediate_size
    quant = ckpt.quantization
    if ckpt.fp8 is not None and ckpt.fp8_experts:
        return _fp8_here(ckpt, experts, group_size)
    if quant is not None:
        _check_folder_options(quant.spec, str(quant.source), experts, group_size)
        return make_format(quant.spec, h, f, dtype, device, str(quant.source))
    if experts in (None, "float"):
        return FloatFormat(h, f, dtype)
    scale = str(default_scale_dtype(dtype)).removeprefix("torch.")
    if experts == "int8":
        return make_format({"format": "int8", "scale_dtype": scale}, h, f, dtype, device,
                           "--experts int8")
    if experts == "int4":
        group = DEFAULT_GROUP_SIZE if group_size is None else group_size
        _check_int4_options(ckpt, group, device)
        return make_format({"format": "int4", "group_size": group, "scale_dtype": scale},
                           h, f, dtype, device, f"--experts int4 --group-size {group}")
    if experts == "fp8":
        raise OptionError(f"--experts fp8: {ckpt.model_dir} has no fp8 experts; fp8 runs an fp8 "
                          "checkpoint's own experts (quantizing float experts to fp8 at load is "
                          "not supported): use --experts int8 or int4, or drop --experts")
    raise OptionError(f"--experts {experts!r}: choose one of float, int8, int4, fp8")


def select_trunk(ckpt: Checkpoint, trunk: str | None, device: str) -> str:
    """The trunk format a run of ``ckpt`` uses with the ``--trunk`` option ``trunk`` (None:
    the folder's) on ``device``: "float" or "int8". ``OptionError`` naming the flags and the
    folder's config.json when they contradict its stored int8 trunk."""
    stored = ckpt.int8_trunk
    if stored is None:
        return trunk or "float"
    if trunk not in (None, "int8"):
        raise OptionError(
            f"--trunk {trunk}: {stored.source} holds an int8 trunk (quantization_config.trunk: "
            "attention projections and LM head stored as int8); it runs as int8 only (the "
            "float weights are not in the folder): drop --trunk, or load the float folder")
    if not device.startswith("cpu"):
        raise OptionError(
            f"--device {device}: {stored.source} holds an int8 trunk (quantization_config."
            "trunk), which runs on --device cpu only (torch has no CUDA kernel for int8 "
            "weight-only matrix products); run it on the CPU, or load the float folder")
    return "int8"


def _fp8_here(ckpt: Checkpoint, experts: str | None, group_size: int | None) -> Fp8Format:
    """An fp8 checkpoint's experts, run as fp8 only (its own options' rules: a quantized
    folder's)."""
    assert ckpt.fp8 is not None
    spec, source = ckpt.fp8.spec(), str(ckpt.fp8.source)
    _check_folder_options(spec, source, experts, group_size)
    cfg = ckpt.config
    try:
        return Fp8Format(cfg.hidden_size, cfg.intermediate_size, ckpt.fp8.strategy,
                         ckpt.fp8.block)
    except ValueError as exc:
        raise CheckpointError(f"{source}: quantization_config: {exc}") from exc


def _check_folder_options(spec: dict[str, object], source: str, experts: str | None,
                          group_size: int | None) -> None:
    """A quantized folder runs as it was written: other flags name both."""
    name = spec["format"]
    if experts is not None and experts != name:
        raise OptionError(
            f"--experts {experts}: {source} holds {name} expert records (quantization_config); "
            f"they run as {name} only (the float weights cannot be recovered from them, and "
            f"requantizing would compound the error): drop --experts, or load the float folder")
    if group_size is not None and group_size != spec.get("group_size"):
        raise OptionError(
            f"--group-size {group_size}: {source} holds {name} records with group size "
            f"{spec.get('group_size')} (quantization_config); drop --group-size")


def _check_int4_options(ckpt: Checkpoint, group: int, device: torch.device) -> None:
    """int4 quantized at load: a group size torch's kernels take that divides the model's
    dimensions, and a CPU device."""
    if device.type != "cpu":
        raise OptionError(f"--experts int4 runs on --device cpu only (int4 records hold torch's "
                          f"CPU kernel layout); use --experts int8 on --device {device}")
    if group not in GROUP_SIZES:
        raise OptionError(f"--group-size {group}: choose one of {', '.join(map(str, GROUP_SIZES))}"
                          " (what torch's int4 kernels take)")
    cfg = ckpt.config
    for field, n in (("hidden_size", cfg.hidden_size), ("intermediate_size",
                                                         cfg.intermediate_size)):
        if n % group:
            raise OptionError(f"--group-size {group} does not divide {field} {n} of "
                              f"{ckpt.model_dir}: choose a group size that divides it")
