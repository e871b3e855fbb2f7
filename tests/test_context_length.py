"""The context limit says where it comes from; a --max-seq-len above the model's is capped aloud.

max_seq_len is min(model's context, DEFAULT_CONTEXT = 4096) by default. A request that does
not fit says which of the three set the limit (our default, the model's field, the option) and
how to raise it; a max_seq_len above the model's context logs a warning with both numbers,
which the command line shows on stderr without -v.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from offload_rt.cli import main
from offload_rt.errors import ContextLengthError

LONG = 8192


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose config.json allows 8192 positions."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("long"),
                              TinySpec(max_position_embeddings=LONG))


def refusal(rt: offload_rt.Runtime, prompt_tokens: int, new: int = 128) -> str:
    with pytest.raises(ContextLengthError) as info:
        rt.generate([5] * prompt_tokens, max_new_tokens=new)
    return str(info.value)


def test_our_default_says_it_is_ours_and_how_to_raise_it(long_model: Path) -> None:
    """Was: 'exceeds the model's context length (max_seq_len) of 4096', on an 8192 model."""
    rt = offload_rt.load(long_model)
    assert rt.max_seq_len == 4096
    message = refusal(rt, 4001)
    for part in ("4001 tokens", "(max_seq_len) of 4096", "offload_rt's default",
                 "DEFAULT_CONTEXT", "--max-seq-len N", "max_seq_len=N", f"up to {LONG}",
                 f"max_position_embeddings in {long_model / 'config.json'}"):
        assert part in message, (part, message)
    raised = offload_rt.load(long_model, max_seq_len=LONG)
    assert len(raised.generate([5] * 4001, max_new_tokens=2, ignore_eos=True).token_ids) == 2


def test_a_smaller_max_seq_len_is_named_as_the_limit(long_model: Path) -> None:
    message = refusal(offload_rt.load(long_model, max_seq_len=100), 90, 20)
    assert "(max_seq_len) of 100 (set by max_seq_len (--max-seq-len) 100" in message
    assert f"up to {LONG}" in message


def test_the_models_own_context_is_named(tiny_hf_checkpoint: Path) -> None:
    message = refusal(offload_rt.load(tiny_hf_checkpoint), 250, 10)
    assert "(max_seq_len) of 256 (the model's context (max_position_embeddings in " in message


def test_max_seq_len_above_the_models_context_is_capped_with_a_warning(
        long_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Was: capped silently."""
    with caplog.at_level(logging.WARNING, logger="offload_rt"):
        rt = offload_rt.load(long_model, max_seq_len=10000)
    assert rt.max_seq_len == LONG
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert re.search(rf"\b10000\b.*\b{LONG}\b.*using {LONG}", record.getMessage())
    assert "the requested max_seq_len 10000 was capped" in refusal(rt, LONG)


def test_the_cli_shows_the_warning_without_verbose(tiny_hf_checkpoint: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "offload_rt.cli", "generate",
                           str(tiny_hf_checkpoint), "--prompt-ids", "1,2,3",
                           "--max-new-tokens", "2", "--max-seq-len", "512", "--json"],
                          capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"max_seq_len \(--max-seq-len\) 512 is above the model's context of 256",
                     proc.stderr), proc.stderr


def test_the_cli_error_names_the_default(long_model: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    ids = ",".join(["5"] * 4001)
    assert main(["generate", str(long_model), "--prompt-ids", ids]) == 2
    err = capsys.readouterr().err
    assert err.startswith("offload-rt: error: prompt of 4001 tokens")
    assert "DEFAULT_CONTEXT" in err and "--max-seq-len N" in err
