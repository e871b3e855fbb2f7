"""How much quantized experts change a model: perplexity, agreement with bf16, logit error.

    python benchmarks/quant_quality.py [--val /tmp/offload_rt_demo/val.jsonl]
        [--small /tmp/bench/small] [--out result.json]
    python benchmarks/quant_quality.py --table result.json        # the README's tables

Everything runs in offload_rt itself (``Transformer.forward`` over whole windows, float32
logits at every position), every expert resident, in the model's compute dtype (bfloat16):

* **demo** (the shipped model, trained): perplexity on its held-out validation text, windowed
  as its model card (``training/model_card.py``: documents encoded as in training, cut into
  256-token windows, every next token scored), so the float row at float32 compute reproduces
  the card's figure; per format against the bf16 model on the same windows: mean KL(bf16 ||
  format) per token, top-1 agreement, max and mean |logit difference|; greedy agreement over
  64 new tokens from ``PROMPTS``.
* **small** (``make_checkpoint.py small``: random weights, so the perplexity of any text is
  meaningless): text the bf16 model generates itself (sampled, seeded) scored under every
  format (KL, top-1 agreement, logit error, and the perplexity of that text relative to bf16's),
  and greedy agreement over 64 tokens from seeded random prompts.

Formats (``FORMATS``): the float file (bf16), int8, int4 with groups of 32 / 64 / 128, each
quantized as it is read (``experts=``), and fp8: a folder written by ``offload-rt quantize
--experts fp8`` into ``--scratch`` (fp8 is not quantized at load), run as its own format.
``--trunk-int8 bf16,int4 g128`` adds a row "<format> + int8 trunk" for each format named:
the same experts with the attention projections and LM head in int8 (``trunk="int8"``). ``--check-
folders`` also writes each quantized format with ``offload-rt quantize`` and checks that the
folder gives the same logits and tokens as quantizing at load (not the int8-trunk rows: a
folder's trunk is float). ``--int8-dot "int4 g64 + int8 trunk"`` adds a row "<row> + int8-dot"
for each row named: the same weights multiplied by the int8-dot kernels (``quant_kernel=
"int8-dot"``: activations quantized to int8 per group, ``offload_rt.quant.int_dot``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_quality_metrics as metrics

FORMATS = {"bf16": {}, "int8": {"experts": "int8"},
           "int4 g32": {"experts": "int4", "group_size": 32},
           "int4 g64": {"experts": "int4", "group_size": 64},
           "int4 g128": {"experts": "int4", "group_size": 128},
           "fp8": {"written": "fp8"}}  # offload-rt quantize --experts fp8, then its folder
TRUNK_INT8 = " + int8 trunk"  # the suffix of a --trunk-int8 row
INT8_DOT = " + int8-dot"  # the suffix of an --int8-dot row
NOT_MEASURED: dict[str, str] = {}
PROMPTS: list[metrics.Prompt] = [
    "Once upon a time", "The Python interpreter", "A hacker is", "Computers are",
    "The best way to", "In the beginning", ("chat", "Tell me a joke."),
    ("chat", "What does 'hacker' mean?")]
NEW_TOKENS = 64
SEQ_LEN = 256  # the demo's training and model-card window


def demo_windows(val: Path, tokenizer: Path) -> torch.Tensor:
    """The model card's validation windows: int64 [n, SEQ_LEN]."""
    import sentencepiece as spm

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "training"))
    from train_demo import encode_docs, windows

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    docs = [json.loads(line) for line in val.read_text(encoding="utf-8").splitlines() if line]
    return windows(encode_docs(sp, docs), SEQ_LEN)


def fitting(model_dir: Path, formats: dict[str, dict]) -> tuple[dict[str, dict], dict[str, str]]:
    """The formats whose int4 group size divides the model's sizes, and why the others not."""
    cfg = json.loads((model_dir / "config.json").read_text())
    sizes = (cfg["hidden_size"], cfg["intermediate_size"])
    keep, skipped = {}, {}
    for name, opts in formats.items():
        group = opts.get("group_size")
        if group and any(n % group for n in sizes):
            skipped[name] = f"group size {group} does not divide hidden/intermediate {sizes}"
        else:
            keep[name] = opts
    return keep, skipped


def run_demo(val: Path, formats: dict[str, dict], check_folders: bool, scratch: Path,
             new_tokens: int = NEW_TOKENS) -> dict:
    from offload_rt.demo import demo_model_dir

    model_dir = demo_model_dir()
    formats, skipped = fitting(model_dir, formats)
    formats = written_folders(model_dir, formats, scratch)
    wins = demo_windows(val, model_dir / "tokenizer.model")
    f32 = metrics.windows_perplexity(model_dir, {"dtype": "float32"}, wins)
    rows = metrics.compare_on_windows(model_dir, formats, wins)
    greedy = metrics.greedy_agreement(model_dir, formats, PROMPTS, new_tokens)
    for name, row in rows.items():
        row["greedy"] = greedy[name]
    out = {"model_dir": str(model_dir), "windows": int(wins.shape[0]), "seq_len": SEQ_LEN,
           "predicted_tokens": int(wins.shape[0] * (SEQ_LEN - 1)),
           "float32_compute_perplexity": f32, "formats": rows, "skipped": skipped}
    if check_folders:
        out["folders"] = metrics.check_folders(model_dir, float_trunk(formats), scratch,
                                               wins[:8], PROMPTS)
    return out


def run_small(model_dir: Path, formats: dict[str, dict], prompts: int, check_folders: bool,
              scratch: Path, new_tokens: int = NEW_TOKENS) -> dict:
    formats, skipped = fitting(model_dir, formats)
    formats = written_folders(model_dir, formats, scratch)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    starts = [torch.randint(3, vocab, (16,), generator=gen).tolist() for _ in range(prompts)]
    texts = metrics.sampled_texts(model_dir, starts, new_tokens)
    rows = metrics.compare_on_windows(model_dir, formats, texts)
    greedy = metrics.greedy_agreement(model_dir, formats, starts, new_tokens)
    for name, row in rows.items():
        row["greedy"] = greedy[name]
    out = {"model_dir": str(model_dir), "texts": len(starts),
           "text_tokens": int(texts.shape[1]), "formats": rows, "skipped": skipped}
    if check_folders:
        picked = {k: v for k, v in float_trunk(formats).items() if k in ("int8", "int4 g64")}
        out["folders"] = metrics.check_folders(model_dir, picked, scratch, texts[:2], starts[:2])
    return out


def written_folders(model_dir: Path, formats: dict[str, dict], scratch: Path
                    ) -> dict[str, dict]:
    """``formats`` with each ``{"written": F}`` row replaced by the folder ``offload-rt
    quantize --experts F`` writes into ``scratch`` (``{"model_dir": ...}``: run as it is)."""
    out = {}
    for name, opts in formats.items():
        if "written" in opts:
            folder = scratch / f"{model_dir.name}-{opts['written']}"
            seconds = metrics.quantize_folder(model_dir, {"experts": opts["written"]}, folder)
            opts = {"model_dir": str(folder), "quantize_s": seconds}
        out[name] = opts
    return out


def with_int8_trunk(formats: dict[str, dict], names: list[str]) -> dict[str, dict]:
    """``formats`` plus, for each of ``names``, its row with the trunk in int8."""
    unknown = sorted(set(names) - set(FORMATS))
    if unknown:
        raise SystemExit(f"--trunk-int8: unknown format(s) {unknown}; choose of "
                         f"{', '.join(FORMATS)}")
    return {**formats, **{name + TRUNK_INT8: {**FORMATS[name], "trunk": "int8"}
                          for name in names}}


def with_int8_dot(formats: dict[str, dict], names: list[str]) -> dict[str, dict]:
    """``formats`` plus, for each row of ``names``, its row computed by the int8-dot kernels."""
    unknown = [n for n in names if n not in formats]
    if unknown:
        raise SystemExit(f"--int8-dot: unknown row(s) {unknown}; choose of {list(formats)}")
    return {**formats, **{name + INT8_DOT: {**formats[name], "quant_kernel": "int8-dot"}
                          for name in names}}


def float_trunk(formats: dict[str, dict]) -> dict[str, dict]:
    """The rows whose trunk is float (what ``--check-folders`` compares with a folder; a row
    that is a folder already, fp8, has nothing to compare with)."""
    return {k: v for k, v in formats.items() if "trunk" not in v and "quant_kernel" not in v}


def markdown(doc: dict) -> str:
    """The README's quality tables from a result document."""
    out = []
    for part in ("demo", "small"):
        if part not in doc:
            continue
        d = doc[part]
        ppl = "perplexity" if part == "demo" else "ppl of bf16's text"
        header = (f"| format | expert bytes | {ppl} | vs bf16 | KL (nats/token) | top-1 "
                  "agreement | max / mean abs logit error | greedy: same tokens, first "
                  "difference (median) |")
        out += [f"**{part}**", "", header, "| --- " * 8 + "|"]
        ref = d["formats"]["bf16"]["perplexity"]
        for name, r in d["formats"].items():
            g = r["greedy"]
            out.append(f"| {name} | {r['expert_bytes']:,} | {r['perplexity']:.2f} | "
                       f"{(r['perplexity'] / ref - 1) * 100:+.2f}% | {r['kl']:.4f} | "
                       f"{r['top1_agreement']:.4f} | {r['max_abs_logit_error']:.3f} / "
                       f"{r['mean_abs_logit_error']:.4f} | {g['same_tokens']:.3f}, "
                       f"{g['first_difference_median']} |")
        for name, why in doc.get("not_measured", {}).items():
            out.append(f"| {name} | - | {why} | | | | | |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--val", type=Path, default=Path("/tmp/offload_rt_demo/val.jsonl"),
                   help="the demo's validation split (training/prepare_corpus.py)")
    p.add_argument("--small", type=Path, help="a make_checkpoint.py folder (random weights)")
    p.add_argument("--prompts", type=int, default=8, help="small: prompts / texts")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                   help="greedy (and small's sampled) tokens per prompt")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help=f"comma-separated, of {', '.join(FORMATS)} (bf16 is always run: the "
                        "reference)")
    p.add_argument("--trunk-int8", default="", metavar="NAMES",
                   help="comma-separated formats to run again with an int8 trunk (attention "
                        "projections and LM head: --trunk int8), as '<format> + int8 trunk'")
    p.add_argument("--int8-dot", default="", metavar="ROWS",
                   help="comma-separated rows (formats, or '<format> + int8 trunk') to run "
                        "again with --quant-kernel int8-dot, as '<row> + int8-dot'")
    p.add_argument("--check-folders", action="store_true",
                   help="also run folders written by offload-rt quantize")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/quant_quality"),
                   help="where --check-folders writes the quantized folders")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-demo", action="store_true")
    p.add_argument("--out", type=Path)
    p.add_argument("--table", type=Path, metavar="RESULT_JSON",
                   help="print the markdown tables of a saved result and exit")
    a = p.parse_args(argv)
    if a.table:
        print(markdown(json.loads(a.table.read_text())))
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    formats = {k: FORMATS[k] for k in ["bf16", *a.formats.split(",")]}
    formats = with_int8_trunk(formats, [n for n in a.trunk_int8.split(",") if n])
    formats = with_int8_dot(formats, [n for n in a.int8_dot.split(",") if n])
    start = time.perf_counter()
    doc: dict = {"benchmark": "quant_quality", "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "compute_dtype": "bfloat16",
                 "new_tokens": a.new_tokens, "not_measured": NOT_MEASURED}
    if not a.no_demo:
        doc["demo"] = run_demo(a.val, formats, a.check_folders, a.scratch, a.new_tokens)
    if a.small:
        doc["small"] = run_small(a.small, formats, a.prompts, a.check_folders, a.scratch,
                                 a.new_tokens)
    doc["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(doc)
    if a.out:
        a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
