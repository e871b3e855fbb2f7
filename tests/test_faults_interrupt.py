"""An interrupt is an interrupt (issue 18, item 5): Ctrl-C during offloaded decode exits 130
with the text so far printed, never "loading expert ... failed: " (exit 2); through the API a
``KeyboardInterrupt`` raised anywhere in the engine propagates as itself and the runtime stays
usable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import fault_injection as fi
import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint
from fault_injection import FaultyReader, assert_clean, run_guarded

import offload_rt
from offload_rt.engine.offloaded import OffloadedExperts

SPEC = TinySpec(num_experts=8, top_k=2, num_layers=3, seed=61)
PROMPT = torch.randint(0, SPEC.vocab_size, (12,),
                       generator=torch.Generator().manual_seed(2)).tolist()
NEW_TOKENS = 16
MAX_SEQ = 64
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("interrupt"), SPEC)


@pytest.fixture(scope="module")
def resident_tokens(model_dir: Path) -> list[int]:
    with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=MAX_SEQ) as rt:
        return rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    fi.disarm()
    yield
    fi.disarm()


def generate(rt: offload_rt.Runtime) -> fi.Outcome:
    return run_guarded(lambda: rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True))


@pytest.mark.parametrize(("prefetch", "nth"), [(0, 1), (0, 30), (2, 4), (2, 25)])
def test_keyboard_interrupt_in_a_read_propagates_as_itself(
        model_dir: Path, resident_tokens: list[int], prefetch: int, nth: int) -> None:
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k,
                         prefetch=prefetch, max_seq_len=MAX_SEQ) as rt:
        experts = rt.experts
        assert isinstance(experts, OffloadedExperts)
        good = experts.reader
        experts.reader = FaultyReader(good, in_prefetch=False, nth=nth, error=KeyboardInterrupt)
        outcome = generate(rt)
        assert type(outcome.error) is KeyboardInterrupt, repr(outcome.error)  # not LoaderError
        assert_clean(experts)

        experts.reader = good
        again = generate(rt)
        assert again.error is None, repr(again.error)
        assert again.result.token_ids == resident_tokens


def test_keyboard_interrupt_in_a_policy_hook_is_not_a_policy_error(
        model_dir: Path, resident_tokens: list[int]) -> None:
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k, prefetch=1,
                         policy="fault_injection:RaisingPolicy", max_seq_len=MAX_SEQ) as rt:
        fi.arm("on_access", nth=20, error=KeyboardInterrupt)
        outcome = generate(rt)
        assert type(outcome.error) is KeyboardInterrupt, repr(outcome.error)
        assert_clean(rt.experts)  # type: ignore[arg-type]
        again = generate(rt)
        assert again.error is None and again.result.token_ids == resident_tokens


# ---- the command line: a real SIGINT while decoding -------------------------------------------

# Runs `offload-rt generate`; once ARM_AT tokens were sampled, the next demand read (on the
# main thread: with --prefetch the prefetch thread is busy meanwhile) sends this process SIGINT,
# once: Ctrl-C while the disk is read, where "loading expert ... failed: " came from.
SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading
    import offload_rt.sampling as sampling
    from offload_rt.engine.expert_reader import ExpertReader
    from offload_rt.cli import main

    ARM_AT, argv = int(sys.argv[1]), sys.argv[2:]
    state = {"tokens": 0, "sent": False}
    real_sample, real_read = sampling.Sampler.sample, ExpertReader.__call__

    def sample(self, logits):
        state["tokens"] += 1
        return real_sample(self, logits)

    def read(self, key, out):
        main = threading.current_thread() is threading.main_thread()
        if ARM_AT and main and state["tokens"] >= ARM_AT and not state["sent"]:
            state["sent"] = True
            os.kill(os.getpid(), signal.SIGINT)
        return real_read(self, key, out)

    sampling.Sampler.sample, ExpertReader.__call__ = sample, read
    sys.exit(main(argv))
""")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(num_experts=8, top_k=2, num_layers=3, vocab_size=32000, tokenizer=True,
                    seed=62)
    return make_hf_checkpoint(tmp_path_factory.mktemp("interrupt_text"), spec)


def cli(model: Path, arm_at: int, prefetch: int) -> subprocess.CompletedProcess[str]:
    argv = ["generate", str(model), "--prompt", "Hello there", "--max-new-tokens", "40",
            "--ignore-eos", "--cache-experts", "2", "--prefetch", str(prefetch),
            "--max-seq-len", "128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(arm_at), *argv],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_sigint_during_offloaded_decode_exits_130_keeping_the_text(text_model: Path,
                                                                    prefetch: int) -> None:
    with offload_rt.load(text_model, cache_experts=2, max_seq_len=128) as rt:
        full = rt.generate("Hello there", max_new_tokens=40, ignore_eos=True).text
    cut = cli(text_model, 6, prefetch)
    assert cut.returncode == 130, cut.stderr  # before: 2, "loading expert L1E5 failed: "
    assert "interrupted" in cut.stderr
    assert "error" not in cut.stderr and "Traceback" not in cut.stderr, cut.stderr
    assert cut.stdout and full.startswith(cut.stdout)  # the text so far, as printed
    assert len(cut.stdout) < len(full)
