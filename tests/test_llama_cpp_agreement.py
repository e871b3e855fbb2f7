"""``benchmarks/llama_cpp_agreement.py`` writes llama-perplexity's KL-divergence base file as
``tools/perplexity/perplexity.cpp`` reads it, and reads its report. No llama.cpp needed."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llama_cpp_agreement as agreement

# perplexity.cpp's per-chunk line: chunk, PPL, ln(PPL ratio), KL, RMS dp, same top p (cumulative)
LINE = "%4d    %9.4f ± %9.4f    %10.5f ± %10.5f    %10.5f ± %10.5f    %6.3f ± %6.3f %%    " \
       "%6.3f ± %6.3f %%"
SAME_TOP = [3.125, 3.125, 3.125, 2.344, 2.5]  # a real run's, 32 positions per chunk
CHUNKS = "chunk   PPL   ln(PPL(Q)/PPL(base))   KL Divergence   Δp RMS   Same top p\n" + "\n".join(
    LINE % (c + 1, 920.8729, 44.05, -90.27, 2.9, 0.0, 0.0, 0.117, 0.008, p, 3.1)
    for c, p in enumerate(SAME_TOP))
SUMMARY = """Mean    KLD:   0.000243 ±   0.000072
Maximum KLD:   0.004768
Median  KLD:   0.000048
RMS Δp    :  0.004 ± 0.001 %
Same top p: 91.406 ± 2.487 %
"""


def decode(row: np.ndarray) -> np.ndarray:
    """What perplexity.cpp's kl-divergence reads: p_log = scale * step + min."""
    scale, low = struct.unpack("<ff", row[:4].tobytes())
    return scale * row[4:].astype(np.float64) + low


def test_row_holds_our_log_probabilities() -> None:
    logits = torch.randn(101, generator=torch.Generator().manual_seed(0)) * 4
    row = agreement.logprob_row(logits)
    assert row.dtype == np.uint16 and row.shape == (101 + 4,)
    want = torch.log_softmax(logits.double(), -1).numpy()
    kept = logits.numpy() > logits.max().item() - 16
    scale = struct.unpack("<f", row[:2].tobytes())[0]
    assert np.abs(decode(row) - want)[kept].max() <= scale
    assert not row[4:][~kept].any() and not kept.all()  # 16 below the top or more: step 0
    assert decode(row).argmax() == want.argmax()


def test_a_blank_row_tops_at_token_0_below_the_kl_cutoff() -> None:
    got = decode(agreement.blank_row(50))
    assert got.argmax() == 0 and got.max() < -16  # perplexity.cpp skips p_log <= -16 in KL


def test_base_file_layout(tmp_path: Path) -> None:
    n_ctx, vocab = 6, 10
    rows = [agreement.logprob_row(torch.randn(vocab)) for _ in range(n_ctx - 1 - n_ctx // 2)]
    chunks = [(list(range(n_ctx)), rows), (list(range(10, 10 + n_ctx)), rows)]
    agreement.write_base(tmp_path / "b.kld", chunks, n_ctx, vocab)
    raw = (tmp_path / "b.kld").read_bytes()
    assert raw[:8] == b"_logits_" and struct.unpack("<Iii", raw[8:20]) == (n_ctx, vocab, 2)
    assert np.frombuffer(raw[20:20 + 4 * n_ctx], np.int32).tolist() == list(range(n_ctx))
    nv = 2 * ((vocab + 1) // 2) + 4  # perplexity.cpp's row length in uint16
    assert len(raw) == 20 + 2 * n_ctx * 4 + 2 * len(rows) * nv * 2


def test_the_report_is_read() -> None:
    assert agreement.same_top_per_chunk(CHUNKS, 32) == [1, 1, 1, 0, 1]
    assert agreement.parse_summary(SUMMARY) == {
        "mean_kld": 0.000243, "max_kld": 0.004768, "median_kld": 0.000048,
        "rms_dp_percent": 0.004, "same_top_percent": 91.406}
