"""``benchmarks/gguf_from_int4.py``: our int4 records become ggml Q4_1 blocks holding the same
weights, checked against a dequantizer written here from ggml's ``dequantize_row_q4_1``
(``ggml/src/ggml-quants.c``), for every int4 packing and two group sizes. Needs neither
llama.cpp nor its ``gguf`` package (the script imports it only to write a file).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from checkpoint_factory import (
    TinySpec,
    make_hf_checkpoint,
    mixtral_tokenizer_path,
    permute_hf_to_mistral,
)

from offload_rt.checkpoint import Checkpoint
from offload_rt.config import ModelConfig
from offload_rt.errors import CheckpointError
from offload_rt.quant import int4_layout
from offload_rt.quant.formats import Int4Format
from offload_rt.quant.int4 import layout_fingerprint, layout_probe, quantize_int4
from offload_rt.quant.quantize import QuantizeSettings, quantize
from offload_rt.safetensors_file import read_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gguf_from_int4 as g

HIDDEN, INTER = 128, 64


def dequantize_q4_1(blocks: torch.Tensor) -> np.ndarray:
    """ggml's dequantize_row_q4_1 on each row: uint8 [N, nb * 20] -> float32 [N, nb * 32].
    A block: fp16 d, fp16 m, qs[16]; y[j] = (qs[j] & 15) * d + m, y[j + 16] = (qs[j] >> 4)
    * d + m (ggml computes in float32)."""
    raw = blocks.numpy().reshape(blocks.shape[0], -1, 20)
    d = raw[..., 0:2].copy().view(np.float16).astype(np.float32)  # [N, nb, 1]
    m = raw[..., 2:4].copy().view(np.float16).astype(np.float32)
    qs = raw[..., 4:]
    low, high = (qs & 15).astype(np.float32), (qs >> 4).astype(np.float32)
    y = np.concatenate([low * d + m, high * d + m], axis=-1)  # [N, nb, 32]
    return y.reshape(blocks.shape[0], -1)


def reference(w: torch.Tensor, group: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(q - 8) * scale + zero in float64 from ``quantize_int4`` itself (not from the record)."""
    q, sz = quantize_int4(w, group, torch.bfloat16)
    scale, zero = sz.double().transpose(0, 1).unbind(-1)  # [N, K / G]
    wq = (q.double().view(q.shape[0], -1, group) - 8) * scale[..., None] + zero[..., None]
    return wq.view(q.shape).numpy(), q, sz


def layout_of(scheme: int4_layout.Scheme) -> str:
    """A cpu_layout string whose fingerprint names ``scheme`` (any CPU's packing)."""
    return f"test-{layout_fingerprint(int4_layout.pack(layout_probe(), scheme))}"


def record_in(scheme: int4_layout.Scheme, group: int, mats: list[torch.Tensor]
              ) -> tuple[torch.Tensor, Int4Format]:
    """A record of w1, w3, w2 packed in ``scheme`` (as torch packs under that ISA)."""
    fmt = Int4Format(HIDDEN, INTER, group, torch.bfloat16, layout_of(scheme))
    w1, w3, w2 = mats
    q13, sz13 = quantize_int4(torch.cat([w1, w3]), group, torch.bfloat16)
    q2, sz2 = quantize_int4(w2, group, torch.bfloat16)
    record = fmt.layout.pack({"w13": int4_layout.pack(q13, scheme), "s13": sz13,
                              "w2": int4_layout.pack(q2, scheme), "s2": sz2})
    return record, fmt


def expert(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))
    return [(torch.randn(s, generator=gen) * 0.05).to(torch.bfloat16) for s in shapes]


def assert_same_weights(rows: g.Q4_1Rows, want: np.ndarray) -> None:
    """ggml's values equal ours up to the reported fp16 roundings of d and m (and float32's
    rounding of d * q + m)."""
    got = dequantize_q4_1(rows.blocks)
    bound = 15 * rows.d_error + rows.m_error + 1e-6 * np.abs(want).max()
    assert np.abs(got - want).max() <= bound


@pytest.mark.parametrize("scheme", int4_layout.SCHEMES)
@pytest.mark.parametrize("group", [32, 64])
def test_record_becomes_q4_1_with_the_same_weights(scheme: int4_layout.Scheme,
                                                   group: int) -> None:
    mats = expert(group)
    record, fmt = record_in(scheme, group, mats)
    rows = g.expert_q4_1(record, fmt)
    for part, w in zip(("gate", "up", "down"), mats, strict=True):
        assert rows[part].blocks.shape == (w.shape[0], w.shape[1] // 32 * 20)
        assert_same_weights(rows[part], reference(w, group)[0])


def test_this_machines_records_convert() -> None:
    """The record ``offload-rt quantize`` writes here (torch's own packer)."""
    mats = expert(3)
    fmt = Int4Format(HIDDEN, INTER, 64, torch.bfloat16)
    rows = g.expert_q4_1(fmt.encode(*mats), fmt)
    assert_same_weights(rows["down"], reference(mats[2], 64)[0])


def swap_nibble_order(blocks: torch.Tensor) -> torch.Tensor:
    """The same values packed with byte j holding elements 2j and 2j + 1 (not j, j + 16)."""
    raw = blocks.clone().view(blocks.shape[0], -1, 20)
    qs = raw[..., 4:]
    values = torch.cat([qs & 15, qs >> 4], dim=-1)  # [N, nb, 32] in element order
    raw[..., 4:] = values[..., 0::2] | (values[..., 1::2] << 4)
    return raw.view(blocks.shape)


def test_a_wrong_nibble_order_is_caught() -> None:
    w = expert(5)[0]
    want, q, sz = reference(w, 32)
    rows = g.q4_1_blocks(q.to(torch.uint8), sz, 32)
    assert_same_weights(rows, want)
    swapped = g.Q4_1Rows(swap_nibble_order(rows.blocks), rows.d_error, rows.m_error)
    with pytest.raises(AssertionError):
        assert_same_weights(swapped, want)


def test_m_rounding_is_reported() -> None:
    """zero - 8 * scale that fp16 cannot hold: m is rounded, and by how much is reported."""
    scale, zero = float.fromhex("0x1.38p-7"), float.fromhex("0x1.8ap-10")  # both bf16
    # m = -0x1.31d8p-4 needs 14 significant bits; fp16 has 11
    sz = torch.tensor([scale, zero], dtype=torch.bfloat16).view(1, 1, 2)
    q = torch.arange(32, dtype=torch.uint8).remainder(16).view(1, 32)
    rows = g.q4_1_blocks(q, sz, 32)
    m = zero - 8 * scale
    assert rows.d_error == 0.0
    assert rows.m_error == abs(float(np.float16(m)) - m) > 0
    assert_same_weights(rows, ((q.double() - 8) * scale + zero).numpy())


def test_rotary_order_is_llama_cpps_interleaved_pairs() -> None:
    """llama.cpp's 'llama' rope rotates pairs (2i, 2i + 1): Mistral-native order."""
    w = torch.randn(4 * 16, 8)
    assert torch.equal(g.rotary_to_gguf(w, 4), permute_hf_to_mistral(w, 4))


def model_config(vocab_size: int, num_experts: int) -> ModelConfig:
    return ModelConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=32, num_experts=num_experts, top_k=2,
                       vocab_size=vocab_size, rms_norm_eps=1e-5, rope_theta=1e6,
                       max_seq_len=256)


def test_plan_has_converter_names_and_q4_1_sizes() -> None:
    cfg = model_config(vocab_size=512, num_experts=8)
    plan = {t.name: t for t in g.plan_tensors(cfg, torch.bfloat16)}
    assert len(plan) == 1 + 2 * 10 + 2
    gate, down = plan["blk.1.ffn_gate_exps.weight"], plan["blk.1.ffn_down_exps.weight"]
    assert (gate.qtype, gate.shape, gate.nbytes) == ("Q4_1", (8, INTER, HIDDEN),
                                                     8 * INTER * HIDDEN // 32 * 20)
    assert down.shape == (8, HIDDEN, INTER)
    assert {plan[f"blk.0.{n}.weight"].qtype for n in ("ffn_gate_inp", "attn_norm")} == {"F32"}
    assert (plan["blk.0.attn_k.weight"].qtype, plan["blk.0.attn_k.weight"].shape) == (
        "BF16", (64, HIDDEN))


SPEC = TinySpec(hidden_size=HIDDEN, intermediate_size=INTER, num_experts=4, vocab_size=128,
                dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny float Mixtral folder and its int4 (group 32) folder."""
    root = tmp_path_factory.mktemp("gguf")
    make_hf_checkpoint(root / "float", SPEC)
    quantize(root / "float", root / "int4", QuantizeSettings("int4", group_size=32))
    return root / "float", root / "int4"


def test_every_tensor_lands_at_its_offset(folders: tuple[Path, Path]) -> None:
    """The streamed data section: expert e of a layer at e x its size within the merged
    tensor, holding the float folder's matrix at int4 precision; q/k permuted; norms F32."""
    float_dir, int4_dir = folders
    ckpt, ref = Checkpoint.open(int4_dir), Checkpoint.open(float_dir)
    try:
        fmt, planned = g.int4_format(ckpt), g.plan_tensors(ckpt.config, ckpt.dtype)
        data = g.DataSection(io.BytesIO(), planned, 32)
        g.write_data(ckpt, fmt, planned, data, SimpleNamespace(update=lambda n: None))
        data.close(planned)
        raw, sizes = data.fout.getvalue(), {t.name: t for t in planned}

        def tensor(name: str) -> torch.Tensor:
            start = data.offsets[name]
            return torch.frombuffer(bytearray(raw[start:start + sizes[name].nbytes]),
                                    dtype=torch.uint8)

        for e in range(SPEC.num_experts):
            w2 = read_tensor(ref.expert(1, e).matrices[2])
            down = tensor("blk.1.ffn_down_exps.weight").view(SPEC.num_experts, HIDDEN, -1)[e]
            assert_same_weights(g.Q4_1Rows(down, 0.0, 0.0), reference(w2, 32)[0])
        wq = rotary_to_bytes(ref.read("layers.0.wq"), SPEC.num_heads)
        assert torch.equal(tensor("blk.0.attn_q.weight"), wq)
        norm = ref.read("layers.1.ffn_norm").float()
        assert torch.equal(tensor("blk.1.ffn_norm.weight").view(torch.float32), norm)
    finally:
        ckpt.close()
        ref.close()


def rotary_to_bytes(w: torch.Tensor, heads: int) -> torch.Tensor:
    return permute_hf_to_mistral(w, heads).contiguous().view(-1).view(torch.uint8)


def test_a_float_folder_is_refused(folders: tuple[Path, Path]) -> None:
    ckpt = Checkpoint.open(folders[0])
    try:
        with pytest.raises(CheckpointError, match="not an int4 folder"):
            g.int4_format(ckpt)
    finally:
        ckpt.close()


class Recorder:
    """Stands in for gguf.GGUFWriter: records what each add_* method was given."""

    def __init__(self) -> None:
        self.got: dict[str, object] = {}

    def __getattr__(self, name: str) -> object:
        return lambda value: self.got.__setitem__(name, value)


def test_vocabulary_is_the_sentencepiece_models() -> None:
    cfg = model_config(vocab_size=32000, num_experts=4)
    w = Recorder()
    g.add_vocab(w, mixtral_tokenizer_path(), cfg)
    tokens, types = w.got["add_token_list"], w.got["add_token_types"]
    assert len(tokens) == len(types) == len(w.got["add_token_scores"]) == 32000
    assert (tokens[1], tokens[2], tokens[3], tokens[13]) == (b"<s>", b"</s>", b"<0x00>", b"<0x0A>")
    assert types[:4] == [2, 3, 3, 6] and types[300] == 1  # unknown, control x2, byte, normal
    assert (w.got["add_bos_token_id"], w.got["add_eos_token_id"]) == (1, 2)


def test_a_vocabulary_of_another_size_is_refused() -> None:
    cfg = model_config(vocab_size=128, num_experts=4)
    with pytest.raises(CheckpointError, match="32000 pieces, but config.json's vocab_size is 128"):
        g.add_vocab(Recorder(), mixtral_tokenizer_path(), cfg)


def test_a_failed_write_leaves_no_file(folders: tuple[Path, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is written as OUT.partial and renamed only when complete."""
    def half_written(ckpt: Checkpoint, fmt: Int4Format, tokenizer: Path, path: Path,
                     progress: bool) -> dict[str, float]:
        path.write_bytes(b"GGUF")
        raise OSError("disk full")

    monkeypatch.setattr(g, "write_gguf", half_written)
    out = tmp_path / "m.gguf"
    with pytest.raises(OSError, match="disk full"):
        g.convert(folders[1], out, progress=False)
    assert list(tmp_path.iterdir()) == []
