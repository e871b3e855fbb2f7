"""The decode benchmark runs end to end on the 'tiny' preset and reports every field it promises.

No timing assertions: the numbers depend on the machine; only the JSON's shape and the
bookkeeping that does not depend on speed (token counts, routing, limits present) are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
MODES = "ort_resident,ort_25_cold,hf_resident"


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, *args], check=False, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    model = tmp_path_factory.mktemp("bench") / "tiny"
    made = _run(str(BENCH / "make_checkpoint.py"), "tiny", "--out", str(model), "--check")
    doc = _run(str(BENCH / "decode_bench.py"), str(model), "--prompt-tokens", "6",
               "--new-tokens", "4", "--repeats", "1", "--modes", MODES, "--idle-max-wait", "0",
               "--limit-samples", "2")
    return made, doc


def test_tiny_checkpoint_routes_to_every_expert(tiny_bench: tuple[dict, dict]) -> None:
    made, _ = tiny_bench
    assert made["routing"]["ok"], made["routing"]
    assert made["written_bytes"] > 0


def test_decode_bench_reports_every_field(tiny_bench: tuple[dict, dict]) -> None:
    _, doc = tiny_bench
    assert set(doc["runs"]) == set(MODES.split(","))
    for mode, runs in doc["runs"].items():
        (run,) = runs
        assert len(run["token_ids"]) == 4, mode
        for key in ("decode_tokens_per_s", "tokens_per_s", "time_to_first_token_s",
                    "peak_rss_bytes", "others_cpu_fraction", "idle", "load_s"):
            assert run[key] is not None, (mode, key)
    cold = doc["runs"]["ort_25_cold"][0]
    for key in ("hit_rate", "bytes_per_token", "stall_fraction", "misses_per_token",
                "required_loads_per_token", "prefetch_overlap", "disk_read_bytes_per_token"):
        assert key in cold, key
    stats = cold["engine_stats"]
    for key in ("hits", "misses", "hit_rate", "bytes_moved", "bytes_per_token", "stall_s",
                "prefetch_issued", "prefetch_useful", "prefetch_wasted"):
        assert key in stats, key
    assert stats["misses"] > 0 and stats["bytes_moved"] > 0
    # the same greedy decode whatever the engine or cache
    assert cold["same_tokens_as_ort_resident"] == 1.0


def test_decode_bench_summary_ratios_and_limits(tiny_bench: tuple[dict, dict]) -> None:
    _, doc = tiny_bench
    summary = doc["summary"]
    assert set(summary["modes"]) == set(MODES.split(","))
    for table in summary["modes"].values():
        assert set(table["decode_tokens_per_s"]) == {"median", "min", "max"}
    assert summary["ratio_to_ort_resident"]["ort_resident"] == 1.0
    assert "ort_resident_vs_hf_resident" in summary["comparisons"]
    phys = doc["physical"]
    assert phys["read_cold_s"]["median"] > 0 and phys["compute_s"]["median"] > 0
    lim = summary["limits"]["ort_25_cold"]
    for key in ("limit_tokens_per_s", "serial_tokens_per_s", "measured_overlap_tokens_per_s",
                "achieved_over_limit", "required_loads_per_token", "bound_by"):
        assert key in lim, key
    assert lim["serial_tokens_per_s"] <= lim["limit_tokens_per_s"]


def test_gpu_bench_skips_cleanly_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: gpu_bench would run for real")
    doc = _run(str(BENCH / "gpu_bench.py"), "/nonexistent")
    assert doc["skipped"]


def test_linear_bench_reports_every_kernel() -> None:
    doc = _run(str(BENCH / "linear_bench.py"), "--hidden", "64", "--inter", "96", "--vocab",
               "512", "--repeats", "1", "--iters", "2", "--shape-rows", "8")
    assert doc["benchmark"] == "linear"
    assert {r["dtype"] for r in doc["one_row"]} == {"bfloat16", "float16", "float32"}
    for r in doc["one_row"]:
        assert r["linear_us"] > 0 and r["mv_us"] > 0 and r["linear_over_mv"] > 0
    assert {r["rows"] for r in doc["many_rows"]} == {16, 128, 512}
    assert all(r["linear_over_fp32_blocks"] > 0 for r in doc["many_rows"])
    shapes = doc["bf16_shapes"]
    assert shapes["row_counts"] == 7 and shapes["weights"] == 4
    assert {"plain_growth_mib", "bucketed_growth_mib", "native_bf16"} <= set(shapes)


def test_reader_bench_runs_every_read_mode(tiny_bench: tuple[dict, dict]) -> None:
    doc = _run(str(BENCH / "reader_bench.py"), tiny_bench[1]["model_dir"], "--repeats", "1",
               "--prompt-tokens", "4", "--new-tokens", "3")
    assert set(doc["runs"]) == {"o_direct", "buffered_drop", "buffered_readahead"}
    assert all(len(v) == 1 and v[0] > 0 for v in doc["runs"].values())
    assert doc["ratio_to_buffered_readahead"]["buffered_readahead"] == 1.0


def test_alignment_probe_reports_every_case() -> None:
    doc = _run(str(BENCH / "alignment_probe.py"), "--hidden", "24", "--intermediate", "40")
    assert doc["benchmark"] == "alignment_probe" and doc["cpu"]["torch"]
    assert {(r["dtype"], r["rows"]) for r in doc["results"]} == {
        (d, n) for d in ("float32", "bfloat16", "float16") for n in (1, 2, 16, 64)}
    # the placement rule's assumption, on this CPU: same phase in another page, same bits
    assert all(r["differs_across_pages"] == [] for r in doc["results"]), doc["results"]


def test_ab_bench_compares_two_trees(tiny_bench: tuple[dict, dict]) -> None:
    tree = str(BENCH.parent)
    doc = _run(str(BENCH / "ab_bench.py"), tiny_bench[1]["model_dir"], "--before", tree,
               "--after", tree, "--rounds", "1", "--repeats", "1", "--prompt-tokens", "4",
               "--new-tokens", "3", "--mode", "resident=--no-offload",
               "--mode", "cold=--cache-experts,2")
    assert set(doc["modes"]) == {"resident", "cold"}
    for mode in doc["modes"].values():
        assert mode["same_tokens"] is True
        assert mode["decode_after_over_before"] > 0 and mode["ttft_after_over_before"] > 0
        assert set(mode["runs"]) == {"before", "after"}
