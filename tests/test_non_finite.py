"""Non-finite logits end generation with a NumericalError that says what to try.

The example from the field: an fp16 checkpoint whose experts overflow float16 (weights x60)
made greedy decoding emit token 0 with exit 0, and sampling end in torch.multinomial's raw
RuntimeError.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint, read_safetensors
from safetensors.torch import save_file

import offload_rt
from offload_rt.cli import main
from offload_rt.errors import NumericalError
from offload_rt.generation import GenerationConfig, generate_ids
from offload_rt.sampling import check_finite

PROMPT_IDS = [1, 5, 7]
FP16_ADVICE = "--dtype bfloat16"


@pytest.fixture(scope="module")
def overflowing_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float16 checkpoint with every expert weight multiplied by 60."""
    model = make_hf_checkpoint(tmp_path_factory.mktemp("fp16x60"),
                               TinySpec(dtype=torch.float16))
    path = model / "model.safetensors"
    metadata, tensors = read_safetensors(path)
    for name, t in tensors.items():
        if ".experts." in name:
            tensors[name] = (t.float() * 60).half()
    save_file(tensors, path, metadata)
    return model


def test_the_checkpoint_overflows_in_float16_only(overflowing_fp16: Path) -> None:
    ids = torch.tensor(PROMPT_IDS)
    with offload_rt.load(overflowing_fp16) as rt:
        assert rt.dtype == torch.float16
        assert not torch.isfinite(rt.model(ids, 0, last_only=True)).all()
    with offload_rt.load(overflowing_fp16, dtype="float32") as rt:
        assert torch.isfinite(rt.model(ids, 0, last_only=True)).all()
        out = rt.generate(PROMPT_IDS, max_new_tokens=4, ignore_eos=True)
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 0}],
                         ids=["greedy", "sampling"])
def test_api_raises_numerical_error(overflowing_fp16: Path, sampling: dict[str, float]) -> None:
    with offload_rt.load(overflowing_fp16) as rt:
        with pytest.raises(NumericalError) as info:
            rt.generate(PROMPT_IDS, max_new_tokens=5, **sampling)
        message = str(info.value)
        assert "float16" in message and "prefill" in message
        assert FP16_ADVICE in message and "--dtype float32" in message
        with pytest.raises(NumericalError):  # the runtime was released: not a BusyError
            rt.generate(PROMPT_IDS, max_new_tokens=1)


@pytest.mark.parametrize("flags", [[], ["--temperature", "1", "--seed", "0"], ["--json"]])
def test_cli_exits_2_with_the_advice(overflowing_fp16: Path, flags: list[str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", str(overflowing_fp16), "--prompt-ids", "1,5,7",
                 "--max-new-tokens", "5", *flags])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("offload-rt: error: ") and FP16_ADVICE in err
    assert "Traceback" not in err


class _NaNAt:
    """A fake model whose logits turn NaN from the forward call ``bad_call`` on."""

    max_seq_len = 32

    def __init__(self, bad_call: int, dtype: torch.dtype | None) -> None:
        self.bad_call, self.calls = bad_call, 0
        if dtype is not None:
            self.dtype = dtype

    def reset(self) -> None:
        self.calls = 0

    def forward(self, token_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        logits = torch.zeros(token_ids.numel(), 8)
        logits[:, 3] = 1.0
        if self.calls >= self.bad_call:
            logits[-1, 5] = float("nan")
        self.calls += 1
        return logits


@pytest.mark.parametrize(("dtype", "advice"), [
    (torch.float16, FP16_ADVICE), (torch.bfloat16, "corrupt"), (None, FP16_ADVICE)])
def test_error_names_the_decode_step_and_dtype(dtype: torch.dtype | None, advice: str) -> None:
    stream = generate_ids(_NaNAt(3, dtype), [1, 2], GenerationConfig(max_new_tokens=8),
                          eos_id=None)
    tokens = []
    with pytest.raises(NumericalError, match="decode step 3") as info:
        tokens.extend(stream)
    assert tokens == [3, 3, 3]  # the finite steps' tokens came out before the error
    assert advice in str(info.value)
    if dtype is not None:
        assert str(dtype).removeprefix("torch.") in str(info.value)


def test_check_finite_accepts_masked_ids_and_refuses_inf_and_all_masked() -> None:
    row = torch.tensor([0.5, float("-inf"), 2.0])
    check_finite(row, 1, torch.float32)  # -inf: a masked id, fine
    for bad, found in ((torch.tensor([0.5, float("inf")]), "+inf"),
                       (torch.full((3,), float("-inf")), "only -inf")):
        with pytest.raises(NumericalError, match=re.escape(found)):
            check_finite(bad, 0, torch.float32)
