"""A model folder on disk: layout detection, validation up front, and reads by tensor or expert.

Supported layouts (see README): Hugging Face (``config.json`` + ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``) and Mistral-native (``params.json`` +
``consolidated*.safetensors``). Model files are never unpickled: ``.bin``/``.pth`` are refused.
A quantized folder (HF layout, ``docs/quantized_format.md``) holds one uint8 record per expert
instead of its three matrices. An fp8 checkpoint (``quant.fp8_scheme``) holds F8_E4M3 weights
and their scales: trunk weights are dequantized as they are read, experts read as fp8 records.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from offload_rt import tensor_names as names
from offload_rt.config import ModelConfig, config_from_hf, config_from_mistral, read_json
from offload_rt.errors import CheckpointError
from offload_rt.model_fields import check_tensor_names
from offload_rt.quant.folder import QuantizedExperts, read_quantization
from offload_rt.quant.formats import make_format
from offload_rt.quant.fp8_scheme import Fp8Scheme
from offload_rt.quant.fp8_tensors import check_header, fp8_scales, read_dequantized
from offload_rt.quant.trunk_int8 import SCALE_SUFFIX, int8_trunk_scales, read_int8
from offload_rt.safetensors_file import TensorInfo, read_header, read_into, read_tensor
from offload_rt.unused_tensors import check_unused, declared_quantization
from offload_rt.weight_file import WeightFile

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
log = logging.getLogger(__name__)


def permute_mistral_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral-native wq/wk rotate interleaved pairs; HF rotates halves. Reorder the rows."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _index_files(model_dir: Path, index_path: Path) -> list[Path]:
    """The shards ``index_path``'s weight_map names: each a plain file name in ``model_dir``
    (as transformers writes them). A path (``/etc/passwd``, ``../other/model.safetensors``,
    ``sub/x.safetensors``) is refused by name: a model folder reads only its own files."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: unreadable shard index ({exc})") from exc
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: 'weight_map' must be an object mapping tensor "
                              f"names to shard file names, got {type(weight_map).__name__}")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or "/" in shard \
                or "\\" in shard or "\0" in shard:
            raise CheckpointError(f"{index_path}: weight_map entry {tensor!r}: {shard!r} is not "
                                  "a file name in the model folder (shards are named without "
                                  "a folder, e.g. model-00001-of-00002.safetensors)")
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


def _detect_layout(model_dir: Path
                   ) -> tuple[str, ModelConfig, QuantizedExperts | Fp8Scheme | None]:
    if not model_dir.exists():
        raise CheckpointError(f"{model_dir}: model folder does not exist")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a folder (give the model's folder)")
    if (model_dir / "config.json").is_file():
        path = model_dir / "config.json"
        config = config_from_hf(path)  # refuses every quant_method but offload_rt's and fp8
        return names.HF, config, read_quantization(read_json(path), path)
    if (model_dir / "params.json").is_file():
        return names.MISTRAL, config_from_mistral(model_dir / "params.json"), None
    raise CheckpointError(f"{model_dir}: neither config.json (Hugging Face layout) nor "
                          "params.json (Mistral-native layout) found")


def _read_headers(paths: list[Path], opened: list[WeightFile], fp8: Fp8Scheme | None,
                  allowed: tuple[str, ...] = ()) -> dict[str, TensorInfo]:
    """Open each file (appended to ``opened``) and parse its header; ``allowed``: scale name
    endings the folder's own format has (an int8 trunk's)."""
    tensors: dict[str, TensorInfo] = {}
    for path in paths:
        file = WeightFile(path)
        opened.append(file)
        header = read_header(file)
        check_header(fp8, header, path)  # before "missing": say what format it is
        check_tensor_names(list(header), path, fp8.scale_endings if fp8 else allowed)
        for name, info in header.items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor '{name}' also in {tensors[name].path}")
            tensors[name] = info
    return tensors


@dataclass(frozen=True)
class ExpertLocation:
    """The tensors one expert is stored as, in packing order: its three matrices (w1, w3, w2),
    or in a quantized folder its one record; ``scales``: the matrices' scales (fp8 experts)."""

    parts: tuple[TensorInfo, ...]
    scales: tuple[TensorInfo, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.parts + self.scales)

    @property
    def matrices(self) -> tuple[TensorInfo, ...]:
        """``parts`` by the name float-only callers use (w1, w3, w2 of a float expert)."""
        return self.parts


class Checkpoint:
    """A validated model folder. Construct with ``Checkpoint.open(path)``; its weight files
    stay open (one descriptor per shard) until ``close()``, so reads get the validated bytes
    (``weight_file``). ``quantization``: the expert format of a quantized folder (None: float
    experts); ``fp8``: an fp8 checkpoint's scheme, ``fp8_scales`` its F8_E4M3 weights'
    scales by weight name (filled by validation)."""

    def __init__(self, model_dir: Path, layout: str, config: ModelConfig,
                 tensors: dict[str, TensorInfo], files: list[WeightFile] | None = None,
                 quantization: QuantizedExperts | Fp8Scheme | None = None) -> None:
        self.model_dir, self.layout, self.config = model_dir, layout, config
        self.names = names.names_of(layout, config.family)  # the family's tensor names
        self.quantization = quantization if isinstance(quantization, QuantizedExperts) else None
        self.fp8 = quantization if isinstance(quantization, Fp8Scheme) else None
        self.fp8_scales: dict[str, TensorInfo] = {}
        self.int8_trunk = self.quantization.trunk if self.quantization is not None else None
        self.int8_scales: dict[str, TensorInfo] = {}  # an int8 trunk's, by weight name
        self._tensors = tensors
        self.files = files or []
        self.dtype = tensors[self.names.file_name("embed")].dtype

    @classmethod
    def open(cls, model_dir: str | Path) -> Checkpoint:
        """Find the layout, parse every header and check names, shapes and dtypes."""
        model_dir = Path(model_dir).expanduser()
        layout, config, quantization = _detect_layout(model_dir)
        files: list[WeightFile] = []
        try:
            fp8 = quantization if isinstance(quantization, Fp8Scheme) else None
            int8_trunk = isinstance(quantization, QuantizedExperts) and quantization.trunk
            tensors = _read_headers(_weight_files(model_dir, layout), files, fp8,
                                    ("." + SCALE_SUFFIX,) if int8_trunk else ())
            embed = names.file_name(layout, "embed", config.family)
            if embed not in tensors:  # checked first: the file dtype is read from it
                raise CheckpointError(f"{model_dir}: tensor '{embed}' is missing from the "
                                      "weight files")
            config = _untie_if_head_given(config, layout, tensors)
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
        expected = {self.names.file_name(c): s
                    for c, s in names.trunk_shapes(self.config).items()}
        cfg, quant = self.config, self.quantization
        for layer in range(cfg.num_layers):
            for e in range(cfg.num_experts):
                if quant is not None:
                    expected[self.names.record_name(layer, e)] = (quant.record_bytes,)
                    continue
                for w, shape in names.expert_shapes(cfg).items():
                    expected[self.names.expert_name(layer, e, w)] = shape
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
        if self.fp8 is not None:
            self.fp8_scales = fp8_scales(self.fp8, self._tensors, expected, self.names,
                                         self.config)
            expected.update({s.name: s.shape for s in self.fp8_scales.values()})
        if self.int8_trunk is not None:
            self.int8_scales = int8_trunk_scales(self.int8_trunk, self._tensors, self.names,
                                                 self.config)
            expected.update({s.name: s.shape for s in self.int8_scales.values()})
        for name, shape in expected.items():
            info = self._tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.model_dir}: tensor '{name}' is missing from the "
                                      "weight files")
            if info.shape != shape:
                raise CheckpointError(f"{info.path}: tensor '{name}' has shape {list(info.shape)}"
                                      f", the config implies {list(shape)}")
            _check_dtype(info, record=name.endswith(".record"),
                         fp8=name in self.fp8_scales or name in self.int8_scales)
        config = self.model_dir / ("config.json" if self.layout == names.HF else "params.json")
        check_unused(self._tensors, expected, self.model_dir, self.config.family,
                     declared_quantization(config, self.fp8 or self.quantization))

    @property
    def expert_dtype(self) -> torch.dtype:
        """The dtype experts are stored in: a float dtype, float8_e4m3fn (fp8 experts), or
        uint8 for records."""
        return self.expert(0, 0).parts[0].dtype

    @property
    def fp8_experts(self) -> bool:
        """Whether the experts are F8_E4M3 with scales (an fp8 checkpoint's)."""
        return bool(self.expert(0, 0).scales)

    def info(self, canonical: str) -> TensorInfo:
        return self._tensors[self.names.file_name(canonical)]

    def read(self, canonical: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one trunk tensor by canonical name (``layers.3.wq``), in HF rotary order; an
        fp8 weight dequantized into ``dtype`` (None: float32)."""
        info = self.info(canonical)
        scale = self.fp8_scales.get(info.name)
        if scale is not None and self.fp8 is not None:
            return read_dequantized(info, scale, self.fp8, dtype or torch.float32)
        t = read_tensor(info)
        if self.layout == names.MISTRAL and canonical.endswith((".wq", ".wk")):
            heads = self.config.num_heads if canonical.endswith(".wq") else self.config.num_kv_heads
            t = permute_mistral_to_hf(t, heads)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def read_int8(self, canonical: str) -> tuple[torch.Tensor, torch.Tensor]:
        """An int8 trunk matrix of this folder as stored: (int8 [out, in], scale [out])
        (``quant.trunk_int8.read_int8``)."""
        info = self.info(canonical)
        return read_int8(info, self.int8_scales[info.name])

    def expert(self, layer: int, expert: int) -> ExpertLocation:
        """Byte ranges of one expert's parts, in packing order: its record in a quantized
        folder, else its matrices."""
        if self.quantization is not None:
            return ExpertLocation((self._tensors[self.names.record_name(layer, expert)],))
        infos = tuple(self._tensors[self.names.expert_name(layer, expert, w)]
                      for w in names.EXPERT_MATRICES)
        scales = tuple(self.fp8_scales[i.name] for i in infos if i.name in self.fp8_scales)
        return ExpertLocation(infos, scales)

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
        if location.scales:
            raise ValueError(f"expert L{layer}E{expert} is fp8: read it into a record with "
                             "quant.fp8_reader.Fp8Reader")
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


def _untie_if_head_given(config: ModelConfig, layout: str,
                         tensors: dict[str, TensorInfo]) -> ModelConfig:
    """``tie_word_embeddings`` true and an LM head in the files: the file's head is used, as
    transformers 5 does (its loader keeps both, untied, when they differ; when they are equal,
    either gives the same logits), and a warning says so."""
    head = names.file_name(layout, "lm_head", config.family)
    if not config.tie_word_embeddings or head not in tensors:
        return config
    log.warning("%s: tie_word_embeddings is true but %s holds '%s': using that tensor as the "
                "LM head, as transformers does (set tie_word_embeddings to false to silence "
                "this)", tensors[head].path.parent / "config.json", tensors[head].path, head)
    return replace(config, tie_word_embeddings=False)


def _check_dtype(info: TensorInfo, *, record: bool, fp8: bool = False) -> None:
    """Expert records are uint8 bytes; fp8 weights (with a scale) F8_E4M3; every other
    tensor is float32, bfloat16 or float16."""
    if fp8:
        return  # checked with its scale (quant.fp8_tensors)
    if record and info.dtype != torch.uint8:
        raise CheckpointError(f"{info.path}: tensor '{info.name}' has dtype {info.dtype}; an "
                              "expert record is uint8 (U8) bytes")
    if not record and info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{info.path}: tensor '{info.name}' has dtype {info.dtype}; "
                              "expected float32, bfloat16 or float16")
