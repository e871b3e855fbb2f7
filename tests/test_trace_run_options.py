"""A recorded trace's header says which trunk (``--trunk``) and miss handling (``--hybrid``) the
run used, and reads them back; traces written before the two keys read as "float" and "off".

Before: the header kept the dtype, the expert format and the cache settings but neither option,
so a trace of an int8-trunk run, or of a GPU run computing misses on the CPU, could not be told
from a float one; and the live check expected a hybrid run's replay to match the runtime's
counts exactly (a miss the CPU computed never enters the device cache, which the replay does not
model), so it printed "MISMATCH: please report it with the trace".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from cache_policies.live import live_check, live_note
from cache_policies.trace import FORMAT, Trace, read_trace, write_trace
from offload_rt.engine.hybrid import HybridRule
from offload_rt.trace_recorder import record_trace, runtime_header

SPEC = TinySpec(num_layers=2, num_experts=4, top_k=2, seed=5)
PROMPTS = [[1, 5, 9, 3], [7, 2]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("run_options"), SPEC)


def _traced(model_dir: Path, **options: Any) -> Trace:
    with offload_rt.load(model_dir, dtype="float32", cache_experts=2, prefetch=0,
                         max_seq_len=32, **options) as rt:
        return record_trace(rt, None, PROMPTS, 4, ignore_eos=True)


@pytest.mark.parametrize("trunk", ["float", "int8"])
def test_the_trunk_is_recorded_and_read_back(model_dir: Path, tmp_path: Path,
                                             trunk: str) -> None:
    trace = _traced(model_dir, trunk=trunk)
    path = tmp_path / "t.jsonl.gz"
    write_trace(path, trace)
    back = read_trace(path)
    assert (back.header.trunk, back.header.hybrid) == (trunk, "off")  # a CPU run: no hybrid
    assert back == trace


def test_a_run_with_a_hybrid_rule_records_its_mode(model_dir: Path) -> None:
    """The mode is recorded where a rule decided misses (a GPU run with a host tier); a CPU run
    has none (``hybrid="auto"`` has no effect there) and records "off"."""
    with offload_rt.load(model_dir, dtype="float32", cache_experts=2, hybrid="auto",
                         max_seq_len=32) as rt:
        assert runtime_header(rt).hybrid == "off"
        rt.experts.hybrid = HybridRule(1)  # what a GPU run's start-up measurement sets
        try:
            assert runtime_header(rt).hybrid == "auto"
        finally:
            rt.experts.hybrid = None
    with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=32) as rt:
        assert (runtime_header(rt).trunk, runtime_header(rt).hybrid) == ("float", "off")


def test_traces_written_before_the_keys_read_as_float_and_off(tmp_path: Path) -> None:
    header = {"format": FORMAT, "version": 1, "num_layers": 1, "num_experts": 4, "top_k": 2}
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(header) + "\n" +
                    json.dumps({"step": 0, "layer": 0, "experts": [[0, 1]]}) + "\n")
    trace = read_trace(path)
    assert (trace.header.trunk, trace.header.hybrid) == ("float", "off")
    assert trace.header.metadata == {}  # not mistaken for unknown keys either


@pytest.mark.parametrize(("name", "value"), [("trunk", 8), ("hybrid", None), ("hybrid", True)])
def test_run_options_of_another_type_are_refused(tmp_path: Path, name: str,
                                                 value: object) -> None:
    header = {"format": FORMAT, "version": 1, "num_layers": 1, "num_experts": 4, "top_k": 2,
              name: value}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(header) + "\n")
    with pytest.raises(ValueError, match=rf"^{path}: header field '{name}' must be a string "
                                         rf"\(the run's --{name}: "):
        read_trace(path)


def test_the_live_check_expects_no_exact_match_from_a_hybrid_run(model_dir: Path) -> None:
    trace = _traced(model_dir)
    check = live_check(trace)
    assert check is not None and check["expected_exact"] and check["exact"]
    hybrid = Trace(dataclasses.replace(trace.header, hybrid="auto"), trace.records)
    first = hybrid.header.sequences[0]["measured"]
    first["misses"] -= 1  # a run whose counts its replay does not reproduce
    try:
        check = live_check(hybrid)
        assert check is not None and check["hybrid"] == "auto"
        assert not check["expected_exact"] and not check["exact"]
        note = live_note(check)
        assert "MISMATCH" not in note and "computed some misses on the CPU (hybrid auto)" in note
    finally:
        first["misses"] += 1
