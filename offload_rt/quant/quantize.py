"""``offload-rt quantize``: a float checkpoint in, a folder with quantized experts out.

The source (either layout) is read one expert at a time: its three matrices are read (past the
page cache), encoded into one record by the expert format (``formats.py``) and written to their
place in the output shard at once, so memory holds one expert and one shard's header however
large the checkpoint (``tests/test_quant_writer.py`` measures it). Trunk tensors are copied
unchanged (dtype and bytes), in HF rotary order under HF names. Output layout:
docs/quantized_format.md.
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
from offload_rt.quant.folder_files import files_to_copy, output_config, refuse_quantized_source
from offload_rt.quant.formats import GROUP_SIZES, ExpertFormat, Int4Format, Int8Format
from offload_rt.quant.output_dir import check_space, check_target, staged_folder
from offload_rt.quant.shards import INDEX_FILE, ShardPlan, index_json, plan_shards
from offload_rt.quant.writer import ShardFile, TensorEntry, file_bytes
from offload_rt.safetensors_file import read_tensor

log = logging.getLogger(__name__)

FORMATS = ("int8", "int4")
SCALE_DTYPES = ("bfloat16", "float16")
DEFAULT_GROUP_SIZE = 64
DEFAULT_SHARD_SIZE = 2 * 2**30
METADATA = {"format": "pt"}  # as save_pretrained writes it
Progress = Callable[[int, int], None]  # (experts done, experts in all)


@dataclass(frozen=True)
class QuantizeSettings:
    """What to write. ``group_size``: int4 only (None: ``DEFAULT_GROUP_SIZE``);
    ``shard_size``: bytes per output file, about (a shard holds whole layers)."""

    experts: str
    group_size: int | None = None
    scale_dtype: str = "bfloat16"
    shard_size: int = DEFAULT_SHARD_SIZE
    force: bool = False  # replace a non-empty OUT_DIR


@dataclass(frozen=True)
class QuantizeSummary:
    """What a run did: experts encoded, weight bytes read and written, wall seconds."""

    out_dir: Path
    experts: int
    format: str
    bytes_in: int
    bytes_out: int
    seconds: float

    def line(self) -> str:
        return (f"{self.out_dir}: {self.experts} experts quantized to {self.format}; weights "
                f"{format_size(self.bytes_in)} in, {format_size(self.bytes_out)} out "
                f"({self.bytes_out / max(self.bytes_in, 1):.2f}x), {self.seconds:.1f} s")


def _check_group(group: int, ckpt: Checkpoint) -> None:
    if group not in GROUP_SIZES:
        raise OptionError(f"--group-size {group}: int4 takes one of "
                          f"{', '.join(map(str, GROUP_SIZES))} (torch's int4 kernels)")
    cfg, mistral = ckpt.config, ckpt.layout == names.MISTRAL
    source = ckpt.model_dir / ("params.json" if mistral else "config.json")
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


def expert_format(settings: QuantizeSettings, ckpt: Checkpoint) -> ExpertFormat:
    """The format ``settings`` ask for, checked against the model's shapes (``OptionError``)."""
    if settings.scale_dtype not in SCALE_DTYPES:
        raise OptionError(f"--scale-dtype {settings.scale_dtype!r}: choose one of "
                          f"{list(SCALE_DTYPES)}")
    scale_dtype = getattr(torch, settings.scale_dtype)
    h, f = ckpt.config.hidden_size, ckpt.config.intermediate_size
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


def _trunk_entries(ckpt: Checkpoint) -> dict[str, TensorEntry]:
    """Canonical name -> output entry (HF name, the source's dtype and shape)."""
    return {c: TensorEntry(names.file_name(names.HF, c), ckpt.info(c).dtype, shape)
            for c, shape in names.trunk_shapes(ckpt.config).items()}


def encode_expert(ckpt: Checkpoint, fmt: ExpertFormat, layer: int, expert: int) -> torch.Tensor:
    """One expert's record from the source's w1, w3 [F, H] and w2 [H, F], as stored."""
    w1, w3, w2 = (read_tensor(info, drop_page_cache=True)
                  for info in ckpt.expert(layer, expert).matrices)
    return fmt.encode(w1, w3, w2)


class _Counter:
    """Experts done (for the progress callback) and source bytes read."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.bytes_in, self.progress = total, 0, 0, progress

    def expert_done(self, nbytes: int) -> None:
        self.done += 1
        self.bytes_in += nbytes
        if self.progress is not None:
            self.progress(self.done, self.total)


def _write_shard(ckpt: Checkpoint, fmt: ExpertFormat, plan: ShardPlan, folder: Path,
                 count: _Counter) -> None:
    shard = ShardFile(folder / plan.file, list(plan.entries), METADATA)
    try:
        for layer in plan.layers:
            for e in range(ckpt.config.num_experts):
                shard.write(names.record_name(layer, e), encode_expert(ckpt, fmt, layer, e))
                count.expert_done(ckpt.expert(layer, e).nbytes)
        for canonical in plan.trunk:
            shard.write(names.file_name(names.HF, canonical), ckpt.read(canonical))
            count.bytes_in += ckpt.info(canonical).nbytes
        shard.close()
    except BaseException:
        shard.abort()
        raise
    log.info("wrote %s (layers %s)", shard.path, list(plan.layers))


def _write_folder(ckpt: Checkpoint, fmt: ExpertFormat, plans: list[ShardPlan], folder: Path,
                  progress: Progress | None) -> int:
    """Every file of the quantized folder into ``folder``; returns the source bytes read."""
    cfg = ckpt.config
    count = _Counter(cfg.num_layers * cfg.num_experts, progress)
    for plan in plans:
        _write_shard(ckpt, fmt, plan, folder, count)
    (folder / INDEX_FILE).write_text(json.dumps(index_json(plans), indent=2) + "\n")
    for path in files_to_copy(ckpt.model_dir):
        shutil.copyfile(path, folder / path.name)
    (folder / "config.json").write_text(json.dumps(output_config(ckpt, fmt), indent=2) + "\n")
    return count.bytes_in


def quantize(model_dir: str | Path, out_dir: str | Path, settings: QuantizeSettings,
             progress: Progress | None = None) -> QuantizeSummary:
    """Write ``out_dir``: ``model_dir``'s model with experts in ``settings.experts`` format.

    Errors (all ``OffloadError``): ``CheckpointError`` for a source that is not a float model
    folder; ``OptionError`` for settings that do not fit the model, an OUT_DIR that exists (not
    empty, without ``force``), holds the source, or whose disk is too small or fills up.
    Nothing is left at OUT_DIR by a failed or interrupted run.
    """
    started = time.perf_counter()
    refuse_quantized_source(Path(model_dir).expanduser())
    ckpt = Checkpoint.open(model_dir)
    try:
        fmt = expert_format(settings, ckpt)
        plans = plan_shards(ckpt.config, fmt.nbytes, _trunk_entries(ckpt), settings.shard_size)
        out = Path(os.path.abspath(Path(out_dir).expanduser()))  # '.', '..' named
        check_target(out, ckpt.model_dir, settings.force)
        written = sum(file_bytes(list(p.entries), METADATA) for p in plans)
        needed = written + sum(p.stat().st_size for p in files_to_copy(ckpt.model_dir)) + 2**20
        check_space(out, needed)
        with staged_folder(out, needed, settings.force) as folder:
            bytes_in = _write_folder(ckpt, fmt, plans, folder, progress)
    finally:
        ckpt.close()
    spec = fmt.spec()
    name = settings.experts + (f" (group size {spec['group_size']})" if "group_size" in spec
                               else "")
    return QuantizeSummary(out, ckpt.config.num_layers * ckpt.config.num_experts, name,
                           bytes_in, written, time.perf_counter() - started)
