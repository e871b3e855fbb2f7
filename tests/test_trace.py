"""The trace file format: round trip, clear errors naming the file, access order, no torch."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cache_policies import ExpertKey
from cache_policies.trace import (
    FORMAT,
    VERSION,
    Prediction,
    Record,
    Trace,
    TraceHeader,
    read_trace,
    write_trace,
)

ROOT = Path(__file__).resolve().parent.parent


def sample_trace() -> Trace:
    """A 3-token prefill then one decode step with a prediction, over 2 layers of 4 experts."""
    header = TraceHeader(2, 4, 2, model={"hidden_size": 32}, expert_bytes=1000, policy="lru",
                         capacity=3, pool="layer", max_group=3, prefetch=1, precision=4,
                         prompt_source="test", sequences=[{"prompt_tokens": 3}],
                         metadata={"note": "x"})
    prefill = ((3, 1), (1, 2), (0, 3))
    records = [
        Record(0, 0, 0, 0, prefill, weights=((0.6, 0.4),) * 3,
               probs=((0.1, 0.2, 0.3, 0.4),) * 3),
        Record(0, 0, 0, 1, ((2, 0), (0, 2), (2, 0))),  # tokens share experts: acquired once
        Record(1, 0, 3, 0, ((1, 0),), predicted=(Prediction(1, (2, 0), (0.3, 0.1, 0.5, 0.1)),)),
        Record(1, 0, 3, 1, ((2, 0),), predicted=(Prediction(1, (3, 1)),)),
    ]
    return Trace(header, records)


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    trace = sample_trace()
    path = tmp_path / name
    write_trace(path, trace)
    assert read_trace(path) == trace
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")


def test_gzip_is_detected_from_the_bytes_not_the_name(tmp_path: Path) -> None:
    write_trace(tmp_path / "t.jsonl.gz", sample_trace())
    (tmp_path / "t.jsonl.gz").rename(tmp_path / "renamed.jsonl")
    assert read_trace(tmp_path / "renamed.jsonl") == sample_trace()


def test_header_line_is_self_describing(tmp_path: Path) -> None:
    write_trace(tmp_path / "t.jsonl", sample_trace())
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert (header["format"], header["version"]) == (FORMAT, VERSION)
    assert (header["num_layers"], header["num_experts"], header["top_k"]) == (2, 4, 2)
    assert json.loads(lines[1])["experts"] == [[3, 1], [1, 2], [0, 3]]
    assert "probs" not in json.loads(lines[2]), "optional fields are left out when empty"
    assert json.loads(lines[3])["predicted"] == [[1, [2, 0], [0.3, 0.1, 0.5, 0.1]]]


def _write_lines(path: Path, *objs: object) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


@pytest.mark.parametrize(("header", "message"), [
    ({"format": "something.else", "version": 1}, "not an offload_rt.trace file"),
    ({"format": FORMAT, "version": 2}, "version 2 is not supported"),
    ({"format": FORMAT, "version": 1, "num_layers": 2}, "lacks integer field"),
    ([1, 2, 3], "not an offload_rt.trace file"),
])
def test_wrong_format_or_version_names_the_file(tmp_path: Path, header: object,
                                                message: str) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", header)
    with pytest.raises(ValueError, match=message) as info:
        read_trace(path)
    assert str(path) in str(info.value)


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"{empty}: empty file"):
        read_trace(empty)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\xff not json")
    with pytest.raises(ValueError, match=str(garbage)):
        read_trace(garbage)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(b"x" * 100)[:20])
    with pytest.raises(ValueError, match=str(broken_gz)):
        read_trace(broken_gz)
    with pytest.raises(ValueError, match="missing.jsonl"):
        read_trace(tmp_path / "missing.jsonl")


def test_bad_records_name_file_and_line(tmp_path: Path) -> None:
    header = {"format": FORMAT, "version": 1, "num_layers": 2, "num_experts": 4, "top_k": 2}
    ok = {"step": 0, "layer": 0, "experts": [[0, 1]]}
    cases = [({"step": 0, "layer": 5, "experts": [[0, 1]]}, "layer 5 outside num_layers=2"),
             ({"step": 0, "layer": 0, "experts": [[0, 9]]}, "outside num_experts=4"),
             ({"step": 0, "experts": [[0, 1]]}, "malformed record"),
             ("not an object", "malformed record")]
    for record, message in cases:
        path = _write_lines(tmp_path / "r.jsonl", header, ok, record)
        with pytest.raises(ValueError, match=f"{path}: line 3: .*{message}"):
            read_trace(path)


def test_unknown_header_keys_are_kept_as_metadata(tmp_path: Path) -> None:
    header = {"format": FORMAT, "version": 1, "num_layers": 1, "num_experts": 2, "top_k": 1,
              "from_the_future": [1]}
    trace = read_trace(_write_lines(tmp_path / "t.jsonl", header))
    assert trace.header.metadata == {"from_the_future": [1]} and trace.records == []


def test_access_steps_mirror_the_runtime_order() -> None:
    trace = sample_trace()

    def keys(layer: int, *experts: int) -> list[ExpertKey]:
        return [ExpertKey(layer, e) for e in experts]

    # Per forward call, layer by layer: distinct experts ascending, split at max_group.
    assert trace.access_steps() == [keys(0, 0, 1, 2, 3), keys(1, 0, 2), keys(0, 0, 1),
                                    keys(1, 0, 2)]
    assert trace.access_steps(3) == [keys(0, 0, 1, 2), keys(0, 3), keys(1, 0, 2), keys(0, 0, 1),
                                     keys(1, 0, 2)]
    assert trace.access_steps(1)[:4] == [keys(0, 0), keys(0, 1), keys(0, 2), keys(0, 3)]
    assert trace.num_tokens == 4 and trace.has_predictions


def test_trace_modules_import_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from cache_policies.trace import read_trace, write_trace\n"
        "from cache_policies.synthetic import synthetic_trace\n"
        "from cache_policies.sim_report import compare, format_table\n"
        "import cache_policies.plot\n"
        "t = synthetic_trace(num_layers=2, num_experts=4, tokens=20)\n"
        f"write_trace({str(tmp_path / 't.jsonl.gz')!r}, t)\n"
        f"t = read_trace({str(tmp_path / 't.jsonl.gz')!r})\n"
        "format_table(compare(t, ['lru', 'opt'], [2]))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'offload_rt'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
