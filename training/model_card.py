"""Model card figures of the demo model, on the held-out validation split. Prints JSON.

- validation perplexity (next-token, 256-token windows, as in training) vs a unigram baseline:
  token frequencies of the training split with add-one smoothing over the vocabulary,
  ``p(t) = (count(t) + 1) / (N + V)``, scored on the same predicted validation tokens;
- expert load per layer: the fraction of all top-k picks that each expert gets (uniform = 1/E);
- consecutive-token expert sharing per layer: how often tokens t and t+1 (same window) have
  at least one expert in common among their top-k, against the expectation for independent
  uniform picks, ``1 - C(E-k, k) / C(E, k)`` (0.464 for 8 experts, top-2); and the mean
  fraction of token t+1's experts already used by token t (what an LRU cache of the previous
  token's experts would hit);
- text samples from offload_rt itself (greedy and temperature 0.8), unless ``--no-samples``.

The validation split is rebuilt with ``prepare_corpus.build(seed)`` (deterministic), so only
the Debian packages and the model folder are needed.  transformers is used as a dev tool.

    python training/model_card.py offload_rt/demo_model
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from math import comb
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import prepare_corpus
from train_demo import encode_docs, windows

SAMPLE_PROMPTS = ["Once upon a time", "The Python interpreter"]
SAMPLE_CHATS = ["What does 'hacker' mean?", "Tell me a joke."]


@torch.no_grad()
def figures(model_dir: Path, seed: int, seq_len: int, batch: int) -> dict:
    import sentencepiece as spm
    from transformers import MixtralForCausalLM

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    train_docs, val_docs, _ = prepare_corpus.build(seed)
    train_ids = encode_docs(sp, train_docs)
    val = windows(encode_docs(sp, val_docs), seq_len)
    targets = val[:, 1:].reshape(-1)

    vocab = sp.vocab_size()
    counts = Counter(train_ids)
    n = len(train_ids)
    logp = torch.tensor([math.log((counts.get(t, 0) + 1) / (n + vocab)) for t in range(vocab)])
    unigram_nll = -logp[targets].mean().item()

    model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    cfg = model.config
    E, k, L = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    load = torch.zeros(L, E)
    shared = torch.zeros(L)
    reuse = torch.zeros(L)
    pairs = 0
    nll_sum = 0.0
    for i in range(0, val.shape[0], batch):
        x = val[i:i + batch]
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        logits = out.logits[:, :-1].float()
        nll_sum += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        B, S = x.shape
        for layer, rl in enumerate(out.router_logits):
            top = rl.reshape(B, S, E).topk(k, dim=-1).indices          # [B, S, k]
            onehot = torch.zeros(B, S, E).scatter_(-1, top, 1.0)       # [B, S, E]
            load[layer] += onehot.sum(dim=(0, 1))
            common = (onehot[:, 1:] * onehot[:, :-1]).sum(-1)          # [B, S-1]
            shared[layer] += (common > 0).float().sum()
            reuse[layer] += (common / k).sum()
        pairs += B * (S - 1)
    val_nll = nll_sum / targets.numel()
    load_frac = load / load.sum(dim=1, keepdim=True)
    random_share = 1 - comb(E - k, k) / comb(E, k)
    return {
        "model_dir": str(model_dir),
        "config": {"layers": L, "experts": E, "top_k": k, "hidden": cfg.hidden_size,
                   "intermediate": cfg.intermediate_size, "heads": cfg.num_attention_heads,
                   "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size,
                   "max_position_embeddings": cfg.max_position_embeddings,
                   "parameters": sum(p.numel() for p in model.parameters())},
        "size_bytes": sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file()),
        "validation": {"docs": len(val_docs), "windows": int(val.shape[0]), "seq_len": seq_len,
                       "predicted_tokens": int(targets.numel())},
        "val_perplexity": round(math.exp(val_nll), 3),
        "unigram_perplexity": round(math.exp(unigram_nll), 3),
        "val_loss_nats": round(val_nll, 4),
        "unigram_loss_nats": round(unigram_nll, 4),
        "expert_load": {
            "per_layer": [[round(v, 4) for v in row.tolist()] for row in load_frac],
            "uniform": round(1 / E, 4),
            "min": round(load_frac.min().item(), 4),
            "max": round(load_frac.max().item(), 4),
        },
        "consecutive_share_any": {
            "per_layer": [round(v, 4) for v in (shared / pairs).tolist()],
            "random_expectation": round(random_share, 4),
        },
        "consecutive_reuse_fraction": {
            "per_layer": [round(v, 4) for v in (reuse / pairs).tolist()],
            "random_expectation": round(k / E, 4),
        },
    }


def samples(model_dir: Path, max_new_tokens: int) -> dict:
    import offload_rt
    rt = offload_rt.load(str(model_dir), dtype="float32")
    out: dict = {}
    for p in SAMPLE_PROMPTS:
        out[p] = {
            "greedy": rt.generate(p, max_new_tokens=max_new_tokens).text,
            "t0.8_seed0": rt.generate(p, max_new_tokens=max_new_tokens, temperature=0.8,
                                      seed=0).text,
        }
    for q in SAMPLE_CHATS:
        msgs = [{"role": "user", "content": q}]
        out[f"[chat] {q}"] = {
            "greedy": rt.generate(messages=msgs, max_new_tokens=max_new_tokens).text,
            "t0.8_seed0": rt.generate(messages=msgs, max_new_tokens=max_new_tokens,
                                      temperature=0.8, seed=0).text,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", nargs="?", default=str(HERE.parent / "offload_rt" / "demo_model"))
    ap.add_argument("--seed", type=int, default=1234, help="corpus seed used for training")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-samples", action="store_true")
    ap.add_argument("--sample-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    result = figures(model_dir, args.seed, args.seq_len, args.batch)
    if not args.no_samples:
        result["samples"] = samples(model_dir, args.sample_tokens)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
