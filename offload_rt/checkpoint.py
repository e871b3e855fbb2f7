"""A model folder on disk: layout detection, validation up front, and reads by tensor or expert.

Supported layouts (see README): Hugging Face (``config.json`` + ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``) and Mistral-native (``params.json`` +
``consolidated*.safetensors``). Model files are never unpickled: ``.bin``/``.pth`` are refused.
A quantized folder (HF layout, ``docs/quantized_format.md``) holds one uint8 record per expert
instead of its three matrices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from offload_rt import tensor_names as names
from offload_rt.config import ModelConfig, config_from_hf, config_from_mistral, read_json
from offload_rt.errors import CheckpointError
from offload_rt.model_fields import check_tensor_names
from offload_rt.quant.folder import QuantizedExperts, read_quantization
from offload_rt.quant.formats import make_format
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


def _detect_layout(model_dir: Path) -> tuple[str, ModelConfig, QuantizedExperts | None]:
    if not model_dir.exists():
        raise CheckpointError(f"{model_dir}: model folder does not exist")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a folder (give the model's folder)")
    if (model_dir / "config.json").is_file():
        path = model_dir / "config.json"
        config = config_from_hf(path)  # refuses every quant_method but offload_rt's
        return names.HF, config, read_quantization(read_json(path), path)
    if (model_dir / "params.json").is_file():
        return names.MISTRAL, config_from_mistral(model_dir / "params.json"), None
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
    """The tensors one expert is stored as, in packing order: its three matrices (w1, w3, w2),
    or in a quantized folder its one record."""

    parts: tuple[TensorInfo, ...]

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.parts)

    @property
    def matrices(self) -> tuple[TensorInfo, ...]:
        """``parts`` by the name float-only callers use (w1, w3, w2 of a float expert)."""
        return self.parts


class Checkpoint:
    """A validated model folder. Construct with ``Checkpoint.open(path)``; its weight files
    stay open (one descriptor per shard) until ``close()``, so reads get the validated bytes
    (``weight_file``). ``quantization``: the expert format of a quantized folder (None: float
    experts)."""

    def __init__(self, model_dir: Path, layout: str, config: ModelConfig,
                 tensors: dict[str, TensorInfo], files: list[WeightFile] | None = None,
                 quantization: QuantizedExperts | None = None) -> None:
        self.model_dir, self.layout, self.config = model_dir, layout, config
        self.quantization = quantization
        self._tensors = tensors
        self.files = files or []
        self.dtype = tensors[names.file_name(layout, "embed")].dtype

    @classmethod
    def open(cls, model_dir: str | Path) -> Checkpoint:
        """Find the layout, parse every header and check names, shapes and dtypes."""
        model_dir = Path(model_dir).expanduser()
        layout, config, quantization = _detect_layout(model_dir)
        files: list[WeightFile] = []
        try:
            tensors = _read_headers(_weight_files(model_dir, layout), files)
            embed = names.file_name(layout, "embed")
            if embed not in tensors:  # checked first: the file dtype is read from it
                raise CheckpointError(f"{model_dir}: tensor '{embed}' is missing from the "
                                      "weight files")
            ckpt = cls(model_dir, layout, config, tensors, files, quantization)
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
        cfg, quant = self.config, self.quantization
        for layer in range(cfg.num_layers):
            for e in range(cfg.num_experts):
                if quant is not None:
                    expected[names.record_name(layer, e)] = (quant.record_bytes,)
                    continue
                for w, shape in names.expert_shapes(cfg).items():
                    expected[names.expert_name(self.layout, layer, e, w)] = shape
        return expected

    def _check_record_bytes(self) -> None:
        """config.json's record_bytes must be what its format takes for this config's shapes
        (``make_format`` also refuses a format this machine cannot run: another int4 layout)."""
        quant, cfg = self.quantization, self.config
        if quant is None:
            return
        fmt = make_format(quant.spec, cfg.hidden_size, cfg.intermediate_size, torch.float32,
                          torch.device("cpu"), str(quant.source))
        if fmt.nbytes != quant.record_bytes:
            raise CheckpointError(
                f"{quant.source}: quantization_config.record_bytes is {quant.record_bytes}, but "
                f"a {fmt.name} record of hidden_size {cfg.hidden_size} and intermediate_size "
                f"{cfg.intermediate_size} takes {fmt.nbytes} bytes")

    def _validate(self) -> None:
        self._check_record_bytes()
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
            _check_dtype(info, record=name.endswith(".record"))
        extra = [n for n in self._tensors if n not in expected
                 and not n.endswith(names.IGNORED_SUFFIXES)
                 and not (n == tied_head and self.config.tie_word_embeddings)]
        if extra:
            raise CheckpointError(f"{self.model_dir}: unexpected tensors {sorted(extra)[:5]} "
                                  f"({len(extra)} in all): not a Mixtral-family checkpoint?")

    @property
    def expert_dtype(self) -> torch.dtype:
        """The dtype experts are stored in: a float dtype, or uint8 for records."""
        return self.expert(0, 0).parts[0].dtype

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
        """Byte ranges of one expert's parts, in packing order: its record in a quantized
        folder, else its matrices."""
        if self.quantization is not None:
            return ExpertLocation((self._tensors[names.record_name(layer, expert)],))
        infos = tuple(self._tensors[names.expert_name(self.layout, layer, expert, w)]
                      for w in names.EXPERT_MATRICES)
        return ExpertLocation(infos)

    def read_expert_into(self, layer: int, expert: int, out: torch.Tensor, *,
                         drop_page_cache: bool = False) -> int:
        """Fill ``out`` (1-D) with the expert's parts back to back: [w1 | w3 | w2] flattened
        (``config.expert_numel`` elements), or its record (uint8, ``record_bytes``).

        When the file dtype equals ``out``'s, bytes go straight from disk into ``out``; otherwise
        each matrix is read once and converted. A record's bytes are never converted: ``out``
        must be uint8 (ValueError). ``drop_page_cache``: past the page cache (see
        ``read_into``). Returns how many parts the disk wrote straight into ``out``.
        """
        location = self.expert(layer, expert)
        numel = sum(info.numel for info in location.parts)
        if out.numel() != numel:
            raise ValueError(f"buffer holds {out.numel()} elements, expert L{layer}E{expert} "
                             f"has {numel}")
        start, in_place = 0, 0
        for info in location.parts:
            dst = out[start:start + info.numel]
            if info.dtype == torch.uint8 and out.dtype != torch.uint8:
                raise ValueError(f"tensor '{info.name}' is raw record bytes: read it into a "
                                 f"uint8 buffer, not {out.dtype}")
            if info.dtype == out.dtype:
                in_place += read_into(info, dst, drop_page_cache=drop_page_cache)
            else:
                dst.copy_(read_tensor(info, drop_page_cache=drop_page_cache).view(-1))
            start += info.numel
        return in_place


def _check_dtype(info: TensorInfo, *, record: bool) -> None:
    """Expert records are uint8 bytes; every other tensor is float32, bfloat16 or float16."""
    if record and info.dtype != torch.uint8:
        raise CheckpointError(f"{info.path}: tensor '{info.name}' has dtype {info.dtype}; an "
                              "expert record is uint8 (U8) bytes")
    if not record and info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{info.path}: tensor '{info.name}' has dtype {info.dtype}; "
                              "expected float32, bfloat16 or float16")
