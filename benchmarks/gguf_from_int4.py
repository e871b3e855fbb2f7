"""A GGUF file llama.cpp loads, holding the same weights as an offload_rt int4 folder.

    PYTHONPATH=/path/to/llama.cpp/gguf-py python benchmarks/gguf_from_int4.py \
        /tmp/bench/small-int4 /tmp/bench/small-q4_1.gguf [--tokenizer tokenizer.model]

For benchmarks only (``llama_cpp_peer.py``). The layout is what llama.cpp's
``convert_hf_to_gguf.py`` writes for Mixtral (``conversion/llama.py``): arch ``llama``, each
layer's experts merged into ``blk.N.ffn_{gate,up,down}_exps`` [n_expert, rows, cols], q/k rows
in interleaved rotary order (``LlamaModel.permute``), norms and router F32, the rest of the
trunk in the folder's dtype. Experts become ggml's Q4_1 (``ggml-common.h`` ``block_q4_1``:
fp16 d, fp16 m, qs[16] with element j in the low nibble of byte j and j + 16 in its high one;
w = d * q + m, ``dequantize_row_q4_1``): a group of G (``quant/int4.py``: w = (q - 8) * scale
+ zero) is G / 32 blocks with d = scale, m = zero - 8 * scale, equal up to rounding d and m
to fp16 (reported). A folder without a tokenizer gets Mixtral's from mistral-common. The data
is streamed (one expert record in memory); ``gguf`` (llama.cpp's gguf-py) is imported only to
write, so ``q4_1_blocks`` and the plan need torch alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from offload_rt.checkpoint import Checkpoint
from offload_rt.config import ModelConfig
from offload_rt.errors import CheckpointError, OffloadError
from offload_rt.quant.formats import Int4Format, make_format
from offload_rt.quant.int4_layout import unpack_t

QK4_1 = 32  # values per Q4_1 block
TYPE_SIZES = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_1": (QK4_1, 20)}  # gguf's
#                                                     GGML_QUANT_SIZES: (block values, bytes)
FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
MOSTLY_Q4_1 = 3  # gguf.LlamaFileType
TOKEN_TYPES = {"normal": 1, "unknown": 2, "control": 3, "unused": 5, "byte": 6}  # gguf.TokenType


@dataclass(frozen=True)
class Q4_1Rows:
    """Rows as Q4_1 blocks: ``blocks`` uint8 [N, K / 32 * 20]; the largest |fp16(x) - x| of
    the blocks' d (= scale) and m (= zero - 8 * scale)."""

    blocks: torch.Tensor
    d_error: float
    m_error: float


def q4_1_blocks(q: torch.Tensor, scale_zero: torch.Tensor, group: int) -> Q4_1Rows:
    """q uint8 [N, K] in 0..15, scale_and_zero [K / group, N, 2] (w = (q - 8) * scale + zero)
    -> the same rows as Q4_1 blocks (ggml-common.h ``block_q4_1``; group a multiple of 32)."""
    n, k = q.shape
    if group % QK4_1 or k % group:
        raise ValueError(f"group {group} must be a multiple of {QK4_1} dividing {k} columns")
    scale, zero = scale_zero.double().transpose(0, 1).unbind(-1)  # [N, K / G] each
    d_exact, m_exact = scale, zero - 8 * scale
    d, m = d_exact.to(torch.float16), m_exact.to(torch.float16)
    if not (d.isfinite().all() and m.isfinite().all()):
        raise ValueError("a scale or zero point is outside fp16's range")
    per, nb = group // QK4_1, k // QK4_1
    pairs = q.reshape(n, nb, 2, QK4_1 // 2)  # element j and j + 16 of each block share byte j
    out = torch.empty(n, nb, 20, dtype=torch.uint8)
    out[..., 0:2] = d.repeat_interleave(per, dim=1).contiguous().view(torch.uint8).view(n, nb, 2)
    out[..., 2:4] = m.repeat_interleave(per, dim=1).contiguous().view(torch.uint8).view(n, nb, 2)
    out[..., 4:] = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
    return Q4_1Rows(out.view(n, nb * 20), (d.double() - d_exact).abs().max().item(),
                    (m.double() - m_exact).abs().max().item())


def expert_q4_1(record: torch.Tensor, fmt: Int4Format) -> dict[str, Q4_1Rows]:
    """One int4 record (``formats.Int4Format``) -> its gate (w1 [F, H]), up (w3 [F, H]) and
    down (w2 [H, F]) matrices as Q4_1 rows; the nibbles are read in the record's own layout."""
    if fmt.scheme is None:
        raise CheckpointError(f"int4 layout {fmt.cpu_layout!r} is none offload_rt can unpack")
    v, f = fmt.layout.views(record), fmt.inter
    w13 = unpack_t(v["w13"], fmt.scheme).t()  # [2F, H]
    w2 = unpack_t(v["w2"], fmt.scheme).t()  # [H, F]
    return {"gate": q4_1_blocks(w13[:f], v["s13"][:, :f], fmt.group),
            "up": q4_1_blocks(w13[f:], v["s13"][:, f:], fmt.group),
            "down": q4_1_blocks(w2, v["s2"], fmt.group)}


def rotary_to_gguf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """wq/wk rows from HF's rotate-half order to interleaved pairs (``LlamaModel.permute``)."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


@dataclass(frozen=True)
class Planned:
    """One GGUF tensor: name, ggml type, shape (outermost first), the canonical offload_rt
    tensor it comes from (None: a layer's experts)."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    source: str | None = None

    @property
    def nbytes(self) -> int:
        values, size = TYPE_SIZES[self.qtype]
        numel = 1
        for d in self.shape:
            numel *= d
        return numel // values * size


def plan_tensors(cfg: ModelConfig, dtype: torch.dtype) -> list[Planned]:
    """Every tensor of the file, in file order (layer by layer, as data is written)."""
    h, f, e, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.head_dim
    mat = FLOAT_TYPES[dtype]
    out = [("token_embd", mat, (cfg.vocab_size, h), "embed")]
    for i in range(cfg.num_layers):
        blk, src = f"blk.{i}.", f"layers.{i}."
        out += [(blk + "attn_norm", "F32", (h,), src + "attn_norm"),
                (blk + "attn_q", mat, (cfg.num_heads * d, h), src + "wq"),
                (blk + "attn_k", mat, (cfg.num_kv_heads * d, h), src + "wk"),
                (blk + "attn_v", mat, (cfg.num_kv_heads * d, h), src + "wv"),
                (blk + "attn_output", mat, (h, cfg.num_heads * d), src + "wo"),
                (blk + "ffn_norm", "F32", (h,), src + "ffn_norm"),
                (blk + "ffn_gate_inp", "F32", (e, h), src + "router"),
                (blk + "ffn_gate_exps", "Q4_1", (e, f, h), None),
                (blk + "ffn_up_exps", "Q4_1", (e, f, h), None),
                (blk + "ffn_down_exps", "Q4_1", (e, h, f), None)]
    out.append(("output_norm", "F32", (h,), "norm"))
    if not cfg.tie_word_embeddings:  # tied: llama.cpp reuses token_embd
        out.append(("output", mat, (cfg.vocab_size, h), "lm_head"))
    return [Planned(f"{name}.weight", *rest) for name, *rest in out]


def trunk_data(ckpt: Checkpoint, t: Planned) -> torch.Tensor:
    """The bytes of trunk tensor ``t`` (uint8, contiguous)."""
    assert t.source is not None
    w = ckpt.read(t.source)
    if t.source.endswith((".wq", ".wk")):
        cfg = ckpt.config
        w = rotary_to_gguf(w, cfg.num_heads if t.source.endswith(".wq") else cfg.num_kv_heads)
    dtype = next(d for d, name in FLOAT_TYPES.items() if name == t.qtype)
    return w.to(dtype).contiguous().view(-1).view(torch.uint8)


def int4_format(ckpt: Checkpoint) -> Int4Format:
    """The folder's int4 format; ``CheckpointError`` for what this file cannot represent."""
    cfg, quant = ckpt.config, ckpt.quantization
    where = ckpt.model_dir / "config.json"
    if quant is None or quant.format_name != "int4":
        raise CheckpointError(f"{where}: not an int4 folder (offload-rt quantize --experts int4 "
                              "writes one); the experts must be int4 to map onto Q4_1")
    if cfg.family != "mixtral":
        raise CheckpointError(f"{where}: model_type {cfg.family!r}: only Mixtral maps onto "
                              "llama.cpp's 'llama' architecture here")
    if cfg.sliding_window is not None:
        raise CheckpointError(f"{where}: sliding_window {cfg.sliding_window}: llama.cpp's "
                              "'llama' architecture attends to the whole context")
    fmt = make_format(quant.spec, cfg.hidden_size, cfg.intermediate_size, ckpt.dtype,
                      torch.device("cpu"), str(where))
    assert isinstance(fmt, Int4Format)
    return fmt


def mixtral_tokenizer() -> Path:
    """Mixtral's SentencePiece model inside the mistral-common wheel."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def tokenizer_path(model_dir: Path, given: Path | None) -> Path:
    """``given``, else the folder's tokenizer.model, else Mixtral's (a folder without one)."""
    if given is not None:
        return given
    if (model_dir / "tokenizer.model").is_file():
        return model_dir / "tokenizer.model"
    if (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{model_dir / 'tokenizer.json'}: only SentencePiece vocabularies "
                              "are written here; pass --tokenizer tokenizer.model")
    return mixtral_tokenizer()


def add_vocab(w: Any, path: Path, cfg: ModelConfig) -> None:
    """A SentencePiece vocabulary as the converter writes one (``_set_vocab_sentencepiece``);
    ``CheckpointError`` when its size is not config.json's vocab_size."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    n = sp.vocab_size()
    if n != cfg.vocab_size:
        raise CheckpointError(f"{path}: {n} pieces, but config.json's vocab_size is "
                              f"{cfg.vocab_size}")
    kinds = [("unknown", sp.IsUnknown), ("control", sp.IsControl), ("unused", sp.IsUnused),
             ("byte", sp.IsByte)]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([sp.IdToPiece(i).encode() for i in range(n)])
    w.add_token_scores([sp.GetScore(i) for i in range(n)])
    w.add_token_types([next((TOKEN_TYPES[k] for k, test in kinds if test(i)),
                            TOKEN_TYPES["normal"]) for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(cfg.eos_token_ids[0] if cfg.eos_token_ids else sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def add_metadata(w: Any, cfg: ModelConfig, name: str) -> None:
    """The model's KV pairs, as ``convert_hf_to_gguf.py`` writes them for a Mixtral folder."""
    import gguf

    w.add_name(name)
    w.add_file_type(MOSTLY_Q4_1)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.top_k)


class DataSection:
    """The data section of an open GGUF file, written in place: each tensor's offset is
    known from the tensor infos, so parts of tensors may be written in any order."""

    def __init__(self, fout: BinaryIO, planned: list[Planned], alignment: int) -> None:
        def pad(x: int) -> int:
            return -(-x // alignment) * alignment

        self.fout, self.offsets, pos = fout, {}, pad(fout.tell())
        for t in planned:
            self.offsets[t.name] = pos
            pos += pad(t.nbytes)
        self.end, self.written = pos, dict.fromkeys(self.offsets, 0)

    def put(self, name: str, data: torch.Tensor, at: int = 0) -> int:
        """Write ``data`` (uint8) ``at`` bytes into tensor ``name``; returns its size."""
        self.fout.seek(self.offsets[name] + at)
        self.fout.write(data.contiguous().numpy().data)
        self.written[name] += data.numel()
        return data.numel()

    def close(self, planned: list[Planned]) -> None:
        short = [t.name for t in planned if self.written[t.name] != t.nbytes]
        if short:
            raise RuntimeError(f"tensors not fully written: {short[:5]}")
        self.fout.truncate(self.end)  # zero padding after the last tensor


def write_data(ckpt: Checkpoint, fmt: Int4Format, planned: list[Planned], data: DataSection,
               bar: Any) -> dict[str, float]:
    """Trunk tensors and expert records, layer by layer; the largest d and m roundings."""
    worst = {"d": 0.0, "m": 0.0}
    record = torch.empty(fmt.nbytes, dtype=torch.uint8)
    for t in planned:
        if t.source is not None:
            bar.update(data.put(t.name, trunk_data(ckpt, t)))
        elif t.name.endswith("ffn_gate_exps.weight"):
            layer = int(t.name.split(".")[1])
            for e in range(ckpt.config.num_experts):
                ckpt.read_expert_into(layer, e, record)
                for part, rows in expert_q4_1(record, fmt).items():
                    name = f"blk.{layer}.ffn_{part}_exps.weight"
                    bar.update(data.put(name, rows.blocks.view(-1), e * rows.blocks.numel()))
                    worst["d"], worst["m"] = (max(worst["d"], rows.d_error),
                                              max(worst["m"], rows.m_error))
    return worst


def write_gguf(ckpt: Checkpoint, fmt: Int4Format, tokenizer: Path, path: Path,
               progress: bool) -> dict[str, float]:
    """Write the file: KV pairs and tensor infos, then the data in place; the largest d and m
    roundings."""
    import gguf
    from tqdm import tqdm

    planned = plan_tensors(ckpt.config, ckpt.dtype)
    w = gguf.GGUFWriter(path, "llama")
    add_metadata(w, ckpt.config, ckpt.model_dir.name)
    add_vocab(w, tokenizer, ckpt.config)
    for t in planned:
        qtype = gguf.GGMLQuantizationType[t.qtype]
        w.add_tensor_info(t.name, gguf.quant_shape_to_byte_shape(t.shape, qtype),
                          np.dtype(np.uint8), t.nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    try:
        data = DataSection(w.fout[0], planned, w.data_alignment)
        total = sum(t.nbytes for t in planned)
        with tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar:
            worst = write_data(ckpt, fmt, planned, data, bar)
        data.close(planned)
    finally:
        w.close()
    return {**worst, "tensors": len(planned)}


def convert(model_dir: Path, out: Path, tokenizer: Path | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Write ``out`` (as ``out``.partial, renamed when complete); the JSON line's summary."""
    t0, partial = time.monotonic(), out.with_name(out.name + ".partial")
    ckpt = Checkpoint.open(model_dir)
    try:
        fmt, vocab = int4_format(ckpt), tokenizer_path(model_dir, tokenizer)
        got = write_gguf(ckpt, fmt, vocab, partial, progress)
        partial.replace(out)
    finally:
        ckpt.close()
        partial.unlink(missing_ok=True)
    return {"out": str(out), "bytes_written": out.stat().st_size, "tensors": got["tensors"],
            "seconds": round(time.monotonic() - t0, 2), "tokenizer": str(vocab),
            "group_size": fmt.group, "max_abs_d_rounding": got["d"],
            "max_abs_m_rounding": got["m"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path, help="an offload_rt int4 folder (Mixtral)")
    p.add_argument("out", type=Path, help="the GGUF file to write")
    p.add_argument("--tokenizer", type=Path, help="SentencePiece tokenizer.model (default: the "
                   "folder's, else Mixtral's from mistral-common)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        print(json.dumps(convert(a.model_dir, a.out, a.tokenizer, not a.no_progress)))
    except OffloadError as exc:
        print(f"gguf_from_int4: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
