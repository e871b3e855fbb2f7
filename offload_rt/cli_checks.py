"""What the command line checks before it loads a model, so a bad flag costs a second, not a
load: text flags (``--system``, ``--stop``) as UTF-8, ``--seed``'s range, a tokenizer for text
prompts, sampling the model's generation_config.json cannot do, and output files that can be
written. Each ``OptionError`` names the flag. No torch here (``offload-rt --help`` stays fast).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from offload_rt.errors import OptionError
from offload_rt.generation_config import read_generation_config
from offload_rt.request_checks import check_seed
from offload_rt.text_input import check_text


def check_sampling_flags(args: argparse.Namespace) -> None:
    """``--seed`` in 0..2**64 - 1 and each ``--stop`` valid UTF-8 (``add_sampling_arguments``
    flags): a stop string with a bad byte could never match the generated text."""
    check_seed(args.seed, "--seed")
    for stop in args.stop or ():
        check_text(stop, "--stop")


def has_tokenizer(model_dir: Path) -> bool:
    """Whether the folder has a tokenizer file, as ``offload_rt.load`` looks for one
    (``tokenizer.json``, ``tokenizer.model``, ``tokenizer.model.v1``...; the same test as
    ``offload_rt.tokenizer.has_tokenizer_file``, without importing the tokenizer libraries)."""
    return (Path(model_dir) / "tokenizer.json").is_file() \
        or any(Path(model_dir).glob("tokenizer.model*"))


def require_tokenizer(model_dir: Path, what: str, instead: str) -> None:
    """OptionError unless ``model_dir`` has a tokenizer; ``what`` needs one, ``instead`` is
    the way that works without (``--prompt-ids 1,2,3``). A folder that is not there is left
    to ``offload_rt.load``, which says so."""
    if Path(model_dir).is_dir() and not has_tokenizer(model_dir):
        raise OptionError(f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model), "
                          f"so {what} cannot be encoded; {instead}")


def check_sampling_fields(model_dir: Path, args: argparse.Namespace,
                          temperature: float | None, chat_default: float | None = None) -> None:
    """OptionError when this command will sample and the model's generation_config.json sets
    a sampling-only field offload_rt does not implement (``min_p``...), saying who chose to
    sample. ``temperature``: the request's value after the command's fallbacks (None: the
    file's); ``chat_default``: the command's own default temperature, when it has one."""
    defaults = read_generation_config(model_dir)
    if args.temperature is not None:
        why = f"--temperature {args.temperature:g} samples" if args.temperature > 0 else None
    elif temperature is not None and defaults.default("temperature") is None:
        why = (f"chat samples by default (temperature {chat_default:g}, its own default for a "
               "model whose generation_config.json sets no do_sample)") \
            if temperature > 0 else None
    else:
        value = defaults.default("temperature")
        why = f"the file sets do_sample {defaults.do_sample}" if value else None
    if why is not None:
        defaults.check_sampling(why)


def check_output_path(path: Path, flag: str) -> None:
    """OptionError naming ``flag`` unless a file can be written at ``path``: not a folder, in
    a folder that exists, and writable (an existing file) or creatable (a new one). Nothing
    is created: a run that fails leaves no empty file behind."""
    if path.is_dir():
        raise OptionError(f"{flag} {path}: is a folder; give a file name in it")
    parent = path.parent
    if not parent.is_dir():
        raise OptionError(f"{flag} {path}: the folder {parent} does not exist")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OptionError(f"{flag} {path}: the file is not writable")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"{flag} {path}: cannot create a file in {parent} (permission denied)")


def write_output(path: Path, flag: str, write: Callable[[Path], Any]) -> Any:
    """``write(path)``, an ``OSError`` (a full disk, a folder removed meanwhile) becoming an
    OptionError naming ``flag`` and ``path``."""
    try:
        return write(path)
    except OSError as exc:
        raise OptionError(f"{flag} {path}: could not write the file: "
                          f"{exc.strerror or exc}") from exc
