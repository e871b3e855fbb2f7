"""Flags shared by the subcommands that run a model (generate, chat, bench): the model folder
(optional: the shipped demo model), sampling, and ``RuntimeOptions``. One place, so every
subcommand offers the same flags with the same meaning."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cache_policies.registry import available_policies, policy_class
from offload_rt.demo import DEMO_CACHE_EXPERTS, demo_model_dir
from offload_rt.options import POOLS, RuntimeOptions

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_NEW_TOKENS = 128


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", type=Path, nargs="?", default=None,
                        help="model folder (Hugging Face or Mistral-native layout); omitted: "
                             "the shipped demo model, with part of its experts cached")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for how many tokens, how to pick them and when to stop."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", metavar="N", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                       help="tokens to generate at most (default: %(default)s)")
    group.add_argument("--temperature", metavar="T", type=float, default=0.0,
                       help="0 = greedy (default: %(default)s)")
    group.add_argument("--top-k", metavar="K", type=int, default=0,
                       help="sample from the K most likely tokens; 0 = off (default: %(default)s)")
    group.add_argument("--top-p", metavar="P", type=float, default=1.0,
                       help="nucleus sampling mass; 1 = off (default: %(default)s)")
    group.add_argument("--seed", metavar="S", type=int, default=None,
                       help="random seed for sampling (default: nondeterministic)")
    group.add_argument("--stop", metavar="STR", action="append", default=[],
                       help="stop when this text appears (not printed); repeatable")
    group.add_argument("--ignore-eos", action="store_true",
                       help="keep generating past the end-of-sequence token")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``Runtime.stream``/``generate`` keyword arguments from ``add_sampling_arguments`` flags."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
            "stop": tuple(args.stop), "ignore_eos": args.ignore_eos}


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for ``RuntimeOptions``: device, dtype, memory budgets and the expert cache."""
    d = RuntimeOptions()
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N "
                       "(default: %(default)s)")
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default=d.dtype,
                       help="compute dtype (default: the checkpoint's)")
    group.add_argument("--gpu-memory", metavar="SIZE", default=d.gpu_memory,
                       help="GPU budget, e.g. 6GiB or auto (default: auto)")
    group.add_argument("--cpu-memory", metavar="SIZE", default=d.cpu_memory,
                       help="RAM budget, e.g. 16GiB or auto (default: auto)")
    group.add_argument("--cache-experts", metavar="K", type=int, default=d.cache_experts,
                       help="device expert slots per layer (forces offloading)")
    group.add_argument("--policy", metavar="NAME", type=policy_spec, default=d.policy,
                       help=f"expert eviction policy: {', '.join(available_policies())}, or a "
                            "class as pkg.module:Class (default: %(default)s)")
    group.add_argument("--prefetch", metavar="D", type=int, default=d.prefetch,
                       help="prefetch experts D layers ahead; 0 = off (default: %(default)s)")
    group.add_argument("--pool", choices=POOLS, default=d.pool,
                       help="expert cache pools: one per layer, one shared (global), or auto = "
                            "per layer when that fits (default: %(default)s)")
    group.add_argument("--max-seq-len", metavar="N", type=int, default=d.max_seq_len,
                       help="context length to allocate (default: min(model's, 4096))")
    group.add_argument("--offload", action=argparse.BooleanOptionalAction, default=d.offload,
                       help="always / never stream experts (default: only when they do not fit)")


def policy_spec(spec: str) -> str:
    """Check a policy name or dotted path now, so a typo fails before the model loads."""
    try:
        policy_class(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec



def runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    """``offload_rt.load`` keyword arguments from ``add_runtime_arguments`` flags.

    For the demo model (no MODEL_DIR) with no budget flags given, the expert cache holds only
    part of the experts, so offloading visibly happens.
    """
    opts = {"device": args.device, "dtype": args.dtype, "gpu_memory": args.gpu_memory,
            "cpu_memory": args.cpu_memory, "cache_experts": args.cache_experts,
            "policy": args.policy, "prefetch": args.prefetch, "pool": args.pool,
            "max_seq_len": args.max_seq_len, "offload": args.offload}
    budget_flags = ("gpu_memory", "cpu_memory", "cache_experts", "offload")
    if args.model_dir is None and all(opts[k] is None for k in budget_flags):
        opts["cache_experts"] = DEMO_CACHE_EXPERTS
    return opts


def model_dir(args: argparse.Namespace) -> Path:
    return args.model_dir if args.model_dir is not None else demo_model_dir()


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
