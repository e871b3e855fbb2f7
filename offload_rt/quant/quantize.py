"""``offload-rt quantize``: a float checkpoint in, a folder with quantized experts out.

The source (either layout) is read one expert at a time: its three matrices are read (past the
page cache), encoded into one record by the expert format (``formats.py``; or into fp8 weights
and scales, ``fp8_writer.py``) and written to their place in the output shard at once, so
memory holds one expert and one shard's header however large the checkpoint
(``tests/test_quant_writer.py`` measures it). Trunk tensors are copied unchanged (dtype and
bytes), in HF rotary order under HF names, or with ``trunk="int8"`` the attention projections
and LM head quantized one at a time as ``--trunk int8`` does at load (``trunk_int8.py``).
What each tensor becomes: ``outputs.py``. Output layout: docs/quantized_format.md.

The writer reads through ``QuantSource`` (``source.py``): a float folder, or a generator.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from offload_rt import tensor_names as names
from offload_rt.checkpoint import Checkpoint
from offload_rt.engine.sizes import format_size
from offload_rt.errors import OptionError
from offload_rt.quant.folder_files import refuse_quantized_source
from offload_rt.quant.formats import GROUP_SIZES, ExpertFormat, Int4Format, Int8Format
from offload_rt.quant.fp8 import Fp8Format
from offload_rt.quant.output_dir import check_space, check_target, staged_folder
from offload_rt.quant.outputs import (
    ExpertOutput,
    Fp8Output,
    NonFiniteWeights,
    RecordOutput,
    TrunkOutput,
    fp8_ignore,
)
from offload_rt.quant.shards import INDEX_FILE, ShardPlan, Trunk, index_json, plan_shards
from offload_rt.quant.source import CheckpointSource, QuantSource
from offload_rt.quant.writer import ShardFile, file_bytes

log = logging.getLogger(__name__)

FORMATS = ("int8", "int4", "fp8")
TRUNK_FORMATS = ("float", "int8")
SCALE_DTYPES = ("bfloat16", "float16")
DEFAULT_GROUP_SIZE = 64
DEFAULT_SHARD_SIZE = 2 * 2**30
METADATA = {"format": "pt"}  # as save_pretrained writes it
Progress = Callable[[int, int], None]  # (experts done, experts in all)


@dataclass(frozen=True)
class QuantizeSettings:
    """What to write. ``group_size``: int4 only (None: ``DEFAULT_GROUP_SIZE``);
    ``scale_dtype``: int8/int4 experts' and an int8 trunk's scales (None: bfloat16; fp8
    scales are float32); ``trunk``: "float" (as stored) or "int8"; ``shard_size``: bytes per
    output file, about (a shard holds whole layers)."""

    experts: str
    group_size: int | None = None
    scale_dtype: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    force: bool = False  # replace a non-empty OUT_DIR
    trunk: str = "float"


@dataclass(frozen=True)
class QuantizeSummary:
    """What a run did: experts encoded, weight bytes read and written, wall seconds."""

    out_dir: Path
    experts: int
    format: str
    bytes_in: int
    bytes_out: int
    seconds: float
    trunk: str = "float"

    def line(self) -> str:
        trunk = "; attention and LM head in int8" if self.trunk == "int8" else ""
        return (f"{self.out_dir}: {self.experts} experts quantized to {self.format}{trunk}; "
                f"weights "
                f"{format_size(self.bytes_in)} in, {format_size(self.bytes_out)} out "
                f"({self.bytes_out / max(self.bytes_in, 1):.2f}x), {self.seconds:.1f} s")


def _check_group(group: int, src: QuantSource) -> None:
    if group not in GROUP_SIZES:
        raise OptionError(f"--group-size {group}: int4 takes one of "
                          f"{', '.join(map(str, GROUP_SIZES))} (torch's int4 kernels)")
    cfg, mistral, source = src.config, src.mistral, src.config_file
    for field, alias, n in (("hidden_size", "dim", cfg.hidden_size),
                            ("intermediate_size", "hidden_dim", cfg.intermediate_size)):
        if n % group:
            fits = [g for g in GROUP_SIZES if not cfg.hidden_size % g
                    and not cfg.intermediate_size % g]
            hint = f"group sizes that fit: {fits}" if fits else "no int4 group size fits; use int8"
            raise OptionError(f"--group-size {group}: {source} has {field} {n}"
                              f"{f' ({alias})' if mistral else ''}, not a multiple of it; int4 "
                              f"needs hidden_size and intermediate_size to be multiples of the "
                              f"group size ({hint})")


def _scale_dtype(settings: QuantizeSettings) -> torch.dtype:
    name = settings.scale_dtype or "bfloat16"
    if name not in SCALE_DTYPES:
        raise OptionError(f"--scale-dtype {name!r}: choose one of {list(SCALE_DTYPES)}")
    return getattr(torch, name)


def expert_format(settings: QuantizeSettings, ckpt: QuantSource) -> ExpertFormat:
    """The format ``settings`` ask for, checked against the model's shapes (``OptionError``):
    the record format of int8/int4, or the fp8 format an fp8 folder's experts run as."""
    h, f = ckpt.config.hidden_size, ckpt.config.intermediate_size
    if settings.experts == "fp8":
        for flag, given in (("--group-size", settings.group_size),
                            ("--scale-dtype", settings.scale_dtype)):
            if given is not None:
                raise OptionError(f"{flag} {given} does not apply to --experts fp8 (one float32 "
                                  "scale per output channel, the compressed-tensors layout)")
        if settings.trunk != "float":
            raise OptionError(f"--trunk {settings.trunk} with --experts fp8: an fp8 folder is a "
                              "compressed-tensors checkpoint, whose config has no place for "
                              "offload_rt's int8 trunk; use --experts int8 or int4 with "
                              "--trunk int8, or drop --trunk")
        return Fp8Format(h, f, "channel")
    scale_dtype = _scale_dtype(settings)
    if settings.experts == "int8":
        if settings.group_size is not None:
            raise OptionError("--group-size applies to --experts int4 only (int8 has one scale "
                              "per output channel)")
        return Int8Format(h, f, scale_dtype)
    if settings.experts == "int4":
        group = settings.group_size or DEFAULT_GROUP_SIZE
        _check_group(group, ckpt)
        return Int4Format(h, f, group, scale_dtype)
    raise OptionError(f"--experts {settings.experts!r}: choose one of {list(FORMATS)}")


def outputs(settings: QuantizeSettings, src: QuantSource) -> tuple[ExpertOutput, TrunkOutput]:
    """What the experts and the trunk are written as (``OptionError`` for bad settings)."""
    if settings.trunk not in TRUNK_FORMATS:
        raise OptionError(f"--trunk {settings.trunk!r}: choose one of {list(TRUNK_FORMATS)}")
    fmt, cfg = expert_format(settings, src), src.config
    experts: ExpertOutput = (Fp8Output(cfg, fp8_ignore(cfg), fmt) if settings.experts == "fp8"
                             else RecordOutput(fmt, cfg.family))
    return experts, TrunkOutput(cfg, settings.trunk == "int8", _scale_dtype(settings))


def _trunk_entries(src: QuantSource, trunk: TrunkOutput) -> Trunk:
    """Canonical name -> its output entries (HF names; the source's dtype and shape, or an
    int8 matrix and its scale)."""
    return {c: trunk.entries(c, src.trunk_dtype(c), shape)
            for c, shape in names.trunk_shapes(src.config).items()}


class _Counter:
    """Experts done (for the progress callback) and source bytes read."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.bytes_in, self.progress = total, 0, 0, progress

    def expert_done(self, nbytes: int) -> None:
        self.done += 1
        self.bytes_in += nbytes
        if self.progress is not None:
            self.progress(self.done, self.total)


def _write_shard(src: QuantSource, written: tuple[ExpertOutput, TrunkOutput], plan: ShardPlan,
                 folder: Path, count: _Counter) -> None:
    experts, trunk = written
    shard = ShardFile(folder / plan.file, list(plan.entries), METADATA)
    try:
        for layer in plan.layers:
            for e in range(src.config.num_experts):
                for name, tensor in experts.tensors(layer, e, *src.expert(layer, e)):
                    shard.write(name, tensor)
                count.expert_done(src.expert_nbytes(layer, e))
        for canonical in plan.trunk:
            tensor = src.trunk(canonical)
            count.bytes_in += tensor.numel() * tensor.element_size()
            for name, stored in trunk.tensors(canonical, tensor):
                shard.write(name, stored)
        shard.close()
    except NonFiniteWeights as exc:
        shard.abort()
        raise NonFiniteWeights(f"{src.model_dir}: {exc}") from None
    except BaseException:
        shard.abort()
        raise
    log.info("wrote %s (layers %s)", shard.path, list(plan.layers))


def _write_folder(src: QuantSource, written: tuple[ExpertOutput, TrunkOutput],
                  plans: list[ShardPlan], folder: Path, progress: Progress | None) -> int:
    """Every file of the quantized folder into ``folder``; returns the source bytes read."""
    cfg, (experts, trunk) = src.config, written
    count = _Counter(cfg.num_layers * cfg.num_experts, progress)
    for plan in plans:
        _write_shard(src, written, plan, folder, count)
    (folder / INDEX_FILE).write_text(json.dumps(index_json(plans), indent=2) + "\n")
    for path in src.small_files():
        shutil.copyfile(path, folder / path.name)
    config = src.config_json(experts.fmt)
    config["quantization_config"] = trunk.quantization_config(
        experts.quantization_config(config["quantization_config"]))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return count.bytes_in


def quantize(model_dir: str | Path, out_dir: str | Path, settings: QuantizeSettings,
             progress: Progress | None = None) -> QuantizeSummary:
    """Write ``out_dir``: ``model_dir``'s model with experts in ``settings.experts`` format
    (and with ``settings.trunk`` "int8" its attention projections and LM head in int8).

    Errors (all ``OffloadError``): ``CheckpointError`` for a source that is not a float model
    folder; ``OptionError`` for settings that do not fit the model, an OUT_DIR that exists (not
    empty, without ``force``), holds the source, or whose disk is too small or fills up.
    Nothing is left at OUT_DIR by a failed or interrupted run.
    """
    refuse_quantized_source(Path(model_dir).expanduser())
    ckpt = Checkpoint.open(model_dir)
    try:
        return write_quantized(CheckpointSource(ckpt), out_dir, settings, progress)
    finally:
        ckpt.close()


def write_quantized(src: QuantSource, out_dir: str | Path, settings: QuantizeSettings,
                    progress: Progress | None = None) -> QuantizeSummary:
    """``quantize`` from any ``QuantSource``; the same checks, errors and output."""
    started = time.perf_counter()
    experts, trunk = outputs(settings, src)
    plans = plan_shards(src.config, experts.entries, _trunk_entries(src, trunk),
                        settings.shard_size)
    out = Path(os.path.abspath(Path(out_dir).expanduser()))  # '.', '..' named
    check_target(out, src.model_dir, settings.force)
    written = sum(file_bytes(list(p.entries), METADATA) for p in plans)
    needed = written + sum(p.stat().st_size for p in src.small_files()) + 2**20
    check_space(out, needed)
    with staged_folder(out, needed, settings.force) as folder:
        bytes_in = _write_folder(src, (experts, trunk), plans, folder, progress)
    cfg = src.config
    return QuantizeSummary(out, cfg.num_layers * cfg.num_experts, experts.name, bytes_in,
                           written, time.perf_counter() - started, settings.trunk)
