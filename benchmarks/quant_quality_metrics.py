"""The measurements of ``quant_quality.py``: scored windows, format against bf16, greedy runs.

Every run loads the model resident (``offload=False``) in bfloat16 unless told otherwise;
``opts`` are ``offload_rt.load`` options (``experts``, ``group_size``, ``dtype``), or
``model_dir``: another folder to load instead (one ``offload-rt quantize`` wrote: fp8).
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import offload_rt

Prompt = str | Sequence[int] | tuple[str, str]  # raw text, token ids, or ("chat", question)
CLI = "import sys; from offload_rt.cli import main; sys.exit(main(sys.argv[1:]))"
GREEDY_CONTEXT = 512  # max_seq_len of greedy runs: any prompt here + its new tokens fit


def load(model_dir: Path, opts: dict, max_seq_len: int) -> offload_rt.Runtime:
    options = {k: v for k, v in opts.items() if k not in ("model_dir", "quantize_s")}
    return offload_rt.load(opts.get("model_dir", model_dir), offload=False,
                           max_seq_len=max_seq_len, **{"dtype": "bfloat16", **options})


def window_logits(rt: offload_rt.Runtime, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits [T, V] at every position of ``ids`` [T] (a fresh context)."""
    return rt.model(ids, 0)


def windows_perplexity(model_dir: Path, opts: dict, wins: torch.Tensor) -> float:
    """exp(mean next-token NLL) over the windows [n, T], each scored from position 0."""
    nll, count = 0.0, 0
    with load(model_dir, opts, wins.shape[1]) as rt:
        for ids in wins:
            logits = window_logits(rt, ids)
            nll += F.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum").item()
            count += ids.numel() - 1
    return round(math.exp(nll / count), 4)


def _compare(ref: torch.Tensor, got: torch.Tensor, ids: torch.Tensor, acc: dict) -> None:
    """Add one window's figures: next-token NLL under ``got``; KL(ref || got), top-1 agreement
    and |logit difference| at every position."""
    ref, got = ref.double(), got.double()
    acc["nll"] += F.cross_entropy(got[:-1], ids[1:], reduction="sum").item()
    acc["scored"] += ids.numel() - 1
    lp_ref, lp_got = F.log_softmax(ref, -1), F.log_softmax(got, -1)
    acc["kl"] += (lp_ref.exp() * (lp_ref - lp_got)).sum().item()
    acc["top1"] += (ref.argmax(-1) == got.argmax(-1)).sum().item()
    diff = (ref - got).abs()
    acc["max_err"] = max(acc["max_err"], diff.max().item())
    acc["sum_err"] += diff.mean(-1).sum().item()
    acc["positions"] += ids.numel()


def compare_on_windows(model_dir: Path, formats: dict[str, dict],
                       wins: torch.Tensor) -> dict[str, dict]:
    """Per format: perplexity of the windows [n, T] and its distance from ``formats['bf16']``
    (the reference runtime stays loaded; one other at a time)."""
    rows = {}
    with load(model_dir, formats["bf16"], wins.shape[1]) as ref_rt:
        for name, opts in formats.items():
            start = time.perf_counter()
            acc = dict.fromkeys(("nll", "kl", "top1", "max_err", "sum_err"), 0.0)
            acc.update(scored=0, positions=0)
            with load(model_dir, opts, wins.shape[1]) as rt:
                for ids in wins:
                    _compare(window_logits(ref_rt, ids), window_logits(rt, ids), ids, acc)
                expert_bytes = rt.expert_format.nbytes
            n = acc["positions"]
            rows[name] = {"options": opts, "expert_bytes": expert_bytes,
                          "perplexity": round(math.exp(acc["nll"] / acc["scored"]), 4),
                          "kl": round(acc["kl"] / n, 6),
                          "top1_agreement": round(acc["top1"] / n, 5),
                          "max_abs_logit_error": round(acc["max_err"], 4),
                          "mean_abs_logit_error": round(acc["sum_err"] / n, 5),
                          "seconds": round(time.perf_counter() - start, 1)}
    return rows


def _generate(rt: offload_rt.Runtime, prompt: Prompt, new_tokens: int) -> list[int]:
    kwargs = {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
    if isinstance(prompt, tuple):
        return rt.generate(messages=[{"role": "user", "content": prompt[1]}], **kwargs).token_ids
    return rt.generate(prompt, **kwargs).token_ids


def greedy_tokens(model_dir: Path, opts: dict, prompts: Sequence[Prompt],
                  new_tokens: int) -> list[list[int]]:
    with load(model_dir, opts, GREEDY_CONTEXT) as rt:
        return [_generate(rt, p, new_tokens) for p in prompts]


def greedy_agreement(model_dir: Path, formats: dict[str, dict], prompts: Sequence[Prompt],
                     new_tokens: int) -> dict[str, dict]:
    """Per format: greedy tokens from every prompt against bf16's: the share of positions
    with the same token, where each run first differs (``new_tokens``: never), how many
    runs are identical."""
    ref = greedy_tokens(model_dir, formats["bf16"], prompts, new_tokens)
    out = {}
    for name, opts in formats.items():
        got = ref if name == "bf16" else greedy_tokens(model_dir, opts, prompts, new_tokens)
        same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
        first = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), new_tokens)
                 for r, g in zip(ref, got)]
        out[name] = {"same_tokens": round(same / (len(prompts) * new_tokens), 4),
                     "first_difference": first,
                     "first_difference_median": statistics.median(first),
                     "identical_runs": sum(f == new_tokens for f in first),
                     "runs": len(prompts)}
    return out


def sampled_texts(model_dir: Path, starts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """The bf16 model's own text: each start continued by ``new_tokens`` sampled tokens
    (temperature 1, seed = its index): int64 [n, len(start) + new_tokens]."""
    with load(model_dir, {}, GREEDY_CONTEXT) as rt:
        texts = [s + rt.generate(s, max_new_tokens=new_tokens, temperature=1.0, seed=i,
                                 ignore_eos=True).token_ids for i, s in enumerate(starts)]
    return torch.tensor(texts)


def quantize_folder(model_dir: Path, opts: dict, out: Path) -> float:
    """``offload-rt quantize`` ``model_dir`` into ``out`` as ``opts`` says; returns seconds."""
    args = ["quantize", str(model_dir), str(out), "--experts", opts["experts"], "--force"]
    if "group_size" in opts:
        args += ["--group-size", str(opts["group_size"])]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", CLI, *args], check=True, capture_output=True)
    return round(time.perf_counter() - start, 1)


def check_folders(model_dir: Path, formats: dict[str, dict], scratch: Path,
                  wins: torch.Tensor, prompts: Sequence[Prompt]) -> dict[str, dict]:
    """Per quantized format: a folder written by ``offload-rt quantize`` gives the same logits
    on ``wins`` and the same greedy tokens as quantizing at load."""
    out = {}
    for name, opts in formats.items():
        if "experts" not in opts:
            continue
        folder = scratch / f"{model_dir.name}-{name.replace(' ', '-')}"
        seconds = quantize_folder(model_dir, opts, folder)
        seq = max(wins.shape[1], GREEDY_CONTEXT)  # the windows, and a prompt + 16 tokens
        with load(model_dir, opts, seq) as a, load(folder, {}, seq) as b:
            same = all(torch.equal(window_logits(a, ids), window_logits(b, ids)) for ids in wins)
            tokens = [_generate(a, p, 16) == _generate(b, p, 16) for p in prompts]
        out[name] = {"folder": str(folder), "quantize_s": seconds, "identical_logits": same,
                     "identical_tokens": all(tokens), "windows": int(wins.shape[0]),
                     "prompts": len(prompts)}
    return out
