"""A model folder on disk: layout detection, validation up front, and reads by tensor or expert.

Supported layouts (see README): Hugging Face (``config.json`` + ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``) and Mistral-native (``params.json`` +
``consolidated*.safetensors``). Model files are never unpickled: ``.bin``/``.pth`` are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from offload_rt import tensor_names as names
from offload_rt.config import ModelConfig, config_from_hf, config_from_mistral
from offload_rt.errors import CheckpointError
from offload_rt.model_fields import check_tensor_names
from offload_rt.safetensors_file import TensorInfo, read_header, read_into, read_tensor
from offload_rt.weight_file import WeightFile

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def permute_mistral_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral-native wq/wk rotate interleaved pairs; HF rotates halves. Reorder the rows."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _index_files(model_dir: Path, index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: unreadable shard index ({exc})") from exc
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (model_dir / shard).is_file():
            raise CheckpointError(f"{model_dir / shard}: shard listed in {index_path.name} "
                                  "is missing")
    return [model_dir / s for s in shards]


def _weight_files(model_dir: Path, layout: str) -> list[Path]:
    if layout == names.HF:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            return _index_files(model_dir, index)
        files = [model_dir / "model.safetensors"] if (model_dir / "model.safetensors").is_file() \
            else sorted(model_dir.glob("*.safetensors"))
    else:
        files = sorted(model_dir.glob("consolidated*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pth", ".pt"))
        hint = (f"; found {pickled}: pickled weights are never loaded, convert them to "
                "safetensors") if pickled else ""
        raise CheckpointError(f"{model_dir}: no safetensors weight files{hint}")
    return files


def _detect_layout(model_dir: Path) -> tuple[str, ModelConfig]:
    if not model_dir.exists():
        raise CheckpointError(f"{model_dir}: model folder does not exist")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a folder (give the model's folder)")
    if (model_dir / "config.json").is_file():
        return names.HF, config_from_hf(model_dir / "config.json")
    if (model_dir / "params.json").is_file():
        return names.MISTRAL, config_from_mistral(model_dir / "params.json")
    raise CheckpointError(f"{model_dir}: neither config.json (Hugging Face layout) nor "
                          "params.json (Mistral-native layout) found")


def _read_headers(paths: list[Path], opened: list[WeightFile]) -> dict[str, TensorInfo]:
    """Open each file (appended to ``opened``) and parse its header."""
    tensors: dict[str, TensorInfo] = {}
    for path in paths:
        file = WeightFile(path)
        opened.append(file)
        header = read_header(file)
        check_tensor_names(list(header), path)  # before "missing": say what format it is
        for name, info in header.items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor '{name}' also in {tensors[name].path}")
            tensors[name] = info
    return tensors


@dataclass(frozen=True)
class ExpertLocation:
    """The three matrices of one expert, in packing order (w1, w3, w2)."""

    matrices: tuple[TensorInfo, TensorInfo, TensorInfo]

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.matrices)


class Checkpoint:
    """A validated model folder. Construct with ``Checkpoint.open(path)``; its weight files
    stay open (one descriptor per shard) until ``close()``, so reads get the validated bytes
    (``weight_file``)."""

    def __init__(self, model_dir: Path, layout: str, config: ModelConfig,
                 tensors: dict[str, TensorInfo], files: list[WeightFile] | None = None) -> None:
        self.model_dir, self.layout, self.config = model_dir, layout, config
        self._tensors = tensors
        self.files = files or []
        self.dtype = tensors[names.file_name(layout, "embed")].dtype

    @classmethod
    def open(cls, model_dir: str | Path) -> Checkpoint:
        """Find the layout, parse every header and check names, shapes and dtypes."""
        model_dir = Path(model_dir).expanduser()
        layout, config = _detect_layout(model_dir)
        files: list[WeightFile] = []
        try:
            tensors = _read_headers(_weight_files(model_dir, layout), files)
            embed = names.file_name(layout, "embed")
            if embed not in tensors:  # checked first: the file dtype is read from it
                raise CheckpointError(f"{model_dir}: tensor '{embed}' is missing from the "
                                      "weight files")
            ckpt = cls(model_dir, layout, config, tensors, files)
            ckpt._validate()
        except BaseException:
            for file in files:
                file.close()
            raise
        return ckpt

    def close(self) -> None:
        """Close the weight files (after any read in flight); later reads raise
        ``CheckpointError``. Idempotent."""
        for file in self.files:
            file.close()

    def _expected(self) -> dict[str, tuple[int, ...]]:
        expected = {names.file_name(self.layout, c): s
                    for c, s in names.trunk_shapes(self.config).items()}
        cfg = self.config
        for layer in range(cfg.num_layers):
            for e in range(cfg.num_experts):
                for w, shape in names.expert_shapes(cfg).items():
                    expected[names.expert_name(self.layout, layer, e, w)] = shape
        return expected

    def _validate(self) -> None:
        expected = self._expected()
        tied_head = names.file_name(self.layout, "lm_head")
        for name, shape in expected.items():
            info = self._tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.model_dir}: tensor '{name}' is missing from the "
                                      "weight files")
            if info.shape != shape:
                raise CheckpointError(f"{info.path}: tensor '{name}' has shape {list(info.shape)}"
                                      f", the config implies {list(shape)}")
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{info.path}: tensor '{name}' has dtype {info.dtype}; "
                                      "expected float32, bfloat16 or float16")
        extra = [n for n in self._tensors if n not in expected
                 and not n.endswith(names.IGNORED_SUFFIXES)
                 and not (n == tied_head and self.config.tie_word_embeddings)]
        if extra:
            raise CheckpointError(f"{self.model_dir}: unexpected tensors {sorted(extra)[:5]} "
                                  f"({len(extra)} in all): not a Mixtral-family checkpoint?")

    def info(self, canonical: str) -> TensorInfo:
        return self._tensors[names.file_name(self.layout, canonical)]

    def read(self, canonical: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one trunk tensor by canonical name (``layers.3.wq``), in HF rotary order."""
        t = read_tensor(self.info(canonical))
        if self.layout == names.MISTRAL and canonical.endswith((".wq", ".wk")):
            heads = self.config.num_heads if canonical.endswith(".wq") else self.config.num_kv_heads
            t = permute_mistral_to_hf(t, heads)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def expert(self, layer: int, expert: int) -> ExpertLocation:
        """Byte ranges of one expert's matrices, in packing order."""
        infos = tuple(self._tensors[names.expert_name(self.layout, layer, expert, w)]
                      for w in names.EXPERT_MATRICES)
        return ExpertLocation(infos)  # type: ignore[arg-type]

    def read_expert_into(self, layer: int, expert: int, out: torch.Tensor, *,
                         drop_page_cache: bool = False) -> int:
        """Fill ``out`` (1-D, ``config.expert_numel`` elements) with [w1 | w3 | w2] flattened.

        When the file dtype equals ``out``'s, bytes go straight from disk into ``out``; otherwise
        each matrix is read once and converted. ``drop_page_cache``: past the page cache (see
        ``read_into``). Returns how many matrices the disk wrote straight into ``out``.
        """
        location = self.expert(layer, expert)
        numel = sum(info.numel for info in location.matrices)
        if out.numel() != numel:
            raise ValueError(f"buffer holds {out.numel()} elements, expert L{layer}E{expert} "
                             f"has {numel}")
        start, in_place = 0, 0
        for info in location.matrices:
            dst = out[start:start + info.numel]
            if info.dtype == out.dtype:
                in_place += read_into(info, dst, drop_page_cache=drop_page_cache)
            else:
                dst.copy_(read_tensor(info, drop_page_cache=drop_page_cache).view(-1))
            start += info.numel
        return in_place

