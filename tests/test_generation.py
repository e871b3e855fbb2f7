"""Generation loop on a scripted fake model: call pattern, stop rules, text and stop strings."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from offload_rt.errors import ContextLengthError, OptionError
from offload_rt.generation import (
    GenerationConfig,
    GenerationResult,
    StopStringFilter,
    generate_ids,
    stream_text,
)
from offload_rt.sampling import SamplingConfig

# Token id -> text. Id 0 is EOS; ids 1.. spell small pieces so stop strings can span tokens.
PIECES = ["<eos>", "a", "b", "<", "/", "s", ">", " ", "x", "ab</s>cd", "END"]
ID = {piece: i for i, piece in enumerate(PIECES)}
EOS = 0


class ScriptedLM:
    """Logits are a fixed function of position: row p predicts script[p + 1] (wrapping).

    Tests pass script = prompt + wanted output, so greedy decoding reproduces the output. Every
    call is recorded so the prefill/decode pattern can be checked.
    """

    def __init__(self, script: Sequence[int], max_seq_len: int = 64) -> None:
        self.script = list(script)
        self.max_seq_len = max_seq_len
        self.calls: list[tuple[list[int], int]] = []
        self.resets = 0
        self.on_forward: Callable[[int], None] | None = None  # hook(call index)

    def reset(self) -> None:
        self.resets += 1

    def forward(self, token_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        assert token_ids.dtype == torch.long and token_ids.dim() == 1
        self.calls.append((token_ids.tolist(), start_pos))
        if self.on_forward is not None:
            self.on_forward(len(self.calls) - 1)
        logits = torch.zeros(token_ids.numel(), len(PIECES))  # [T, vocab]
        for t in range(token_ids.numel()):
            logits[t, self.script[(start_pos + t + 1) % len(self.script)]] = 10.0
        return logits


class PieceDecoder:
    """Each id decodes to its fixed piece; optionally holds everything back until flush."""

    def __init__(self, hold_until_flush: bool = False) -> None:
        self.hold = hold_until_flush
        self.buffer = ""

    def push(self, token_id: int) -> str:
        self.buffer += PIECES[token_id]
        if self.hold:
            return ""
        out, self.buffer = self.buffer, ""
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def ids(*pieces: str) -> list[int]:
    return [ID[p] for p in pieces]


PROMPT = ids("x", "x", "x")


def model_for(*output: str, max_seq_len: int = 64) -> ScriptedLM:
    return ScriptedLM(PROMPT + ids(*output), max_seq_len=max_seq_len)


def config(max_new_tokens: int = 8, **kwargs: object) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, **kwargs)  # type: ignore[arg-type]


def test_greedy_prefill_once_then_one_token_at_a_time() -> None:
    model = model_for("a", "b", "a", "<eos>")
    stream = generate_ids(model, PROMPT, config(), eos_id=EOS)
    assert list(stream) == ids("a", "b", "a")
    assert model.resets == 1
    assert model.calls == [
        (PROMPT, 0),
        (ids("a"), 3),
        (ids("b"), 4),
        (ids("a"), 5),
    ]
    assert stream.result.finish_reason == "eos"
    assert stream.result.token_ids == ids("a", "b", "a")
    assert stream.result.prompt_tokens == 3


def test_reset_before_each_run() -> None:
    model = model_for("a", "<eos>")
    list(generate_ids(model, PROMPT, config(), eos_id=EOS))
    list(generate_ids(model, PROMPT, config(), eos_id=EOS))
    assert model.resets == 2
    assert [start for _, start in model.calls] == [0, 3, 0, 3]


def test_eos_not_yielded_and_no_forward_after_it() -> None:
    model = model_for("<eos>", "a")
    stream = generate_ids(model, PROMPT, config(), eos_id=EOS)
    assert list(stream) == []
    assert len(model.calls) == 1
    assert stream.result.finish_reason == "eos"


def test_ignore_eos_runs_to_length() -> None:
    model = model_for("a", "<eos>", "b", "b")
    stream = generate_ids(model, PROMPT, config(4, ignore_eos=True), eos_id=EOS)
    assert list(stream) == ids("a", "<eos>", "b", "b")
    assert stream.result.finish_reason == "length"


def test_no_eos_id_means_no_eos_stop() -> None:
    model = model_for("<eos>", "a")
    assert list(generate_ids(model, PROMPT, config(2), eos_id=None)) == ids("<eos>", "a")


def test_max_new_tokens_without_extra_forward() -> None:
    model = model_for(*["a"] * 10)
    stream = generate_ids(model, PROMPT, config(4), eos_id=EOS)
    assert list(stream) == ids("a", "a", "a", "a")
    assert len(model.calls) == 4  # the last token is not fed back
    assert stream.result.finish_reason == "length"


def test_timings_are_recorded() -> None:
    model = model_for(*["a"] * 5)
    stream = generate_ids(model, PROMPT, config(5), eos_id=EOS)
    list(stream)
    result = stream.result
    assert result.time_to_first_token_s > 0
    assert result.decode_steps == 4
    assert result.decode_s > 0 and result.decode_tokens_per_s > 0


def test_context_length_error_names_numbers() -> None:
    model = model_for("a", max_seq_len=10)
    with pytest.raises(ContextLengthError) as err:
        generate_ids(model, PROMPT, config(8), eos_id=EOS)
    message = str(err.value)
    assert "3" in message and "8" in message and "11" in message and "10" in message
    assert "max_new_tokens" in message and "max_seq_len" in message
    assert model.calls == [] and model.resets == 0


def test_context_exactly_full_is_allowed() -> None:
    model = model_for(*["a"] * 7, max_seq_len=10)
    assert len(list(generate_ids(model, PROMPT, config(7), eos_id=EOS))) == 7


def test_empty_prompt_rejected() -> None:
    with pytest.raises(OptionError, match="prompt"):
        generate_ids(model_for("a"), [], config(), eos_id=EOS)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 1.5}, "max_new_tokens"),
        ({"stop": "</s>"}, "stop"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_invalid_generation_options(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(OptionError, match=option):
        GenerationConfig(**kwargs)  # type: ignore[arg-type]


def test_stop_list_is_stored_as_tuple() -> None:
    assert GenerationConfig(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]


def test_seeded_generation_is_reproducible() -> None:
    class Uniform(ScriptedLM):
        def forward(self, token_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
            super().forward(token_ids, start_pos)
            return torch.zeros(token_ids.numel(), len(PIECES))

    def run(seed: int) -> list[int]:
        cfg = config(20, sampling=SamplingConfig(temperature=1.0, seed=seed))
        return list(generate_ids(Uniform(PROMPT), PROMPT, cfg, eos_id=None))

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_cancel_before_start_runs_nothing() -> None:
    cancel = threading.Event()
    cancel.set()
    model = model_for("a", "a")
    stream = generate_ids(model, PROMPT, config(), eos_id=EOS, cancel=cancel)
    assert list(stream) == [] and model.calls == []
    assert stream.result.finish_reason == "cancelled"


def test_cancel_by_consumer_stops_before_next_forward() -> None:
    cancel = threading.Event()
    model = model_for(*["a"] * 10)
    stream = generate_ids(model, PROMPT, config(), eos_id=EOS, cancel=cancel)
    got = []
    for token in stream:
        got.append(token)
        if len(got) == 2:
            cancel.set()
    assert len(got) == 2 and len(model.calls) == 2
    assert stream.result.finish_reason == "cancelled"


def test_cancel_from_other_thread_during_forward_stops_within_one_token() -> None:
    cancel = threading.Event()
    model = model_for(*["a"] * 10)

    def cancel_from_thread(call_index: int) -> None:
        if call_index == 3:  # another thread cancels while the 4th forward is running
            thread = threading.Thread(target=cancel.set)
            thread.start()
            thread.join()

    model.on_forward = cancel_from_thread
    stream = stream_text(model, PROMPT, config(), PieceDecoder(), eos_id=EOS, cancel=cancel)
    assert "".join(stream) == "aaaa"  # the token of the interrupted forward still counts
    assert len(model.calls) == 4
    assert stream.result.finish_reason == "cancelled"
    assert stream.result.text == "aaaa"


def text_run(
    *output: str, stop: tuple[str, ...] = (), n: int = 8, hold: bool = False
) -> tuple[list[str], GenerationResult, ScriptedLM]:
    model = model_for(*output)
    stream = stream_text(model, PROMPT, config(n, stop=stop), PieceDecoder(hold), eos_id=EOS)
    pieces = list(stream)
    return pieces, stream.result, model


def test_text_without_stop_strings() -> None:
    pieces, result, _ = text_run("a", "b", " ", "a", "<eos>")
    assert pieces == ["a", "b", " ", "a"]
    assert result.text == "ab a" and result.finish_reason == "eos"


def test_stop_string_split_over_tokens() -> None:
    pieces, result, model = text_run("a", "b", "<", "/", "s", ">", "a", "a", stop=("</s>",))
    assert "".join(pieces) == "ab" and result.text == "ab"
    assert result.finish_reason == "stop"
    assert result.token_ids == ids("a", "b", "<", "/", "s", ">")
    assert len(model.calls) == 6  # nothing runs after the stop string completes


def test_possible_stop_prefix_is_held_back() -> None:
    model = model_for("a", "<", "/", "s", ">")
    stream = stream_text(model, PROMPT, config(stop=("</s>",)), PieceDecoder(), eos_id=EOS)
    assert next(stream) == "a"
    assert list(stream) == []  # "<", "</", "</s" were never released
    assert stream.result.text == "a"


def test_false_start_is_released_once_disambiguated() -> None:
    pieces, result, _ = text_run("a", "<", "/", "x", "b", "<eos>", stop=("</s>",))
    assert pieces == ["a", "</x", "b"]
    assert result.text == "a</xb" and result.finish_reason == "eos"


def test_false_start_at_end_is_flushed() -> None:
    pieces, result, _ = text_run("a", "<", "/", n=3, stop=("</s>",))
    assert pieces == ["a", "</"]
    assert result.finish_reason == "length"


def test_stop_string_inside_one_token() -> None:
    pieces, result, _ = text_run("a", "ab</s>cd", "b", stop=("</s>",))
    assert "".join(pieces) == "aab" and result.finish_reason == "stop"


def test_earliest_of_several_stop_strings_wins() -> None:
    pieces, result, _ = text_run("a", "b", "x", "a", stop=("xa", "bx"))
    assert "".join(pieces) == "a" and result.finish_reason == "stop"


def test_stop_string_completed_by_decoder_flush() -> None:
    # The decoder releases "aEND" only at flush; the stop string must still be cut off.
    pieces, result, _ = text_run("a", "END", n=2, stop=("END",), hold=True)
    assert pieces == ["a"] and result.finish_reason == "stop"


def test_chunks_carry_their_token_ids() -> None:
    model = model_for("a", "<", "/", "x", "b", "<eos>")
    stream = stream_text(model, PROMPT, config(stop=("</s>",)), PieceDecoder(), eos_id=EOS)
    chunks = list(stream.chunks())
    assert [(c.text, c.token_ids) for c in chunks] == [
        ("a", ids("a")),
        ("</x", ids("<", "/", "x")),
        ("b", ids("b")),
    ]


def test_close_stops_model_work() -> None:
    model = model_for(*["a"] * 10)
    stream = stream_text(model, PROMPT, config(), PieceDecoder(), eos_id=EOS)
    next(stream)
    stream.close()
    assert list(stream) == [] and len(model.calls) == 1
    assert stream.result.finish_reason is None


def filter_all(stops: Sequence[str], parts: Sequence[str]) -> tuple[str, bool]:
    stop_filter = StopStringFilter(stops)
    out = ""
    for part in parts:
        text, stopped = stop_filter.push(part)
        out += text
        if stopped:
            return out, True
    return out + stop_filter.flush(), False


def reference(stops: Sequence[str], parts: Sequence[str]) -> tuple[str, bool]:
    """Stop at the first part after which the text contains a stop string; cut at the earliest."""
    text = ""
    for part in parts:
        text += part
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[: min(hits)], True
    return text, False


alphabet = st.text(alphabet="ab<", max_size=5)


@given(
    parts=st.lists(alphabet, max_size=8),
    stops=st.lists(alphabet.filter(bool), max_size=3),
)
@example(parts=["ab", "<"], stops=["ab<", "b"])  # "b" completes first though "ab<" starts earlier
def test_filter_matches_reference(parts: list[str], stops: list[str]) -> None:
    assert filter_all(stops, parts) == reference(stops, parts)
