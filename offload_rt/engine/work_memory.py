"""Working memory: the bytes a run allocates besides the trunk, the KV cache and the expert slots.

``work_bytes`` is ``budget.footprint``'s ``work`` term: the peak transient memory of the largest
forward pass (a full prefill chunk attending over the whole context; a decode step needs less),
plus what lives beside it: the GEMM libraries' own buffers, the sampler's copies of the logits,
the rotary tables, the buffers of expert reads in flight and the slot storage's alignment.

``forward_peak`` counts the tensors alive at the peak of each phase of ``Transformer.forward``
(the RMSNorms, the attention, the MoE layer, the LM head) from the model's shapes; the attention
kernel's own buffers follow torch's kernels (CPU: the flash kernel of
``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``; CUDA: bounded by the math path, the
largest). ``tests/test_work_memory.py`` measures the peak of torch's allocations during real
forwards (``torch.profiler``, ``profile_memory=True``) on several shapes and checks
measured <= ``forward_peak`` <= 2 x measured + 1 MiB; what torch's allocator does not see (MKL's
and oneDNN's buffers, ``gemm_scratch``) is measured as RSS by ``tests/test_rss_budget.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload_rt.config import ModelConfig
from offload_rt.direct_io import ALIGN, BOUNCE
from offload_rt.engine import quant_memory, trunk_memory
from offload_rt.engine.prefetch import PREFETCH_READERS
from offload_rt.model import cpu_linear
from offload_rt.quant import fp8_memory
from offload_rt.quant.formats import ExpertFormat, default_scale_dtype
from offload_rt.quant.fp8 import Fp8Format

MiB = 2**20
F32 = 4  # bytes of a float32: RMSNorm, router, softmax, logits and attention scores use it
I64 = 8  # bytes of an int64 index
FLASH_KV_BLOCK = 512  # key block of torch's CPU flash attention; its query block: _flash_q_block
# Library buffers outside torch's allocator, per intra-op thread (RSS measured on this project's
# 2-core EPYC, torch 2.13): MKL's float32 GEMM packing buffers grow with the weight, 0.3 MiB
# for 512x128, 2.3 MiB for 3072x512, 5.0 MiB from 4096x14336 on; oneDNN's bf16 GEMMs
# (scratchpad <= 193 KiB in torch's allocator, plus its generated kernels) ~1 MiB.
MKL_SCRATCH_MAX = 6 * MiB
ONEDNN_SCRATCH = 1 * MiB
ONEDNN_TORCH_SCRATCH = 256 * 2**10  # the part of it oneDNN takes from torch's allocator
# oneDNN's bf16 GEMMs (CPUs with bf16 instructions) keep ~0.7 MiB per (weight shape, row
# count) they have run, for the process's life (generated kernels, cached primitives; 33.8 MiB
# over the 49 pairs 57 prompt lengths add to the demo model; benchmarks/linear_bench.py's
# bf16_shapes); cpu_linear pads row counts to row_bucket's sizes so the pairs are bounded.
ONEDNN_PER_SHAPE = 704 * 2**10
CUDA_BLAS_WORKSPACES = 40 * MiB  # cuBLASLt's (32 MiB on Hopper, pytorch#120925) + cuBLAS's
# expert reads in flight at once: the forward's own (a miss) and each prefetch thread's
READERS = 1 + PREFETCH_READERS
# per vocabulary id: the sampler's float32/int64/bool copies of the logits (top-p: ~34), the
# finiteness check's and the never-sampled ids' mask's (~5)
SAMPLER_BYTES_PER_ID = 48
MARGIN_FRACTION = 8  # safety margin: 1/8 of the forward's peak ...
MARGIN_BYTES = 256 * 2**10  # ... plus 256 KiB (small tensors, allocator rounding)


@dataclass(frozen=True)
class _Shapes:
    """What the formulas need of a config and compute dtype (bytes are per token)."""

    h: int  # hidden size
    q: int  # query width, num_heads * head_dim
    kv: int  # key (or value) width, num_kv_heads * head_dim
    f: int  # expert intermediate size
    heads: int
    head_dim: int
    item: int  # bytes of one element in the compute dtype
    upcast: int  # 1 when .float() / .to(float32) copies (compute dtype is not float32)
    shared: int = 0  # a shared expert's intermediate size (0: none)

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: torch.dtype) -> _Shapes:
        item = torch.empty((), dtype=dtype).element_size()
        return cls(cfg.hidden_size, cfg.num_heads * cfg.head_dim,
                   cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size, cfg.num_heads,
                   cfg.head_dim, item, int(dtype != torch.float32), cfg.shared_expert_size)


def _norm(s: _Shapes) -> int:
    """RMSNorm of the residual h: h, and two float32 rows at a time (x32 and x32**2, then
    x32 * rsqrt and its cast and scaled copies)."""
    return s.item * s.h + 2 * F32 * s.h


def _attention(s: _Shapes) -> int:
    """Attention, at its widest (RoPE of q, or wo's input): h, the normed x, the new h, q, k, v,
    three RoPE temporaries of q (x*cos, rotate_half(x), its product with sin), cos/sin cast to
    the compute dtype, and the float32 log-sum-exp of the kernel per head. (q/k norms' float32
    temporaries come and go before RoPE's: measured, ``tests/test_families_memory.py``.)"""
    return s.item * (3 * s.h + 4 * s.q + 2 * s.kv + 2 * s.head_dim) + F32 * s.heads


def _moe(s: _Shapes, cfg: ModelConfig, dtype: torch.dtype, fmt: ExpertFormat | None,
         device_type: str = "cpu", tokens: int = 1) -> int:
    """The MoE layer: h, its normed input and the output accumulator; the router's logits,
    float32 probabilities and top-k; then one expert at a time on at most all tokens: its
    rows of x, [w1; w3] x (2F), silu(gate) and silu(gate) * up (F each) (a quantized
    ``fmt``: ``quant_memory.ffn_per_token``) while the previous expert's y is still held, or,
    while it is added into the output, y, y * weight (float32), its cast, out[tok] and their
    sum; a shared expert (after the routed ones): silu(gate), up and their product (S each),
    its output, the gated output and the sum."""
    router = cfg.num_experts * (s.item + F32 * (1 + s.upcast)) + cfg.top_k * (3 * F32 + I64)
    indices = 2 * I64 + cfg.top_k  # torch.where's token and slot ids, the top_ids == e mask
    ffn = s.item * (s.h + 4 * s.f)
    if fmt is not None and quant_memory.quantized(fmt):
        ffn = quant_memory.ffn_per_token(fmt, s.h, s.f, dtype, device_type=device_type,
                                         tokens=tokens)
    combine = s.item * 4 * s.h + F32 * s.h
    shared = s.item * (3 * s.shared + 3 * s.h) if s.shared else 0
    return s.item * 3 * s.h + router + indices + max(ffn + s.item * s.h, combine, shared)


def _fp32_matrices(cfg: ModelConfig, float_experts: bool = True,
                   dequantized: list[tuple[int, int]] | None = None,
                   trunk: str = "float") -> list[tuple[int, int]]:
    """(out, in) of every weight ``cpu_linear.linear`` may multiply with >= 16 rows of x:
    wq, wk/wv, wo (of a float ``trunk``: an int8 one counts its own, ``trunk_memory``), a
    float expert's [w1; w3] and w2, a shared expert's matrices (the LM head sees one row per
    forward; quantized experts run in their own kernels, or hand it ``dequantized`` weight
    blocks: ``quant_memory.dequant_matrices``)."""
    h, f, s = cfg.hidden_size, cfg.intermediate_size, cfg.shared_expert_size
    attention = trunk_memory.attention_matrices(cfg) if trunk != trunk_memory.INT8 else []
    experts = [(2 * f, h), (h, f)] if float_experts else []
    shared = [(s, h), (h, s), (1, h)] if s else []  # a shared expert: always float, resident
    return [*attention, *experts, *shared, *(dequantized or [])]


def _fp32_path(dtype: torch.dtype, device_type: str, tokens: int) -> bool:
    """Whether ``cpu_linear.linear`` takes its blockwise float32 path for ``tokens`` rows."""
    return (dtype == torch.bfloat16 and device_type == "cpu" and not cpu_linear.native_bf16()
            and tokens >= cpu_linear.FP32_MIN_TOKENS)


def _fp32_block(cfg: ModelConfig, float_experts: bool,
                dequantized: list[tuple[int, int]] | None = None,
                trunk: str = "float") -> tuple[int, int]:
    """(bytes per token, fixed bytes) of ``cpu_linear``'s float32 path: x in float32 and one
    block's float32 product per row; the float32 copy of one weight block."""
    per_token, fixed = 0, 0
    for out, inp in _fp32_matrices(cfg, float_experts, dequantized, trunk):
        rows = min(out, max(1, cpu_linear.FP32_BLOCK_BYTES // (F32 * inp)))
        per_token = max(per_token, F32 * (inp + rows))
        fixed = max(fixed, F32 * rows * inp)
    return per_token, fixed


def _flash_q_block(tokens: int) -> int:
    """The query block torch's CPU flash attention picks for ``tokens`` queries."""
    return 256 if tokens >= 768 else 64 if tokens >= 192 else 32


def _flash_cpu(s: _Shapes, tokens: int, keys: int, threads: int) -> int:
    """torch's CPU flash attention with our boolean mask: the mask and its copy in the compute
    dtype [T, S], key positions (int64), and per thread one block of float32 scores (plus its
    reduced copy), row maxima, sums and output accumulators."""
    if tokens == 1:  # a decode step passes no mask
        mask = 0
    else:
        mask = tokens * keys * (1 + s.item) + I64 * (4 * keys + 2 * tokens)
    qb, kb = min(tokens, _flash_q_block(tokens)), min(keys, FLASH_KV_BLOCK)
    per_thread = qb * kb * (F32 + s.item * s.upcast) + F32 * qb * (2 + s.head_dim)
    return mask + threads * per_thread


def _math(s: _Shapes, tokens: int, keys: int) -> int:
    """The math path of ``scaled_dot_product_attention`` (what CUDA falls back to with a mask
    and grouped-query heads): q, k, v in float32, k and v repeated to every query head, the
    mask as float32, scores and their softmax in float32 and a copy in the compute dtype."""
    kv_heads = s.kv // s.head_dim
    return (s.heads * tokens * keys * (2 * F32 + s.item) + tokens * keys * (1 + F32)
            + 2 * (s.heads + kv_heads) * keys * s.head_dim * F32
            + 3 * s.heads * tokens * s.head_dim * F32 + I64 * (4 * keys + 2 * tokens))


def forward_peak(cfg: ModelConfig, dtype: torch.dtype, tokens: int, keys: int, *,
                 device_type: str = "cpu", threads: int = 1, window: bool = False,
                 fmt: ExpertFormat | None = None, trunk: str = "float") -> int:
    """Peak bytes one ``Transformer.forward(..., last_only=True)`` allocates on top of its
    weights and KV cache: ``tokens`` new tokens attending over ``keys`` positions.

    The widest phase's [tokens, width] tensors (norm, attention or MoE, with every token routed
    to one expert: the worst case), what the attention kernel adds for tokens x keys (one
    block of scores per thread on a CPU), the oneDNN GEMM scratchpad it takes from torch's
    allocator, and the float32 logits [1, V] (and the previous chunk's, which the prefill loop
    still holds).
    ``window``: a chunk running past a full sliding window, whose mask takes one more [T, S]
    (its concatenated keys and values are counted in the KV cache term).
    ``fmt``: the experts' format (None: float); quantized experts add what their kernels
    allocate (``quant_memory``). ``trunk``: "int8" adds what the int8 attention projections
    and LM head allocate (``trunk_memory``).
    """
    s = _Shapes.of(cfg, dtype)
    float_experts = not quant_memory.quantized(fmt)
    attending = _attention(s) + trunk_memory.per_token(cfg, dtype, trunk, tokens)
    per_token = max(_norm(s), attending, _moe(s, cfg, dtype, fmt, device_type, tokens))
    weight_block = trunk_memory.fixed(cfg, dtype, trunk, tokens)
    if fmt is not None and not float_experts:
        weight_block = max(weight_block, quant_memory.ffn_fixed(fmt, s.h, s.f, device_type,
                                                                tokens))
    if _fp32_path(dtype, device_type, tokens):
        dequantized = quant_memory.dequant_matrices(fmt, s.h, s.f, tokens, device_type)
        extra, block = _fp32_block(cfg, float_experts, dequantized, trunk)
        per_token += extra
        weight_block = max(weight_block, block)
    scratch = 0
    if device_type == "cpu":
        attention = _flash_cpu(s, tokens, keys, threads)
        onednn = _onednn(dtype, tokens) or _dequant_onednn(cfg, fmt, tokens, dtype, trunk)
        scratch = threads * ONEDNN_TORCH_SCRATCH if onednn else 0
    else:  # CUDA: a masked grouped-query prefill takes the math path; it bounds the others
        attention = _math(s, tokens, keys)
    if window:
        attention += tokens * keys
    head = cfg.vocab_size * (s.item + F32 * s.upcast + F32) + trunk_memory.head_bytes(
        cfg, dtype, trunk)
    fp8 = fp8_memory.fixed_bytes(fmt, dtype)  # fp8 experts' dequantized matrix (0 otherwise)
    return tokens * per_token + attention + weight_block + head + scratch + fp8


def _onednn(dtype: torch.dtype, tokens: int) -> bool:
    """Whether a CPU GEMM of ``tokens`` rows runs in oneDNN's 16-bit kernels (else MKL's
    float32 GEMM)."""
    return dtype != torch.float32 and not _fp32_path(dtype, "cpu", tokens)


def _dequant_onednn(cfg: ModelConfig, fmt: ExpertFormat | None, tokens: int,
                    dtype: torch.dtype = torch.float32, trunk: str = "float") -> bool:
    """Whether quantized experts' or an int8 ``trunk``'s dequantize + GEMM path runs oneDNN's
    16-bit GEMMs on ``tokens`` rows (it computes in the scale dtype, whatever the compute
    dtype ``dtype``)."""
    blocks = quant_memory.dequant_matrices(fmt, cfg.hidden_size, cfg.intermediate_size, tokens)
    experts = bool(blocks) and fmt is not None and fmt.scale_dtype is not None \
        and _onednn(fmt.scale_dtype, tokens)
    trunk_blocks = trunk_memory.dequant_blocks(cfg, dtype, trunk, tokens)
    return experts or bool(trunk_blocks) and _onednn(default_scale_dtype(dtype), tokens)


def gemm_scratch(cfg: ModelConfig, dtype: torch.dtype, tokens: int, *,
                 device_type: str = "cpu", threads: int = 1,
                 fmt: ExpertFormat | None = None, trunk: str = "float") -> int:
    """Bytes the GEMM libraries hold outside torch's allocator: on a CPU per thread, MKL's
    float32 packing buffers (float32 compute or ``cpu_linear``'s float32 path: at most
    ``MKL_SCRATCH_MAX``, less for small weights) or oneDNN's (bf16); on CUDA the cuBLAS and
    cuBLASLt workspaces torch allocates per handle and stream."""
    if device_type != "cpu":
        return CUDA_BLAS_WORKSPACES
    onednn = threads * (ONEDNN_SCRATCH - ONEDNN_TORCH_SCRATCH)  # the rest is in forward_peak
    if _onednn(dtype, tokens):
        return onednn
    dequantized = quant_memory.dequant_matrices(fmt, cfg.hidden_size, cfg.intermediate_size,
                                                tokens)
    dequantized += trunk_memory.dequant_blocks(cfg, dtype, trunk, tokens)
    largest = max((out * inp for out, inp in
                   _fp32_matrices(cfg, not quant_memory.quantized(fmt), dequantized, trunk)),
                  default=0)
    # a float32 run whose quantized experts or int8 trunk multiply in 16 bits
    both = onednn if _dequant_onednn(cfg, fmt, tokens, dtype, trunk) else 0
    return threads * min(MKL_SCRATCH_MAX, 2 * F32 * largest) + both


def onednn_shapes(cfg: ModelConfig, dtype: torch.dtype, tokens: int,
                  fmt: ExpertFormat | None = None, trunk: str = "float") -> int:
    """Bytes oneDNN keeps for every GEMM shape a session can run (``ONEDNN_PER_SHAPE`` per
    distinct weight shape x padded row count ``cpu_linear.row_bucket`` up to ``tokens``; the LM
    head sees one row): 0 unless bf16 runs in oneDNN's kernels (a CPU with bf16
    instructions). Quantized experts' dequantized weight blocks count from their row
    threshold on, when their scale dtype is bf16, whatever the compute dtype; so do an int8
    ``trunk``'s attention projections (``trunk_memory.dequant_blocks``)."""
    if not cpu_linear.native_bf16():
        return 0
    shapes = 0
    if dtype == torch.bfloat16:
        buckets = len({cpu_linear.row_bucket(rows) for rows in range(1, tokens + 1)})
        weights = set(_fp32_matrices(cfg, not quant_memory.quantized(fmt), trunk=trunk))
        weights.add((cfg.num_experts, cfg.hidden_size))  # the router
        shapes += buckets * len(weights) + 1
    blocks = quant_memory.dequant_matrices(fmt, cfg.hidden_size, cfg.intermediate_size, tokens)
    if blocks and fmt is not None and fmt.scale_dtype == torch.bfloat16:
        low = quant_memory.dequant_min_rows(fmt)
        shapes += len(blocks) * len({cpu_linear.row_bucket(r) for r in range(low, tokens + 1)})
    trunk_blocks = trunk_memory.dequant_blocks(cfg, dtype, trunk, tokens)
    if trunk_blocks and default_scale_dtype(dtype) == torch.bfloat16:
        low = trunk_memory.dequant_min_rows(cfg)
        shapes += len(trunk_blocks) * len({cpu_linear.row_bucket(r)
                                           for r in range(low, tokens + 1)})
    return ONEDNN_PER_SHAPE * shapes


def reader_bytes(cfg: ModelConfig, dtype: torch.dtype, file_dtype: torch.dtype | None,
                 fmt: ExpertFormat | None = None) -> int:
    """Host bytes the expert reads in flight use besides their slots (``Checkpoint
    .read_expert_into``): a matrix read in its file dtype before conversion, which cannot land
    in place, so it passes through a bounce buffer of up to ``direct_io.BOUNCE`` bytes; without
    conversion only the < 4 KiB head and tail of each matrix (or record) are bounced. Float
    experts quantized as they are read (``fmt`` quantized, ``file_dtype`` a float dtype):
    ``quant_memory.encode_bytes`` per read."""
    stored = dtype if fmt is None else fmt.storage_dtype
    if file_dtype is None or file_dtype == stored:
        return READERS * 3 * ALIGN
    if fmt is not None and quant_memory.quantized(fmt):
        return READERS * quant_memory.encode_bytes(fmt, cfg.hidden_size, cfg.intermediate_size,
                                                   file_dtype)
    if isinstance(fmt, Fp8Format):  # fp8 matrices read as they are, their scales converted
        return READERS * fp8_memory.read_bytes(fmt)
    matrix = cfg.intermediate_size * cfg.hidden_size * torch.empty(
        (), dtype=file_dtype).element_size()
    return READERS * (matrix + min(BOUNCE, matrix) + 2 * ALIGN)


def work_bytes(cfg: ModelConfig, dtype: torch.dtype, max_seq_len: int, chunk: int, *,
               kv_positions: int | None = None, device_type: str = "cpu",
               file_dtype: torch.dtype | None = None, threads: int | None = None,
               fmt: ExpertFormat | None = None, trunk: str = "float") -> int:
    """The ``work`` term of the device budget for a context of ``max_seq_len`` positions
    prefilled ``chunk`` tokens at a time; ``kv_positions``: the KV cache's capacity when a
    sliding window makes it smaller than the context.

    The largest forward (a full chunk attending over the most keys) and the GEMM libraries'
    buffers, plus a safety margin of 1/8 of them and 256 KiB; the rotary tables (float32
    [max_seq_len, head_dim], two) and the slot storage's alignment; on a CPU run (where the
    device is RAM) also the sampler's copies of the logits and the expert-read buffers
    (``reader_bytes``). ``threads``: torch's intra-op threads (default:
    ``torch.get_num_threads()`` now), each owning an attention block and GEMM buffers.
    ``fmt``: the experts' format (None: float in ``dtype``); ``file_dtype``: the dtype the
    experts are stored in (uint8 for a quantized folder's records); ``trunk``: the trunk's
    format ("float", or "int8": ``trunk_memory``).
    """
    tokens = min(chunk, max_seq_len)
    held = max_seq_len if kv_positions is None else min(kv_positions, max_seq_len)
    window = held < max_seq_len and tokens > 1
    keys = min(max_seq_len, held + tokens) if window else held
    threads = torch.get_num_threads() if threads is None else threads
    peak = forward_peak(cfg, dtype, tokens, keys, device_type=device_type, threads=threads,
                        window=window, fmt=fmt, trunk=trunk)
    peak += gemm_scratch(cfg, dtype, tokens, device_type=device_type, threads=threads, fmt=fmt,
                         trunk=trunk)
    margin = peak // MARGIN_FRACTION + MARGIN_BYTES
    tables = 2 * F32 * max_seq_len * cfg.head_dim
    work = peak + margin + tables + ALIGN
    if device_type == "cpu":
        work += SAMPLER_BYTES_PER_ID * cfg.vocab_size + reader_bytes(cfg, dtype, file_dtype,
                                                                     fmt)
    return work
