"""Flags shared by the subcommands that run a model (generate, chat, bench): the model folder
(optional: the shipped demo model), sampling, and ``RuntimeOptions``. One place, so every
subcommand offers the same flags with the same meaning."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cache_policies.registry import available_policies, policy_class
from offload_rt.demo import DEMO_CACHE_EXPERTS, demo_model_dir, demo_options
from offload_rt.generation_config import DEFAULT_MAX_NEW_TOKENS, read_generation_config
from offload_rt.options import (
    DEFAULT_HYBRID,
    DEFAULT_POLICY,
    DEFAULT_POOL,
    DEFAULT_PREFETCH,
    EXPERT_FORMATS,
    HYBRID_MODES,
    POOLS,
    PREFETCH_FLOOR,
    QUANT_KERNELS,
    SCAN_POLICY,
    SCAN_POLICY_NO_PREDICTIONS,
    SCAN_PREFETCH,
    TRUNK_FORMATS,
    RuntimeOptions,
)

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
GREEDY = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "temperature": 0, "top_k": 0, "top_p": 1}


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", type=Path, nargs="?", default=None,
                        help="model folder (Hugging Face or Mistral-native layout); omitted: "
                             "the shipped demo model, with part of its experts cached")


def add_sampling_arguments(parser: argparse.ArgumentParser,
                           fallbacks: Mapping[str, Any] | None = None) -> None:
    """Flags for how many tokens, how to pick them and when to stop.

    A flag left out takes the model's default (its generation_config.json), else the
    subcommand's ``fallbacks`` (chat: temperature 0.7...), else greedy and
    DEFAULT_MAX_NEW_TOKENS: ``sampling_kwargs`` applies the fallbacks, the runtime the rest.
    """
    own = {**GREEDY, **(fallbacks or {})}

    def default(name: str) -> str:
        return f"(default: the model's generation_config.json, else {own[name]})"

    parser.set_defaults(sampling_fallbacks=dict(fallbacks or {}))
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", metavar="N", type=int_at_least(1), default=None,
                       help=f"tokens to generate at most, >= 1 {default('max_new_tokens')}")
    group.add_argument("--temperature", metavar="T", type=float, default=None,
                       help=f"0 = greedy {default('temperature')}")
    group.add_argument("--top-k", metavar="K", type=int, default=None,
                       help=f"sample from the K most likely tokens; 0 = off {default('top_k')}")
    group.add_argument("--top-p", metavar="P", type=float, default=None,
                       help=f"nucleus sampling mass; 1 = off {default('top_p')}")
    group.add_argument("--seed", metavar="S", type=int, default=None,
                       help="random seed for sampling (default: nondeterministic)")
    group.add_argument("--stop", metavar="STR", action="append", default=None,
                       help="stop when this text appears (not printed); repeatable (default: "
                            "the model's stop_strings, else none)")
    group.add_argument("--ignore-eos", action="store_true",
                       help="keep generating past the end-of-sequence token")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``Runtime.stream``/``generate`` keyword arguments from ``add_sampling_arguments`` flags.

    None means "the model's default" to the runtime. A flag with a subcommand fallback gets
    it here unless the model's generation_config.json sets that parameter (read from
    MODEL_DIR; a malformed file raises CheckpointError naming it).
    """
    out = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
           "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
           "stop": None if args.stop is None else tuple(args.stop),
           "ignore_eos": args.ignore_eos}
    fallbacks = {k: v for k, v in getattr(args, "sampling_fallbacks", {}).items()
                 if out[k] is None}
    if fallbacks:
        model = read_generation_config(model_dir(args))
        for name, value in fallbacks.items():
            shipped = model.default(name)
            out[name] = value if shipped is None else shipped
    return out


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for ``RuntimeOptions``: device, dtype, memory budgets and the expert cache."""
    d = RuntimeOptions()
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N "
                       "(default: %(default)s)")
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default=d.dtype,
                       help="compute dtype (default: the checkpoint's)")
    group.add_argument("--gpu-memory", metavar="SIZE", default=d.gpu_memory,
                       help="GPU budget with --device cuda, e.g. 6GiB, or auto: free GPU memory "
                            "less 512 MiB (default: auto); refused with --device cpu")
    group.add_argument("--cpu-memory", metavar="SIZE", default=d.cpu_memory,
                       help="RAM budget, e.g. 16GiB, or auto: 85%% of available RAM (default: "
                            "auto). auto is the same as leaving the flag out: the demo model "
                            f"then caches {DEMO_CACHE_EXPERTS} of its 8 experts per layer; a "
                            "size lets the budget decide")
    group.add_argument("--cache-experts", metavar="K", type=int, default=d.cache_experts,
                       help="device expert slots per layer, top_k..experts (forces "
                            "offloading; refused with --no-offload)")
    group.add_argument("--policy", metavar="NAME", type=policy_spec, default=None,
                       help=f"expert eviction policy: {', '.join(available_policies())}, or a "
                            f"class as pkg.module:Class (default: {DEFAULT_POLICY}; "
                            f"{SCAN_POLICY}, or {SCAN_POLICY_NO_PREDICTIONS} with --prefetch 0, "
                            "when the device holds fewer experts than one token routes to; "
                            "refused with --no-offload)")
    group.add_argument("--prefetch", metavar="D", type=int, default=None,
                       help=f"prefetch experts D layers ahead; 0 = off (default: adaptive, "
                            f"{PREFETCH_FLOOR} to {DEFAULT_PREFETCH}: deeper while the experts "
                            "predicted that far ahead are used; "
                            f"{SCAN_PREFETCH} when the device holds fewer experts than one "
                            "token routes to; refused with --no-offload)")
    group.add_argument("--pool", choices=POOLS, default=None,
                       help="expert cache pools: one per layer, one shared (global), or auto = "
                            f"per layer when that fits (default: {DEFAULT_POOL}; refused with "
                            "--no-offload)")
    group.add_argument("--hybrid", choices=HYBRID_MODES, default=None,
                       help="GPU runs: compute an expert that misses the GPU's cache on the CPU "
                            "instead of copying it: auto = when the start-up measurement says "
                            "the CPU is faster for its token count, off = always copy (bit-"
                            "identical to resident), always = every miss of few tokens "
                            f"(default: {DEFAULT_HYBRID}; refused with --no-offload, and "
                            "always on a CPU run)")
    group.add_argument("--max-seq-len", metavar="N", type=int, default=d.max_seq_len,
                       help="context length to allocate (default: min(model's, 4096))")
    offload = group.add_mutually_exclusive_group()
    offload.add_argument("--offload", dest="offload", action="store_const", const=True,
                         default=d.offload,
                         help="always stream experts through the cache (default: only when "
                              "they do not fit)")
    offload.add_argument("--no-offload", dest="offload", action="store_const", const=False,
                         help="keep every expert resident; refused with --cache-experts, "
                              "--policy, --prefetch, --pool, --hybrid, or a budget too small for every "
                              "expert")
    group.add_argument("--experts", choices=EXPERT_FORMATS, default=d.experts,
                       help="expert format: int8/int4 quantize a float folder's experts as "
                            "they are read (int4: --device cpu only); a quantized folder runs "
                            "as its own format only (default: the folder's)")
    group.add_argument("--group-size", metavar="N", type=int, default=d.group_size,
                       help="int4 group size: 32, 64, 128 or 256, dividing the hidden and "
                            "intermediate sizes (default: 64); with --experts int4 only")
    group.add_argument("--quant-kernel", choices=QUANT_KERNELS, default=d.quant_kernel,
                       help="how int8/int4 experts and an int8 trunk are multiplied on the "
                            "CPU: torch (its weight-only kernels, the default) or int8-dot "
                            "(offload_rt's: activations quantized to int8 per group, integer "
                            "dot products; about 2x faster on one thread with AVX-512 VNNI; "
                            "built with the C compiler on first use)")
    group.add_argument("--trunk", choices=TRUNK_FORMATS, default=d.trunk,
                       help="trunk format: int8 quantizes the attention projections and the "
                            "LM head at load (one scale per output channel; --device cpu "
                            "only); embeddings, norms and routers stay in the compute dtype "
                            "(default: the folder's: float, the compute dtype, or the int8 "
                            "trunk offload-rt quantize --trunk int8 stored; float is refused "
                            "with that)")


def policy_spec(spec: str) -> str:
    """Check a policy name or dotted path now, so a typo fails before the model loads."""
    try:
        policy_class(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec



def runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    """``offload_rt.load`` keyword arguments from ``add_runtime_arguments`` flags.

    For the demo model (no MODEL_DIR) the expert cache holds only part of the experts unless
    a flag sizes it (``offload_rt.demo.demo_options``, as ``offload_rt.load()`` does), so
    offloading visibly happens.
    """
    opts = {"device": args.device, "dtype": args.dtype, "gpu_memory": args.gpu_memory,
            "cpu_memory": args.cpu_memory, "cache_experts": args.cache_experts,
            "policy": args.policy, "prefetch": args.prefetch, "pool": args.pool,
            "hybrid": args.hybrid,
            "max_seq_len": args.max_seq_len, "offload": args.offload,
            "experts": args.experts, "group_size": args.group_size, "trunk": args.trunk,
            "quant_kernel": args.quant_kernel}
    return demo_options(opts) if args.model_dir is None else opts


def model_dir(args: argparse.Namespace) -> Path:
    """MODEL_DIR, or the shipped demo model's folder when it was left out."""
    return args.model_dir if args.model_dir is not None else demo_model_dir()


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``minimum``: the parser's error names the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def progress_bar(enabled: bool) -> Callable[[int, int], None] | None:
    """A tqdm bar on stderr for weight loading, drawn only when stderr is a terminal (a log or
    a pipe gets no carriage-return noise). tqdm: well kept, and handles odd terminals."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar or bar["bar"].total != total or done == 1:
            if "bar" in bar:
                bar["bar"].close()
            bar["bar"] = tqdm(total=total, desc="loading", unit="tensor", leave=False)
        bar["bar"].update(done - bar["bar"].n)
        if done == total:
            bar["bar"].close()

    return update
