"""Train offload_rt's shipped demo model: a tiny Mixtral (8 experts, top-2) on free Debian text.

Steps, all seeded:
1. build the corpus (``prepare_corpus.py``: fortunes, the Jargon File, the Python 3.11 docs;
   2% of documents held out for validation);
2. train a SentencePiece BPE tokenizer on the training split (vocab 4000, byte fallback,
   unk=0 / bos=1 / eos=2, no pad - the Mixtral/Llama id layout);
3. train ``transformers.MixtralForCausalLM`` with a plain AdamW loop, router auxiliary loss on
   (``output_router_logits=True``) so the experts stay balanced;
4. evaluate validation perplexity and write the Hugging Face folder (``config.json``,
   ``model.safetensors`` in bfloat16, ``tokenizer.model``).

Training stops after ``--steps`` optimizer steps or when the ``--minutes`` wall-clock budget
(counted from the start of the script, so corpus and tokenizer time are included) is used up,
whichever comes first.  The learning-rate schedule (warmup, then cosine to 10%) follows the
larger of step progress and time progress, so a time-limited run always finishes its decay.
Every step's learning rate is recorded in ``<work>/train_info.json``; ``--replay
<that file>`` repeats the run step for step (same settings, same data order, same learning
rates, no clock involved) and gives bit-identical weights on the same torch build.

    python training/train_demo.py --minutes 45 --out offload_rt/demo_model

transformers is a training-time tool here; offload_rt itself does not need it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import prepare_corpus

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ---- tokenizer -----------------------------------------------------------------------------

def doc_strings(doc: dict) -> list[str]:
    """The strings a document is encoded as (chat: the [INST] turn and the answer)."""
    if doc["kind"] == "chat":
        return [f"[INST] {doc['question']} [/INST]", doc["answer"]]
    return [doc["text"]]


def train_tokenizer(train_docs: list[dict], out_prefix: Path, vocab_size: int, seed: int,
                    max_lines: int = 400_000) -> Path:
    import sentencepiece as spm
    lines = [line for d in train_docs for s in doc_strings(d) for line in s.split("\n")
             if line.strip()]
    rng = random.Random(seed)
    if len(lines) > max_lines:
        lines = rng.sample(lines, max_lines)
    log(f"tokenizer: training BPE vocab {vocab_size} on {len(lines)} lines")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=0.9995,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=16384,
        shuffle_input_sentence=False,
        num_threads=2,
        minloglevel=2,
    )
    return out_prefix.with_suffix(".model")


def encode_docs(sp, docs: list[dict]) -> list[int]:
    """One stream: <s> text</s> per plain doc, <s>[INST] q [/INST] a</s> per chat doc."""
    bos, eos = sp.bos_id(), sp.eos_id()
    ids: list[int] = []
    for d in docs:
        ids.append(bos)
        for s in doc_strings(d):
            ids.extend(sp.encode(s))
        ids.append(eos)
    return ids


def windows(ids: list[int], seq_len: int) -> torch.Tensor:
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ---- model ---------------------------------------------------------------------------------

def make_config(args, vocab_size: int):
    from transformers import MixtralConfig
    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=args.max_positions,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        router_jitter_noise=0.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
        initializer_range=0.02,
    )


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batch: int) -> float:
    """Mean next-token cross-entropy (nats) over all windows, without the aux loss."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, data.shape[0], batch):
        x = data[i:i + batch]
        out = model(input_ids=x, output_router_logits=False, use_cache=False)
        logits = out.logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def lr_at(progress: float, step: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(max(progress, 0.0), 1.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE.parent / "offload_rt" / "demo_model"))
    ap.add_argument("--work", default="/tmp/offload_rt_demo", help="corpus, logs, scratch")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--minutes", type=float, default=45.0,
                    help="wall-clock budget for the whole script (0: none)")
    ap.add_argument("--steps", type=int, default=100_000, help="max optimizer steps")
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-positions", type=int, default=512)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--aux-coef", type=float, default=0.02)
    ap.add_argument("--aux-per-layer", action="store_true",
                    help="balance experts within each layer (mean of per-layer aux losses) "
                         "instead of HF's pooled aux loss (the shipped run uses it)")
    ap.add_argument("--eval-reserve", type=float, default=2.0,
                    help="minutes of the budget kept for the final evaluation and saving")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; on a busy shared machine 1 is faster (OpenMP spin)")
    ap.add_argument("--replay", default=None,
                    help="train_info.json of an earlier run: repeat its settings, per-step "
                         "learning rates and step count (bit-identical weights on the same "
                         "torch build)")
    args = ap.parse_args(argv)

    replay = None
    if args.replay:  # the recorded run's settings (threads too: sums differ between 1 and 2)
        info = json.loads(Path(args.replay).read_text())
        for key, value in info["args"].items():
            if key not in ("out", "work", "replay"):
                setattr(args, key, value)
        replay = info["lr_trace"]
        args.steps, args.minutes = len(replay), 0.0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    # 1. corpus
    train_docs, val_docs, stats = prepare_corpus.build(args.seed)
    prepare_corpus.write_jsonl(work / "train.jsonl", train_docs)
    prepare_corpus.write_jsonl(work / "val.jsonl", val_docs)
    log(f"corpus: {stats['train']['docs']} train docs ({stats['train']['chars']} chars), "
        f"{stats['val']['docs']} validation docs")

    # 2. tokenizer
    tok_path = train_tokenizer(train_docs, work / "tokenizer", args.vocab, args.seed)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    train_ids = encode_docs(sp, train_docs)
    val_ids = encode_docs(sp, val_docs)
    train_data = windows(train_ids, args.seq_len)
    val_data = windows(val_ids, args.seq_len)
    log(f"tokens: train {len(train_ids)} ({train_data.shape[0]} windows of {args.seq_len}), "
        f"validation {len(val_ids)} ({val_data.shape[0]} windows)")

    # 3. model
    from transformers import MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    config = make_config(args, sp.vocab_size())
    torch.manual_seed(args.seed)
    model = MixtralForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params} parameters, experts implementation "
        f"{getattr(model.config, '_experts_implementation', None)}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    budget_s = args.minutes * 60 - args.eval_reserve * 60 if args.minutes > 0 else float("inf")
    order, pos, epoch = torch.randperm(train_data.shape[0], generator=gen), 0, 0
    step, seen, t_train, ema = 0, 0, time.time(), None
    lr_trace: list[float] = []
    while step < args.steps:
        elapsed = time.time() - T0
        if elapsed >= budget_s:
            break
        progress = max(step / args.steps,
                       (elapsed - (t_train - T0)) / max(budget_s - (t_train - T0), 1e-9))
        lr = replay[step] if replay is not None else lr_at(progress, step, args.lr, args.warmup)
        lr_trace.append(lr)
        for g in opt.param_groups:
            g["lr"] = lr
        if pos + args.batch > order.numel():
            order, pos, epoch = torch.randperm(train_data.shape[0], generator=gen), 0, epoch + 1
        x = train_data[order[pos:pos + args.batch]]
        pos += args.batch
        out = model(input_ids=x, labels=x, use_cache=False)
        loss, aux = out.loss, out.aux_loss
        if args.aux_per_layer:
            # HF's aux loss pools the router logits of all layers, so one layer's favourite
            # expert can offset another's: balanced overall, lopsided per layer. Balance each.
            aux = torch.stack([load_balancing_loss_func((rl,), config.num_local_experts,
                                                        config.num_experts_per_tok)
                               for rl in out.router_logits]).mean()
            loss = out.loss - args.aux_coef * out.aux_loss + args.aux_coef * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seen += x.numel()
        lm = loss.item() - args.aux_coef * aux.item()
        ema = lm if ema is None else 0.95 * ema + 0.05 * lm
        if step % 10 == 0 or step == 1:
            dt = time.time() - t_train
            log(f"step {step} epoch {epoch} lr {lr:.2e} loss {lm:.3f} (ema {ema:.3f}, "
                f"ppl {math.exp(ema):.1f}) aux {aux.item():.3f} "
                f"tokens {seen} ({seen / dt:.0f} tok/s)")
    train_s = time.time() - t_train
    log(f"training done: {step} steps, {seen} tokens, {train_s / 60:.1f} min")

    # 4. evaluate and save
    val_nll = evaluate(model, val_data, 16)
    log(f"validation: loss {val_nll:.4f} perplexity {math.exp(val_nll):.2f} "
        f"({val_data.numel()} tokens)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "generation_config.json").unlink(missing_ok=True)
    shutil.copyfile(tok_path, out_dir / "tokenizer.model")
    for p in out_dir.iterdir():
        p.chmod(0o644)
    info = {"steps": step, "tokens_seen": seen, "train_minutes": round(train_s / 60, 2),
            "total_minutes": round((time.time() - T0) / 60, 2),
            "val_loss": round(val_nll, 4), "val_perplexity": round(math.exp(val_nll), 3),
            "val_tokens": int(val_data.numel()), "train_tokens": len(train_ids),
            "parameters": n_params, "args": vars(args), "torch": torch.__version__,
            "lr_trace": lr_trace}
    (work / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    log(f"wrote {out_dir} ({size / 1e6:.2f} MB); run info in {work / 'train_info.json'}")
    print(json.dumps({k: v for k, v in info.items() if k != "lr_trace"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
