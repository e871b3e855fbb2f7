"""``offload-rt quantize``: write a copy of a model folder with quantized experts.

    offload-rt quantize models/mixtral models/mixtral-int4 --experts int4 --group-size 64
    offload-rt quantize models/mixtral models/mixtral-int4t --experts int4 --trunk int8
    offload-rt quantize models/mixtral models/mixtral-fp8 --experts fp8

Parses and calls ``offload_rt.quant.quantize.quantize`` (imported when the command runs: it
needs torch); the summary line goes to stdout, the progress bar to a terminal's stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from offload_rt.cli_options import int_at_least
from offload_rt.errors import OptionError

FORMATS = ("int8", "int4", "fp8")  # quant.quantize.FORMATS, not imported: it imports torch
TRUNK_FORMATS = ("float", "int8")  # quant.quantize.TRUNK_FORMATS
SCALE_DTYPES = ("bfloat16", "float16")


def add_quantize_parser(subparsers: Any,
                        parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register ``quantize`` on the top-level parser's subparsers."""
    parser = subparsers.add_parser(
        "quantize", parents=parents, help="write a copy of a model with quantized experts",
        description="Read a float32/bfloat16/float16 model folder (Hugging Face or "
                    "Mistral-native) one expert at a time and write OUT_DIR: a Hugging Face "
                    "folder whose experts are int8 or int4 records (docs/quantized_format.md) "
                    "or fp8 weights (a compressed-tensors checkpoint), and whose other tensors "
                    "are copied unchanged (with --trunk int8: attention projections and LM "
                    "head in int8), with the tokenizer and generation config. OUT_DIR appears "
                    "only when complete.")
    parser.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="source model folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path,
                        help="folder to write (must not exist or be empty, unless --force)")
    parser.add_argument("--experts", choices=FORMATS, required=True,
                        help="int8: one scale per output channel; int4: a scale and zero "
                             "point per group of input channels (CPU only); fp8: F8_E4M3 "
                             "with a float32 scale per output channel (compressed-tensors)")
    parser.add_argument("--group-size", metavar="N", type=int_at_least(1), default=None,
                        help="int4 only: input channels per scale, 32, 64, 128 or 256 "
                             "(default: 64)")
    parser.add_argument("--scale-dtype", choices=SCALE_DTYPES, default=None,
                        help="int8/int4 and an int8 trunk: dtype of the scales, and of their "
                             "compute (default: bfloat16)")
    parser.add_argument("--trunk", choices=TRUNK_FORMATS, default="float",
                        help="int8: store the attention projections and the LM head as int8 "
                             "with a scale per output channel, as run-time --trunk int8 "
                             "quantizes them (not with --experts fp8; a tied LM head stays "
                             "float) (default: %(default)s, copied as stored)")
    parser.add_argument("--shard-size", metavar="SIZE", default="2GiB",
                        help="bytes per output file, about; whole layers per file "
                             "(default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT_DIR if it exists and is not empty")
    parser.set_defaults(run=run_quantize)
    return parser


def expert_progress() -> Any:
    """A tqdm bar over experts on stderr, only when stderr is a terminal (else None)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc="quantizing", unit="expert", leave=False)
        bar["bar"].update(done - bar["bar"].n)
        if done == total:
            bar["bar"].close()

    return update


def run_quantize(args: argparse.Namespace) -> int:
    """Quantize; errors propagate to ``cli.main`` (exit 2; Ctrl-C 130)."""
    from offload_rt.engine.sizes import parse_size
    from offload_rt.quant.quantize import QuantizeSettings, quantize

    shard_size = parse_size(args.shard_size, "--shard-size")
    if shard_size is None:
        raise OptionError(f"--shard-size {args.shard_size}: give a size, e.g. 2GiB")
    settings = QuantizeSettings(experts=args.experts, group_size=args.group_size,
                                scale_dtype=args.scale_dtype, shard_size=shard_size,
                                force=args.force, trunk=args.trunk)
    summary = quantize(args.model_dir, args.out_dir, settings, progress=expert_progress())
    print(summary.line())
    return 0
