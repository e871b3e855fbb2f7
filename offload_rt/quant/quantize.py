"""``offload-rt quantize``: a float checkpoint in, a folder with quantized experts out.

The source (either layout) is read one expert at a time: its three matrices are read (past the
page cache), encoded into one record by the expert format (``formats.py``) and written to their
place in the output shard at once, so memory holds one expert and one shard's header however
large the checkpoint (``tests/test_quant_writer.py`` measures it). Trunk tensors are copied
unchanged (dtype and bytes), in HF rotary order under HF names. Output layout:
docs/quantized_format.md.

The writer reads through ``QuantSource``: ``CheckpointSource`` is a float folder; a generator
of seeded weights (``benchmarks/make_checkpoint.py --experts int4``) is another, so a model
larger than the disk's room for its float copy is written quantized directly.
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
from typing import Any, Protocol

import torch

from offload_rt import tensor_names as names
from offload_rt.checkpoint import Checkpoint
from offload_rt.config import ModelConfig
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


class QuantSource(Protocol):
    """What the writer reads: a float model's config, experts and trunk tensors.

    ``config_file``: the file messages name for the model's shapes; ``model_dir``: the folder
    OUT_DIR must not hold (None for a generator); ``mistral``: the config uses params.json's
    field names."""

    config: ModelConfig
    config_file: Path
    model_dir: Path | None
    mistral: bool

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1, w3 [F, H] and w2 [H, F] as stored (float)."""

    def expert_nbytes(self, layer: int, expert: int) -> int:
        """The stored bytes of one expert's three matrices."""

    def trunk_dtype(self, canonical: str) -> torch.dtype:
        """The stored dtype of a trunk tensor (``tensor_names`` canonical name)."""

    def trunk(self, canonical: str) -> torch.Tensor:
        """A trunk tensor in HF rotary order, as stored."""

    def small_files(self) -> list[Path]:
        """Tokenizer, generation config, model card and licence files to copy."""

    def config_json(self, fmt: ExpertFormat) -> dict[str, Any]:
        """config.json of the output folder, with its ``quantization_config``."""


class CheckpointSource:
    """A float checkpoint folder (either layout) as a ``QuantSource``."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt, self.config, self.model_dir = ckpt, ckpt.config, ckpt.model_dir
        self.mistral = ckpt.layout == names.MISTRAL
        self.config_file = ckpt.model_dir / ("params.json" if self.mistral else "config.json")

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w1, w3, w2 = (read_tensor(info, drop_page_cache=True)
                      for info in self.ckpt.expert(layer, expert).matrices)
        return w1, w3, w2

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return self.ckpt.expert(layer, expert).nbytes

    def trunk_dtype(self, canonical: str) -> torch.dtype:
        return self.ckpt.info(canonical).dtype

    def trunk(self, canonical: str) -> torch.Tensor:
        return self.ckpt.read(canonical)

    def small_files(self) -> list[Path]:
        return files_to_copy(self.ckpt.model_dir)

    def config_json(self, fmt: ExpertFormat) -> dict[str, Any]:
        return output_config(self.ckpt, fmt)


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


def expert_format(settings: QuantizeSettings, ckpt: QuantSource) -> ExpertFormat:
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


def _trunk_entries(src: QuantSource) -> dict[str, TensorEntry]:
    """Canonical name -> output entry (HF name, the source's dtype and shape)."""
    family = src.config.family
    return {c: TensorEntry(names.file_name(names.HF, c, family), src.trunk_dtype(c), shape)
            for c, shape in names.trunk_shapes(src.config).items()}


def encode_expert(src: QuantSource, fmt: ExpertFormat, layer: int, expert: int) -> torch.Tensor:
    """One expert's record from the source's w1, w3 [F, H] and w2 [H, F], as stored."""
    return fmt.encode(*src.expert(layer, expert))


class _Counter:
    """Experts done (for the progress callback) and source bytes read."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.bytes_in, self.progress = total, 0, 0, progress

    def expert_done(self, nbytes: int) -> None:
        self.done += 1
        self.bytes_in += nbytes
        if self.progress is not None:
            self.progress(self.done, self.total)


def _write_shard(src: QuantSource, fmt: ExpertFormat, plan: ShardPlan, folder: Path,
                 count: _Counter) -> None:
    shard = ShardFile(folder / plan.file, list(plan.entries), METADATA)
    try:
        for layer in plan.layers:
            for e in range(src.config.num_experts):
                shard.write(names.record_name(layer, e, src.config.family),
                            encode_expert(src, fmt, layer, e))
                count.expert_done(src.expert_nbytes(layer, e))
        for canonical in plan.trunk:
            tensor = src.trunk(canonical)
            shard.write(names.file_name(names.HF, canonical, src.config.family), tensor)
            count.bytes_in += tensor.numel() * tensor.element_size()
        shard.close()
    except BaseException:
        shard.abort()
        raise
    log.info("wrote %s (layers %s)", shard.path, list(plan.layers))


def _write_folder(src: QuantSource, fmt: ExpertFormat, plans: list[ShardPlan], folder: Path,
                  progress: Progress | None) -> int:
    """Every file of the quantized folder into ``folder``; returns the source bytes read."""
    cfg = src.config
    count = _Counter(cfg.num_layers * cfg.num_experts, progress)
    for plan in plans:
        _write_shard(src, fmt, plan, folder, count)
    (folder / INDEX_FILE).write_text(json.dumps(index_json(plans), indent=2) + "\n")
    for path in src.small_files():
        shutil.copyfile(path, folder / path.name)
    (folder / "config.json").write_text(json.dumps(src.config_json(fmt), indent=2) + "\n")
    return count.bytes_in


def quantize(model_dir: str | Path, out_dir: str | Path, settings: QuantizeSettings,
             progress: Progress | None = None) -> QuantizeSummary:
    """Write ``out_dir``: ``model_dir``'s model with experts in ``settings.experts`` format.

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
    fmt = expert_format(settings, src)
    plans = plan_shards(src.config, fmt.nbytes, _trunk_entries(src), settings.shard_size)
    out = Path(os.path.abspath(Path(out_dir).expanduser()))  # '.', '..' named
    check_target(out, src.model_dir, settings.force)
    written = sum(file_bytes(list(p.entries), METADATA) for p in plans)
    needed = written + sum(p.stat().st_size for p in src.small_files()) + 2**20
    check_space(out, needed)
    with staged_folder(out, needed, settings.force) as folder:
        bytes_in = _write_folder(src, fmt, plans, folder, progress)
    spec = fmt.spec()
    name = settings.experts + (f" (group size {spec['group_size']})" if "group_size" in spec
                               else "")
    cfg = src.config
    return QuantizeSummary(out, cfg.num_layers * cfg.num_experts, name, bytes_in, written,
                           time.perf_counter() - started)
