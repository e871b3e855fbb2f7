"""A policy (user code) raising a ``BaseException`` that is not an ``Exception``: a
``SystemExit`` or a ``GeneratorExit`` is the policy's failure, a ``PolicyError`` naming the
policy and the hook on every thread, the cache left usable; a ``KeyboardInterrupt`` in the
caller stays an interrupt (break-it finding 2h).

Before: on the caller's thread ``GeneratorExit`` escaped as a traceback and ``SystemExit(3)``
ended the command line silently with status 3 (only the prefetch thread wrapped them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import fault_injection as fi
import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint
from fault_injection import assert_clean, run_guarded

import offload_rt
from cache_policies import LRUPolicy
from offload_rt.cli import main
from offload_rt.errors import PolicyError

SPEC = TinySpec(num_experts=8, top_k=2, num_layers=3, seed=43)
PROMPT = torch.randint(0, SPEC.vocab_size, (12,),
                       generator=torch.Generator().manual_seed(6)).tolist()
NEW_TOKENS = 8
MAX_SEQ = 64


class ExitingInit(LRUPolicy):
    """Its constructor calls sys.exit."""

    name: ClassVar[str] = "exiting-init"

    def __init__(self) -> None:
        raise SystemExit(3)


class ExitingAccess(LRUPolicy):
    """Calls sys.exit(3) in on_access (the caller's thread only calls it)."""

    name: ClassVar[str] = "exiting-access"

    def on_access(self, key: object, now: int) -> None:
        raise SystemExit(3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("policy_exits"), SPEC)


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    fi.disarm()
    yield
    fi.disarm()


def generate(rt: offload_rt.Runtime) -> fi.Outcome:
    return run_guarded(lambda: rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True))


ERRORS: dict[str, Callable[[], BaseException]] = {
    "SystemExit": lambda: SystemExit(3), "GeneratorExit": lambda: GeneratorExit("policy bug")}


@pytest.mark.parametrize("error", list(ERRORS))
@pytest.mark.parametrize(("hook", "prefetch"), [("on_access", False), ("choose_victim", False),
                                                ("on_insert", True)])
def test_system_exit_and_generator_exit_are_policy_errors(model_dir: Path, error: str,
                                                          hook: str, prefetch: bool) -> None:
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k, prefetch=2,
                         policy="fault_injection:RaisingPolicy", max_seq_len=MAX_SEQ) as rt:
        armed = fi.arm(hook, prefetch=prefetch, nth=3, error=ERRORS[error])
        outcome = generate(rt)
        assert armed.fired, f"{hook} was never called on that thread: nothing was tested"
        assert isinstance(outcome.error, PolicyError), repr(outcome.error)
        message = str(outcome.error)
        assert "RaisingPolicy" in message and hook in message and error in message
        assert ("prefetch thread" in message) == prefetch
        assert_clean(rt.experts)  # type: ignore[arg-type]
        assert generate(rt).error is None  # the runtime goes on


def test_keyboard_interrupt_from_a_policy_stays_an_interrupt(model_dir: Path) -> None:
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k, prefetch=0,
                         policy="fault_injection:RaisingPolicy", max_seq_len=MAX_SEQ) as rt:
        fi.arm("on_access", nth=3, error=KeyboardInterrupt)
        outcome = generate(rt)
        assert type(outcome.error) is KeyboardInterrupt, repr(outcome.error)
        assert_clean(rt.experts)  # type: ignore[arg-type]


def cli(capsys: pytest.CaptureFixture[str], model_dir: Path, policy: str) -> tuple[int, str]:
    argv = ["generate", str(model_dir), "--prompt-ids", ",".join(map(str, PROMPT)),
            "--max-new-tokens", str(NEW_TOKENS), "--dtype", "float32", "--cache-experts",
            str(SPEC.top_k), "--max-seq-len", str(MAX_SEQ), "--prefetch", "0",
            "--policy", policy]
    outcome = run_guarded(lambda: main(argv))
    assert outcome.error is None, repr(outcome.error)  # was SystemExit(3), silently
    return outcome.result, capsys.readouterr().err


@pytest.mark.parametrize(("policy", "words"), [
    (f"{__name__}:ExitingAccess", ["cache policy 'exiting-access'", "on_access",
                                   "SystemExit: 3"]),
    (f"{__name__}:ExitingInit", ["the cache policy of the device tier could not be built",
                                 "__init__", "SystemExit: 3"]),
])
def test_cli_policy_exit_is_one_error_line(capsys: pytest.CaptureFixture[str], model_dir: Path,
                                           policy: str, words: list[str]) -> None:
    code, err = cli(capsys, model_dir, policy)
    assert code == 2, err
    assert err.startswith("offload-rt: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
