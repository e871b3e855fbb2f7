"""What an app embedding the runtime relies on: cancel from any thread, refused concurrent calls,
``close()`` that really frees, and no state shared between runtimes or printed to the console.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from offload_rt.engine.offloaded import PREFETCH_READERS
from offload_rt.errors import BusyError, OffloadError
from offload_rt.runtime import Output, Runtime

PROMPT = "The capital of France is"
OTHER = "Once upon a time"
LONG = 200  # never reached: these generations are cancelled or abandoned
WAIT_S = 60  # generous: a busy 2-core box
OPTIONS: dict[str, Any] = {"cache_experts": 2, "prefetch": 1}  # offloaded, prefetch thread on


def spec(seed: int) -> TinySpec:
    return TinySpec(vocab_size=32000, tokenizer=True, num_experts=8, seed=seed)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("api_a"), spec(0))


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("api_b"), spec(1))


@pytest.fixture(scope="module")
def rt(ckpt: Path) -> Iterator[Runtime]:
    with offload_rt.load(ckpt, **OPTIONS) as runtime:
        yield runtime


def solo(model_dir: Path, prompt: str = PROMPT, n: int = 8) -> Output:
    """A fresh runtime's greedy output, the runtime closed afterwards."""
    with offload_rt.load(model_dir, **OPTIONS) as fresh:
        return fresh.generate(prompt, max_new_tokens=n, ignore_eos=True)


def start(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def finish(thread: threading.Thread) -> None:
    thread.join(WAIT_S)
    assert not thread.is_alive(), "the generation did not stop"


def generate_in_background(runtime: Runtime) -> tuple[threading.Thread, dict[str, Any]]:
    """A long generation in a thread, returned once it has produced a token."""
    box: dict[str, Any] = {}
    before = runtime.last_result

    def work() -> None:
        try:
            box["out"] = runtime.generate(PROMPT, max_new_tokens=LONG, ignore_eos=True)
        except Exception as exc:  # noqa: BLE001 - handed to the test's thread to report
            box["error"] = exc

    thread = start(work)
    deadline = time.monotonic() + WAIT_S
    while runtime.last_result is before or not runtime.last_result.token_ids:
        assert thread.is_alive(), box
        assert time.monotonic() < deadline, "the generation did not start"
        time.sleep(0.001)
    return thread, box


# ---- cancel -------------------------------------------------------------------------------------


def test_cancel_while_the_consumer_thread_waits(rt: Runtime) -> None:
    """The consumer pauses after its 3rd piece; cancel() comes from the test's thread."""
    reached, resume = threading.Event(), threading.Event()
    pieces: list[str] = []

    def consume() -> None:
        for piece in rt.stream(PROMPT, max_new_tokens=LONG, ignore_eos=True):
            pieces.append(piece)
            if len(pieces) == 3:
                reached.set()
                resume.wait(WAIT_S)

    thread = start(consume)
    assert reached.wait(WAIT_S)
    n_at_cancel = len(rt.last_result.token_ids)
    rt.cancel()
    resume.set()
    finish(thread)
    assert rt.last_result.finish_reason == "cancelled"
    assert len(rt.last_result.token_ids) <= n_at_cancel + 1


def test_cancel_while_the_main_thread_consumes(rt: Runtime, ckpt: Path) -> None:
    """Free-running consumer; the count read right after cancel() can only overstate the
    tokens made before it, so `<= n + 1` never fails a correct runtime."""
    reached, counted = threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def canceller() -> None:
        if reached.wait(WAIT_S):
            rt.cancel()
            seen["n"] = len(rt.last_result.token_ids)
            counted.set()

    thread = start(canceller)
    for k, _ in enumerate(rt.stream(PROMPT, max_new_tokens=LONG, ignore_eos=True), start=1):
        if k == 3:
            reached.set()
    finish(thread)
    assert counted.is_set()
    assert rt.last_result.finish_reason == "cancelled"
    assert len(rt.last_result.token_ids) <= seen["n"] + 1
    # Usable afterwards: the cancel request does not leak into the next call.
    again = rt.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    assert again.finish_reason == "length"
    fresh = solo(ckpt)
    assert (again.token_ids, again.text) == (fresh.token_ids, fresh.text)


# ---- one generation at a time ---------------------------------------------------------------------


def test_second_call_while_streaming_is_refused(rt: Runtime) -> None:
    refused: list[BaseException] = []

    def second() -> None:
        try:
            rt.generate(OTHER, max_new_tokens=2)
        except OffloadError as exc:
            refused.append(exc)

    # closing(): a failed assertion must not leave the shared runtime busy for later tests
    with contextlib.closing(rt.stream(PROMPT, max_new_tokens=12, ignore_eos=True)) as gen:
        first = next(gen)  # running now, paused between tokens
        finish(start(second))
        assert len(refused) == 1 and isinstance(refused[0], BusyError), refused
        assert "already running" in str(refused[0])
        assert rt.last_prompt_ids == rt.encode(PROMPT)  # the refused call left no trace
        text = first + "".join(gen)
    assert rt.last_result.finish_reason == "length"
    assert len(rt.last_result.token_ids) == 12
    assert text == rt.last_result.text
    assert rt.generate(OTHER, max_new_tokens=2).token_ids  # free again


def test_refused_call_keeps_the_running_output_intact(rt: Runtime) -> None:
    thread, box = generate_in_background(rt)
    with pytest.raises(BusyError, match="already running"):
        rt.generate(OTHER, max_new_tokens=2)
    rt.cancel()
    finish(thread)
    out = box["out"]
    assert out.finish_reason == "cancelled"
    assert out.prompt_token_ids == rt.encode(PROMPT)  # not the refused call's prompt


@pytest.mark.parametrize("abandon", ["close", "garbage-collect"])
def test_abandoned_stream_releases_the_runtime(rt: Runtime, abandon: str) -> None:
    gen = rt.stream(PROMPT, max_new_tokens=LONG, ignore_eos=True)
    next(gen)
    if abandon == "close":
        gen.close()
    else:
        del gen
        gc.collect()
    out = rt.generate(OTHER, max_new_tokens=3, ignore_eos=True)
    assert len(out.token_ids) == 3


# ---- close --------------------------------------------------------------------------------------


def prefetch_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "offload-rt-prefetch" and t.is_alive()}


def test_close_stops_the_thread_frees_memory_and_refuses_calls(ckpt: Path) -> None:
    before = prefetch_threads()
    runtime = offload_rt.load(ckpt, **OPTIONS)
    runtime.generate(PROMPT, max_new_tokens=4)
    ours = prefetch_threads() - before
    assert len(ours) == PREFETCH_READERS  # the offloaded engine's prefetch threads
    model = weakref.ref(runtime.model)
    slots = weakref.ref(runtime.experts.device.slots.storage)  # type: ignore[attr-defined]
    runtime.close()
    gc.collect()
    assert not any(t.is_alive() for t in ours)
    assert model() is None and slots() is None
    for call in (lambda: runtime.generate(PROMPT, max_new_tokens=2),
                 lambda: "".join(runtime.stream(PROMPT, max_new_tokens=2))):
        with pytest.raises(OffloadError, match="closed"):
            call()
    runtime.close()  # twice is harmless


def test_close_during_a_generation_cancels_it(ckpt: Path) -> None:
    runtime = offload_rt.load(ckpt, **OPTIONS)
    model = weakref.ref(runtime.model)
    thread, box = generate_in_background(runtime)
    runtime.close()
    finish(thread)
    assert "error" not in box, box
    assert box["out"].finish_reason == "cancelled"
    del box
    gc.collect()
    assert model() is None


# ---- no shared state ----------------------------------------------------------------------------


def test_two_runtimes_give_what_each_gives_alone(ckpt: Path, other_ckpt: Path) -> None:
    alone = {ckpt: solo(ckpt, n=10), other_ckpt: solo(other_ckpt, n=10)}
    assert alone[ckpt].token_ids != alone[other_ckpt].token_ids  # the models do differ
    with offload_rt.load(ckpt, **OPTIONS) as a, offload_rt.load(other_ckpt, **OPTIONS) as b:
        # Interleaved token by token in one thread...
        streams = [r.stream(PROMPT, max_new_tokens=10, ignore_eos=True) for r in (a, b)]
        texts = ["", ""]
        running = [0, 1]
        while running:
            for i in list(running):
                piece = next(streams[i], None)
                if piece is None:
                    running.remove(i)
                else:
                    texts[i] += piece
        assert texts == [alone[ckpt].text, alone[other_ckpt].text]
        # ...and at the same time in two threads.
        outs: dict[Path, Output] = {}

        def run(r: Runtime, key: Path) -> None:
            outs[key] = r.generate(PROMPT, max_new_tokens=10, ignore_eos=True)

        threads = [start(lambda r=r, k=k: run(r, k)) for r, k in ((a, ckpt), (b, other_ckpt))]
        for t in threads:
            finish(t)
        for key in (ckpt, other_ckpt):
            assert outs[key].token_ids == alone[key].token_ids


def test_library_prints_nothing_and_logs_instead(ckpt: Path, capfd: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="offload_rt")
    with offload_rt.load(ckpt, **OPTIONS) as runtime:
        runtime.generate(PROMPT, max_new_tokens=4)
        "".join(runtime.stream(messages=[{"role": "user", "content": "hi"}], max_new_tokens=4))
    assert capfd.readouterr() == ("", "")
    assert any(r.name.startswith("offload_rt") for r in caplog.records)


def test_generate_returns_its_own_result_when_another_call_slips_in(ckpt: Path) -> None:
    """A second generation may start the instant the first releases the runtime. The first
    call's Output (prompt ids, tokens, statistics) must still be its own."""
    want_first, want_second = solo(ckpt, PROMPT, 6), solo(ckpt, OTHER, 3)
    with offload_rt.load(ckpt, **OPTIONS) as runtime:
        slipped: list[Output] = []

        class SlipIn:  # the runtime's lock, plus another generation right after each release
            def __init__(self, lock: Any) -> None:
                self.lock, self.armed = lock, True

            def acquire(self, blocking: bool = True) -> bool:
                return self.lock.acquire(blocking)

            def release(self) -> None:
                self.lock.release()
                if self.armed:
                    self.armed = False
                    slipped.append(runtime.generate(OTHER, max_new_tokens=3, ignore_eos=True))

        runtime._busy = SlipIn(runtime._busy)  # type: ignore[assignment]
        first = runtime.generate(PROMPT, max_new_tokens=6, ignore_eos=True)
    assert slipped and slipped[0].token_ids == want_second.token_ids
    assert first.prompt_token_ids == want_first.prompt_token_ids
    assert first.token_ids == want_first.token_ids
    assert first.stats["tokens"] == 6 and first.stats["prompt_tokens"] == len(
        want_first.prompt_token_ids)
