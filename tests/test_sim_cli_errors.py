"""``offload-rt simulate`` and ``trace-stats`` refuse bad input with ``offload-rt: error:``
naming the option or file, never a traceback (issue 17). ``--zipf nan`` and ``--zipf 400``
crashed inside the trace generator (``ValueError``/``OverflowError`` tracebacks, exit 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache_policies.synthetic import MAX_ZIPF, SyntheticSpec, SyntheticSpecError
from offload_rt.cli import main


@pytest.mark.parametrize("command", ["simulate", "trace-stats"])
@pytest.mark.parametrize(("knob", "needle"), [
    (("--zipf", "nan"), "--synthetic --zipf nan: must be between 0 and 10"),
    (("--zipf", "400"), "--synthetic --zipf 400.0: must be between 0 and 10"),
    (("--zipf", "-1"), "--synthetic --zipf -1.0: must be between 0 and 10"),
    (("--layer-skew", "nan"), "--synthetic --layer-skew nan: must be between 0 and 1"),
    (("--top-k", "9"), "--synthetic --top-k 9: must be between 1 and the number of experts (8)"),
    (("--layers", "0"), "--synthetic --layers 0: must be >= 1"),
    (("--tokens", "0"), "--synthetic --tokens 0: must be >= 1 without a prefill"),
    (("--prefill", "-1"), "--synthetic --prefill -1: must be >= 0"),
    (("--sequences", "0"), "--synthetic --sequences 0: must be >= 1"),
    (("--predict-accuracy", "1.5"), "--synthetic --predict-accuracy 1.5: must be between 0"),
])
def test_synthetic_knobs_are_refused_by_flag(capsys: pytest.CaptureFixture[str], command: str,
                                             knob: tuple[str, str], needle: str) -> None:
    code = main([command, "--synthetic", "--layers", "2", "--tokens", "10", *knob])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.startswith("offload-rt: error: ") and needle in err


def test_the_largest_zipf_exponent_still_draws() -> None:
    from cache_policies.synthetic import synthetic_trace

    trace = synthetic_trace(num_layers=2, num_experts=256, top_k=8, tokens=5, zipf=MAX_ZIPF,
                            layer_skew=1.0)
    assert all(len(set(token)) == 8 for r in trace.records for token in r.experts)
    with pytest.raises(SyntheticSpecError) as caught:
        SyntheticSpec(zipf=float("inf"))
    assert caught.value.field == "zipf"


@pytest.mark.parametrize("command", ["simulate", "trace-stats"])
def test_files_that_are_not_traces_are_named(capsys: pytest.CaptureFixture[str], command: str,
                                             tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text("not json\n")
    (tmp_path / "empty.jsonl").write_text("")
    cases = {tmp_path / "missing.jsonl": "cannot read trace file",
             tmp_path: "cannot read trace file",
             tmp_path / "bad.jsonl": "line 1 is not valid JSON",
             tmp_path / "empty.jsonl": "empty file"}
    for path, needle in cases.items():
        code = main([command, str(path)])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and "Traceback" not in err
        assert err.startswith(f"offload-rt: error: {path}: ") and needle in err
