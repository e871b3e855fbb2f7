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


# ---- quantized experts: kernels, quality, formats in the decode benchmark ---------------------

CLI = "import sys; from offload_rt.cli import main; sys.exit(main(sys.argv[1:]))"


def test_linear_bench_times_the_quantized_kernels() -> None:
    from offload_rt.quant import kernels

    many = max(kernels.INT8_DEQUANT_MIN_ROWS, kernels.INT4_DEQUANT_MIN_ROWS)  # both dequantize
    doc = _run(str(BENCH / "linear_bench.py"), "--sections", "quantized", "--hidden", "64",
               "--inter", "128", "--quant-rows", f"1,{many}", "--repeats", "2", "--target-ms",
               "1", "--group-size", "32", "--threads", "1")
    q = doc["quantized"]
    assert set(doc) >= {"quantized", "cpu_capability"} and "one_row" not in doc
    assert {(r["matrix"], r["rows"]) for r in q["records"]} == {
        (m, n) for m in ("w1;w3", "w2") for n in (1, many)}
    for r in q["records"]:
        assert {"bf16", "int8_kernel", "int8_dequant", "int4_kernel", "int8_dot",
                "int4_dot"} <= set(r["us"])
        assert all(v > 0 for v in r["us"].values()) and set(r["us_min"]) == set(r["us"])
        assert all(r["us_min"][k] <= v for k, v in r["us"].items())
        # the rule's choice at each row count is reported (1 row: the kernels)
        assert (r["int8_rule"], r["int4_rule"]) == (("kernel", "kernel") if r["rows"] == 1
                                                    else ("dequant", "dequant"))
    assert set(q["crossover"]) == set(q["crossover_min"]) == {"int8", "int4", "int8_dot",
                                                               "int4_dot"}
    assert q["int4_layout"] and doc["threads"] == 1
    assert q["rule"]["int8_dequant_min_rows"] > 1


@pytest.fixture(scope="module")
def tiny_quantized(tiny_bench: tuple[dict, dict]) -> dict[str, Path]:
    """The tiny model and folders ``offload-rt quantize`` wrote from it."""
    model = Path(tiny_bench[1]["model_dir"])
    folders = {"bf16": model}
    for fmt in ("int8", "int4"):
        out = model.parent / f"tiny-{fmt}"
        subprocess.run([sys.executable, "-c", CLI, "quantize", str(model), str(out),
                        "--experts", fmt, *(["--group-size", "32"] if fmt == "int4" else []),
                        "--force"], check=True, capture_output=True, timeout=300)
        folders[fmt] = out
    return folders


def test_decode_bench_runs_expert_formats(tiny_quantized: dict[str, Path],
                                          tmp_path: Path) -> None:
    modes = "ort_resident,ort_25_cold,ort_int4_resident,ort_int4_25_cold,ort_int8load_25_cold," \
            "ort_int8_resident,ort_int4dot_resident,ort_int4dot_25_cold"
    out = tmp_path / "formats.json"
    doc = _run(str(BENCH / "decode_bench.py"), str(tiny_quantized["bf16"]), "--modes", modes,
               "--int8-dir", str(tiny_quantized["int8"]), "--int4-dir",
               str(tiny_quantized["int4"]), "--prompt-tokens", "6", "--new-tokens", "4",
               "--repeats", "1", "--idle-max-wait", "0", "--limit-samples", "2", "--threads",
               "1", "--out", str(out))
    assert set(doc["runs"]) == set(modes.split(",")) and doc["threads"] == 1
    assert all(r[0]["torch_threads"] == 1 for r in doc["runs"].values())
    assert all(p["torch_threads"] == 1 for p in doc["physical"]["formats"].values())
    formats = {m: r[0]["expert_format"]["format"] for m, r in doc["runs"].items()}
    assert formats["ort_int4_25_cold"] == "int4" and formats["ort_int8load_25_cold"] == "int8"
    assert formats["ort_resident"] == "float"
    phys = doc["physical"]["formats"]
    assert set(phys) == {"bf16", "int4", "int8load", "int8", "int4dot"}
    # int4dot: the int4 folder's records, computed by the int8-dot kernels
    assert formats["ort_int4dot_25_cold"] == "int4"
    assert doc["runs"]["ort_int4dot_25_cold"][0]["quant_kernel"] == "int8-dot"
    assert doc["runs"]["ort_int4_25_cold"][0]["quant_kernel"] == "torch"
    assert phys["int4"]["record_bytes"] < phys["bf16"]["record_bytes"]
    assert phys["int8load"]["encode_s"] > 0 and phys["int4"]["encode_s"] is None
    # records read from disk: a quantized folder's loads are records, at load float matrices
    cold4, load8 = doc["runs"]["ort_int4_25_cold"][0], doc["runs"]["ort_int8load_25_cold"][0]
    assert cold4["engine_stats"]["bytes_from_disk"] % phys["int4"]["expert_bytes"] == 0
    assert load8["engine_stats"]["bytes_from_disk"] % phys["bf16"]["expert_bytes"] == 0
    limits = doc["summary"]["limits"]
    for mode, fmt in (("ort_25_cold", "bf16"), ("ort_int4_25_cold", "int4"),
                      ("ort_int8load_25_cold", "int8load"), ("ort_int4dot_25_cold", "int4dot")):
        assert limits[mode]["format"] == fmt and limits[mode]["achieved_over_limit"] > 0
    assert limits["ort_int8load_25_cold"]["cpu_per_load_s"] > 0
    assert "int4dot_25_cold_vs_int4" in doc["summary"]["comparisons"]
    assert {"int4_25_cold_vs_bf16", "int4_resident_vs_bf16", "int8load_25_cold_vs_bf16"} <= \
        set(doc["summary"]["comparisons"])
    table = subprocess.run([sys.executable, str(BENCH / "decode_bench.py"), "--table", str(out)],
                           check=True, capture_output=True, text=True).stdout
    assert "| ort_int4_25_cold | int4 |" in table and "int4_25_cold_vs_bf16" in table


def test_quant_quality_reports_every_format(tiny_quantized: dict[str, Path],
                                            tmp_path: Path) -> None:
    """The demo model on a made-up validation file (two 256-token windows) and the tiny random
    model, every format, with the folder check."""
    readme = (BENCH.parent / "README.md").read_text(encoding="utf-8")
    docs = [{"kind": "plain", "text": part} for part in readme.split("\n\n")[:40]]
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps(d) for d in docs), encoding="utf-8")
    out = tmp_path / "quality.json"
    doc = _run(str(BENCH / "quant_quality.py"), "--val", str(val), "--small",
               str(tiny_quantized["bf16"]), "--prompts", "2", "--new-tokens", "4",
               "--check-folders", "--scratch", str(tmp_path / "folders"), "--threads", "1",
               "--out", str(out))
    formats = {"bf16", "int8", "int4 g32", "int4 g64", "int4 g128", "fp8"}
    demo, small = doc["demo"], doc["small"]
    assert demo["windows"] >= 2 and demo["float32_compute_perplexity"] > 1
    assert set(demo["formats"]) == formats
    # the tiny model's hidden size (64) is not a multiple of 128: that group size is skipped
    assert set(small["formats"]) == formats - {"int4 g128"} and "int4 g128" in small["skipped"]
    for part in (demo, small):
        ref = part["formats"]["bf16"]
        assert ref["kl"] == 0 and ref["top1_agreement"] == 1 and ref["max_abs_logit_error"] == 0
        assert ref["greedy"]["same_tokens"] == 1
        for name in set(part["formats"]) - {"bf16"}:
            row = part["formats"][name]
            assert row["expert_bytes"] < ref["expert_bytes"] and row["kl"] > 0
            assert row["perplexity"] > 0 and 0 <= row["greedy"]["same_tokens"] <= 1
    assert all(c["identical_logits"] and c["identical_tokens"] for c in demo["folders"].values())
    assert set(demo["folders"]) == formats - {"bf16", "fp8"}  # fp8 is a folder already
    assert set(small["folders"]) == {"int8", "int4 g64"}
    assert demo["formats"]["fp8"]["options"]["model_dir"].endswith("-fp8")  # quantize wrote it
    assert doc["not_measured"] == {}
    table = subprocess.run([sys.executable, str(BENCH / "quant_quality.py"), "--table", str(out)],
                           check=True, capture_output=True, text=True).stdout
    assert "| int4 g128 |" in table and "| fp8 |" in table


def test_physical_limit_measures_an_fp8_checkpoint(tmp_path: Path) -> None:
    """It read fp8 experts with the float reader (ValueError) and tried to encode a random
    fp8 record (NotImplementedError); now the records come from the checkpoint's reader."""
    from test_quant_fp8 import SPEC, VARIANTS, make_fp8_checkpoint

    sys.path.insert(0, str(BENCH))
    try:
        import physical_limit
    finally:
        sys.path.remove(str(BENCH))
    model = make_fp8_checkpoint(tmp_path / "fp8", SPEC, VARIANTS["ct-channel"])
    doc = physical_limit.measure(model, samples=2, compute_repeats=2)
    assert doc["format"]["format"] == "fp8" and doc["record_bytes"] == doc["expert_bytes"]
    assert doc["read_cold_s"]["median"] > 0


def test_mixtral_bench_reports_budget_limit_and_swap(tiny_bench: tuple[dict, dict],
                                                     tmp_path: Path) -> None:
    """Two settings in one round on the tiny model: every run has its budget check and swap
    count, an offloaded run its limit (bounded by the slower of compute and reads), a resident
    one (every expert fits the automatic budget) none; --recompute gives the same table from
    the saved JSON."""
    made, _ = tiny_bench
    out = tmp_path / "r.json"
    doc = _run(str(BENCH / "mixtral_bench.py"), made["out"], "--setting",
               "small=--cache-experts 2", "--setting", "auto=", "--prompt-tokens", "6",
               "--new-tokens", "4", "--rounds", "1", "--disk-samples", "2", "--out", str(out),
               "--tree", f"small={BENCH.parent}")
    assert set(doc["table"]) == {"small", "auto"}
    assert doc["trees"] == {"small": str(BENCH.parent)}
    assert [doc["runs"][n][0]["tree"] for n in ("small", "auto")] == [str(BENCH.parent), None]
    for name, (run,) in doc["runs"].items():
        assert run["returncode"] == 0 and run["swapped_pages"] >= 0, name
        assert run["within_budget"] is (run["peak_rss_bytes"]
                                        <= run["budget_plus_baseline_bytes"])
        assert run["offloaded"] is (name == "small")
        if not run["offloaded"]:
            assert "limit_tokens_per_s" not in run
            continue
        assert run["bound_by"] in ("disk", "compute")
        bound = max(run["read_s_per_token"], run["compute_s_per_token"])
        assert run["limit_tokens_per_s"] == pytest.approx(1 / bound, rel=0.01)
        assert run["achieved_over_limit"] == pytest.approx(
            run["decode_tokens_per_s"] / run["limit_tokens_per_s"], rel=0.01)
    again = json.loads(subprocess.run([sys.executable, str(BENCH / "mixtral_bench.py"),
                                       "--recompute", str(out)], check=True,
                                      capture_output=True, text=True).stdout)
    assert again["table"] == json.loads(out.read_text())["table"]


@pytest.mark.parametrize(("tree", "says"), [
    ("other={repo}", "--tree names no --setting: ['other']"),
    ("small={repo}/benchmarks", "PATH a source tree with offload_rt/"),
    ("small", "expected NAME=PATH"),
])
def test_mixtral_bench_refuses_a_tree_it_cannot_run(tmp_path: Path, tree: str,
                                                    says: str) -> None:
    """Before any measurement: a tree for no setting, or a folder without ``offload_rt/``."""
    proc = subprocess.run([sys.executable, str(BENCH / "mixtral_bench.py"), str(tmp_path),
                           "--setting", "small=", "--tree", tree.format(repo=BENCH.parent)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr


def test_int_dot_bench_times_both_kernels() -> None:
    doc = _run(str(BENCH / "int_dot_bench.py"), "--matrices", "small int4 w2,small int8 w1;w3",
               "--repeats", "2", "--rotation-mib", "8")
    assert doc["memory_GBps"] > 0 and set(doc["matrices"]) == {"small int4 w2", "small int8 w1;w3"}
    for m in doc["matrices"].values():
        assert set(m["us"]) == {"torch", "int8_dot"} and all(v > 0 for v in m["us"].values())
        assert m["copies"] >= 2 and m["speedup"] > 0 and m["path"] is not None
    forced = _run(str(BENCH / "int_dot_bench.py"), "--matrices", "small int4 w2", "--repeats",
                  "1", "--rotation-mib", "4", "--path", "portable", "--packing", "32")
    assert forced["matrices"]["small int4 w2"]["path"] == "portable"
    assert forced["matrices"]["small int4 w2"]["packing"] == [32, "halves"]
