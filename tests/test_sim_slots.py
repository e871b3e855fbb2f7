"""Pool sizes in slots for either layout (issue 17, item 1).

``--capacity`` counts slots per layer (a global pool got capacity x layers), so a budget-sized
global pool (7 or 17 slots; Mixtral 8x7B's 22 in 12 GiB) could not be replayed from the CLI.
``--slots N`` sizes one global pool in total slots; ``all`` sweeps every size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cache_policies.compare import compare
from cache_policies.pool_sizes import ALL, capacities, global_slots, parse_sizes
from cache_policies.rows import PoolSize
from cache_policies.synthetic import synthetic_trace
from cache_policies.trace import write_trace
from offload_rt.cli import main


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def six_layers(tmp_path: Path) -> Path:
    """The demo model's shape: 6 layers x 8 experts, top-2."""
    path = tmp_path / "six.jsonl"
    write_trace(path, synthetic_trace(num_layers=6, num_experts=8, tokens=80, seed=1))
    return path


def test_global_pools_of_any_size_from_the_cli(capsys: pytest.CaptureFixture[str],
                                               six_layers: Path) -> None:
    code, out, err = cli(capsys, "simulate", six_layers, "--slots", "7,17,24", "--policies",
                         "lru,opt", "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["pool"], r["pool_slots"], r["slots"], r["capacity"]) for r in rows[::2]] == [
        ("global", 7, 7, None), ("global", 17, 17, None), ("global", 24, 24, None)]
    trace = synthetic_trace(num_layers=6, num_experts=8, tokens=80, seed=1)
    api = compare(trace, ["lru", "opt"], capacities=[], slots=[7, 17, 24])
    assert [r["hits"] for r in rows] == [r.hits for r in api]


def test_both_layouts_in_one_run_and_the_table_says_which(
        capsys: pytest.CaptureFixture[str], six_layers: Path) -> None:
    code, out, _ = cli(capsys, "simulate", six_layers, "--capacity", "4", "--slots", "24",
                       "--policies", "lru")
    assert code == 0
    lines = out.splitlines()
    assert "4 per layer" in lines[1] and "24 total" in lines[2]
    code, out, _ = cli(capsys, "simulate", six_layers, "--capacity", "4", "--pool", "global",
                       "--policies", "lru")
    assert "24 total (4/layer)" in out.splitlines()[1]


def test_mixtral_budget_sized_global_pool(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's Mixtral 8x7B example: 22 slots over 32 layers in 12 GiB."""
    code, out, err = cli(capsys, "simulate", "--synthetic", "--layers", "32", "--tokens", "40",
                         "--slots", "22", "--policies", "lru,opt", "--json")
    assert code == 0, err
    assert {(r["pool"], r["pool_slots"]) for r in json.loads(out)["rows"]} == {("global", 22)}


@pytest.mark.parametrize(("argv", "needles"), [
    (("--slots", "1"), ("--slots 1", "top_k (2)", "at least 2 slots")),
    (("--slots", "49"), ("--slots 49", "48 experts (6 layers x 8)")),
    (("--slots", "0"), ("argument --slots", "positive integers")),
    (("--capacity", "9"), ("--capacity 9", "8 experts per layer")),
])
def test_sizes_outside_the_trace_are_refused(capsys: pytest.CaptureFixture[str],
                                             six_layers: Path, argv: tuple[str, ...],
                                             needles: tuple[str, ...]) -> None:
    code, out, err = cli(capsys, "simulate", six_layers, *argv)
    assert code == 2 and out == "" and "Traceback" not in err
    for needle in needles:
        assert needle in err


def test_all_sweeps_every_size(capsys: pytest.CaptureFixture[str], six_layers: Path) -> None:
    code, out, _ = cli(capsys, "simulate", six_layers, "--capacity", "all", "--slots", "all",
                       "--policies", "lru", "--json", "--resamples", "0")
    assert code == 0
    sizes = [(r["pool"], r["pool_slots"]) for r in json.loads(out)["rows"]]
    assert sizes == [("layer", c) for c in range(2, 9)] + [("global", s) for s in range(2, 49)]


def test_size_helpers() -> None:
    header = synthetic_trace(num_layers=3, num_experts=4, tokens=2).header
    assert parse_sizes("2, 4") == [2, 4] and parse_sizes("ALL") == ALL
    with pytest.raises(ValueError, match="positive integers"):
        parse_sizes("2,x")
    assert capacities(header, None) == [2, 4] and capacities(header, ALL) == [2, 3, 4]
    assert global_slots(header, None) == [] and global_slots(header, ALL) == list(range(2, 13))
    assert PoolSize.per_layer_slots(4, 6, per_layer=False) == PoolSize(False, 24, 4)
    assert PoolSize.global_slots(7).total(6) == 7 and PoolSize(True, 4).total(6) == 24
