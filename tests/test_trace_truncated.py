"""A trace file cut short (a full disk, a ``head -n``, an interrupted copy) is refused by name,
not simulated as if it were the whole run: the header counts the records that follow."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from cache_policies.synthetic import SyntheticSpec, synthetic_trace
from cache_policies.trace import Trace, read_trace, write_trace
from offload_rt.cli import main


@pytest.fixture()
def trace() -> Trace:
    return synthetic_trace(SyntheticSpec(num_layers=3, num_experts=4, top_k=2, tokens=10, seed=2))


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_header_counts_the_records(tmp_path: Path, trace: Trace) -> None:
    path = tmp_path / "t.jsonl"
    write_trace(path, trace)
    assert json.loads(lines(path)[0])["records"] == len(trace.records) == len(lines(path)) - 1
    assert read_trace(path) == trace  # the count is framing: not part of the header read back


@pytest.mark.parametrize("kept", [0, 1, 16])  # at a forward call's boundary or inside one
def test_records_cut_at_a_line_boundary_are_refused(tmp_path: Path, trace: Trace,
                                                    kept: int) -> None:
    path = tmp_path / "t.jsonl"
    write_trace(path, trace)
    path.write_text("".join(lines(path)[:1 + kept]))
    total = len(trace.records)
    with pytest.raises(ValueError, match=rf"^{path}: truncated \(cut short\?\): the header counts "
                                         rf"{total} records, the file holds {kept}"):
        read_trace(path)


def test_extra_records_and_a_bad_count_are_refused(tmp_path: Path, trace: Trace) -> None:
    path = tmp_path / "t.jsonl"
    write_trace(path, trace)
    text = lines(path)
    path.write_text("".join(text + text[-1:]))
    with pytest.raises(ValueError, match="longer than its header says"):
        read_trace(path)
    header = {**json.loads(text[0]), "records": "many"}
    path.write_text(json.dumps(header) + "\n" + "".join(text[1:]))
    with pytest.raises(ValueError, match="header field 'records' must be a count, got 'many'"):
        read_trace(path)


def test_a_cut_gzip_stream_is_called_truncated(tmp_path: Path, trace: Trace) -> None:
    path = tmp_path / "t.jsonl.gz"
    write_trace(path, trace)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 8])  # the gzip trailer (CRC and size) is gone
    with pytest.raises(ValueError, match=rf"^{path}: truncated \(cut short\?\): the gzip stream "
                                         "ends before its end marker"):
        read_trace(path)
    assert gzip.decompress(data)  # the uncut file was fine


def test_simulate_refuses_a_truncated_trace(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            trace: Trace) -> None:
    path = tmp_path / "half.jsonl"
    write_trace(path, trace)
    path.write_text("".join(lines(path)[:len(trace.records) // 2 + 1]))
    code = main(["simulate", str(path), "--capacity", "2"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == (f"offload-rt: error: {path}: truncated (cut short?): the header counts "
                   f"{len(trace.records)} records, the file holds {len(trace.records) // 2}; "
                   "record the trace again\n")
