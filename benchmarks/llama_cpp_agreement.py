"""Does llama.cpp compute what offload_rt computes? KL and top-1 agreement on the same token ids.

    python benchmarks/llama_cpp_agreement.py /tmp/bench/small-int4 /tmp/peer/small-q4_1.gguf \
        --llama-bin /path/to/llama.cpp/build/bin [--prompts 4] [--per-position]

Our greedy continuations (the decode path: prefill, then one token per step) of seeded prompts
(BOS + P ids) and our logits at each of their positions are written as a ``llama-perplexity
--kl-divergence-base`` file (``tools/perplexity/perplexity.cpp``: "_logits_", n_ctx, n_vocab,
n_chunk, the token ids, then per chunk and scored position the log-probabilities as two floats
(scale, min) and n_vocab 16-bit steps); ``llama-perplexity --kl-divergence`` runs the GGUF on
exactly those ids and compares. It scores positions n_ctx / 2 .. n_ctx - 2 of each chunk, so
a chunk is BOS + P prompt ids + P - 1 new tokens (n_ctx = 2 P): every new token's prediction
is scored. ``--per-position`` writes a second file with one chunk per scored position, in which
every other row has its top token at id 0 and probabilities below e^-16 (adding nothing to KL):
the per-chunk "Same top p" then says whether llama.cpp's top token equals ours at that
position (the first position where it does not is where greedy outputs part). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import offload_rt

SUMMARY = {"mean_kld": r"Mean\s+KLD:\s+(\S+)", "max_kld": r"Maximum KLD:\s+(\S+)",
           "median_kld": r"Median\s+KLD:\s+(\S+)", "rms_dp_percent": r"RMS Δp\s*:\s+(\S+)",
           "same_top_percent": r"Same top p:\s+(\S+)"}
CHUNK_LINE = re.compile(r"^\s*\d+\s+\S+\s+±.*?([-\d.]+)\s*±\s*[-\d.]+\s*%\s*$")


def greedy_with_logits(rt: offload_rt.Runtime, ids: list[int], n_ctx: int
                       ) -> tuple[list[int], torch.Tensor]:
    """``ids`` continued greedily to ``n_ctx`` tokens; float32 logits [n_ctx - 1, V] at
    positions 0 .. n_ctx - 2, computed as generation computes them."""
    rt.model.reset()
    logits, tokens = [rt.model(torch.tensor(ids), 0)], list(ids)
    for pos in range(len(ids), n_ctx):
        tokens.append(int(logits[-1][-1].argmax()))
        if pos < n_ctx - 1:
            logits.append(rt.model(torch.tensor(tokens[-1:]), pos))
    return tokens, torch.cat(logits).float()


def logprob_row(logits: torch.Tensor) -> np.ndarray:
    """One position's log-probabilities as perplexity.cpp's ``log_softmax`` stores them:
    uint16 [2 + 2 + V] (float scale, float min, then (log p - min) / scale rounded, for the
    logits within 16 of the largest; 0 below)."""
    x = logits.double().numpy()
    top, low = x.max(), max(x.min(), x.max() - 16)
    log_sum = np.log(np.exp(x - top).sum())
    scale = np.float32((top - low) / 65535)
    steps = np.where(x > low, np.rint((x - low) / scale), 0).astype(np.uint16)
    head = struct.pack("<ff", scale, np.float32(low - top - log_sum))
    return np.concatenate([np.frombuffer(head, np.uint16), steps])


def blank_row(vocab: int) -> np.ndarray:
    """A row whose top token is id 0 (all equal) and whose probabilities are e^-100."""
    return np.concatenate([np.frombuffer(struct.pack("<ff", 0.0, -100.0), np.uint16),
                           np.zeros(vocab, np.uint16)])


def write_base(path: Path, chunks: list[tuple[list[int], list[np.ndarray]]], n_ctx: int,
               vocab: int) -> None:
    """The base file: chunks of (n_ctx token ids, n_ctx - 1 - n_ctx // 2 rows)."""
    with open(path, "wb") as f:
        f.write(b"_logits_" + struct.pack("<Iii", n_ctx, vocab, len(chunks)))
        f.writelines(np.asarray(tokens, np.int32).tobytes() for tokens, _ in chunks)
        f.writelines(np.stack(rows).astype(np.uint16).tobytes() for _, rows in chunks)


def run_kld(a: argparse.Namespace, base: Path, n_ctx: int) -> str:
    cmd = [str(a.llama_bin / "llama-perplexity"), "-m", str(a.gguf), "--kl-divergence-base",
           str(base), "--kl-divergence", "-c", str(n_ctx), "-b", str(n_ctx), "-t",
           str(a.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"llama-perplexity failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def parse_summary(text: str) -> dict[str, float]:
    return {k: float(m.group(1)) for k, pat in SUMMARY.items() if (m := re.search(pat, text))}


def same_top_per_chunk(text: str, per_chunk: int) -> list[int]:
    """How many scored positions of each chunk had llama.cpp's top token equal ours, from the
    cumulative 'Same top p' percentage printed after each chunk."""
    cumulative = [float(m.group(1)) for ln in text.splitlines() if (m := CHUNK_LINE.match(ln))]
    counts = [round(p / 100 * per_chunk * (c + 1)) for c, p in enumerate(cumulative)]
    return [b - a for a, b in zip([0, *counts], counts, strict=False)]


def per_position(a: argparse.Namespace, seqs: list, scored: range, n_ctx: int, vocab: int
                 ) -> list[dict]:
    chunks = [(t, [logprob_row(lg[i]) if i == j else blank_row(vocab) for i in scored])
              for t, lg in seqs for j in scored]
    write_base(a.work / "per_position.kld", chunks, n_ctx, vocab)
    agree = same_top_per_chunk(run_kld(a, a.work / "per_position.kld", n_ctx), len(scored))
    out = []
    for k, (_, lg) in enumerate(seqs):
        flags = agree[k * len(scored):(k + 1) * len(scored)]
        top2 = lg[list(scored)].topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).tolist()
        out.append({"agree": sum(flags), "first_difference": next(
            (i for i, f in enumerate(flags) if f != 1), None),
            "our_top2_margin_where_different": [round(margin[i], 4)
                                                for i, f in enumerate(flags) if f != 1],
            "our_top2_margin_median": round(float(np.median(margin)), 4)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("gguf", type=Path)
    p.add_argument("--llama-bin", type=Path, required=True, help="holds llama-perplexity")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=33, help="ids after BOS (default 33)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-position", action="store_true")
    a = p.parse_args(argv)
    n_ctx = 2 * a.prompt_tokens  # BOS + P ids + P - 1 new tokens
    scored = range(n_ctx // 2, n_ctx - 1)
    with offload_rt.load(a.model_dir, offload=False, max_seq_len=n_ctx) as rt:
        vocab, gen = rt.config.vocab_size, torch.Generator().manual_seed(0)
        seqs = [greedy_with_logits(rt, [1] + torch.randint(3, vocab, (a.prompt_tokens,),
                                                           generator=gen).tolist(), n_ctx)
                for _ in range(a.prompts)]
    doc = {"model_dir": str(a.model_dir), "gguf": str(a.gguf), "prompts": a.prompts,
           "n_ctx": n_ctx, "scored_positions": len(scored) * a.prompts}
    with tempfile.TemporaryDirectory(prefix="llama_cpp_agreement_") as work:
        a.work = Path(work)
        write_base(a.work / "all.kld", [(t, [logprob_row(lg[i]) for i in scored])
                                        for t, lg in seqs], n_ctx, vocab)
        doc["llama_perplexity"] = parse_summary(run_kld(a, a.work / "all.kld", n_ctx))
        if a.per_position:
            doc["per_prompt"] = per_position(a, seqs, scored, n_ctx, vocab)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
