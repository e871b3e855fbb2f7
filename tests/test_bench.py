"""``offload-rt bench`` and what it is built on: link busy clocks, per-step engine counters,
decode-only figures, the summary and JSON outputs, bad options. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from offload_rt.bench import bench_prompt, run_bench
from offload_rt.cli import main
from offload_rt.engine import stats as stats_module
from offload_rt.engine.stats import BusyClock, EngineStats
from offload_rt.engine.step_clock import StepClock

SPEC = TinySpec(num_experts=8, top_k=2, num_layers=2, seed=31)  # no tokenizer: ids only


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("bench"), SPEC)


def test_busy_clock_counts_overlapping_transfers_once(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(stats_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    clock = BusyClock()
    clock.enter()  # t=0
    now[0] = 2.0
    clock.enter()  # a second transfer joins the first
    now[0] = 3.0
    assert clock.leave() == 0.0  # the link stays busy
    now[0] = 5.0
    assert clock.leave() == 5.0 and clock.inflight == 0  # one interval: 0 -> 5
    now[0] = 9.0
    clock.enter()
    now[0] = 9.5
    assert clock.leave() == 0.5  # a new interval starts from its own enter


def test_step_clock_separates_decode_steps() -> None:
    stats = EngineStats()
    clock = StepClock(stats)
    model = torch.nn.Identity()
    with clock.attached(model):
        stats.misses += 3  # before the first call: not counted
        for tokens, misses in ((5, 4), (1, 2), (1, 1)):
            clock.pre(model, (torch.zeros(tokens),))
            stats.misses += misses
            clock.post(model, (torch.zeros(tokens),), None)
    assert [s["T"] for s in clock.steps] == [5, 1, 1]
    totals = clock.decode_totals()
    assert totals["steps"] == 2 and totals["misses"] == 3
    assert not model._forward_hooks and not model._forward_pre_hooks  # detached


def test_bench_prompt_is_seeded_and_in_vocabulary() -> None:
    a, b = bench_prompt(100, 50, seed=1), bench_prompt(100, 50, seed=1)
    assert a == b != bench_prompt(100, 50, seed=2)
    assert all(3 <= t < 100 for t in a)


def test_run_bench_offloaded_reports_decode_figures(model_dir: Path) -> None:
    with offload_rt.load(model_dir, cache_experts=2, prefetch=1) as rt:
        seen: list[int] = []
        r = run_bench(rt, prompt_tokens=8, new_tokens=6, repeats=2,
                      report=lambda i, run: seen.append(i))
    assert seen == [0, 1] and r["offloaded"] and len(r["runs"]) == 2
    assert r["same_tokens_every_run"]
    for run in r["runs"]:
        assert run["decode_steps"] == 5  # 6 tokens: the first comes from the prefill
        assert run["loads_per_token"] > 0 and 0 <= run["hit_rate"] <= 1
        assert 0 < run["disk_busy_fraction"] <= 1 and run["h2d_busy_fraction"] == 0
        assert run["disk_GBps_while_busy"] > 0 and run["link_limit_tokens_per_s"] > 0
        # every load is a miss or an issued prefetch; a prefetch ends used, wasted or pending
        prefetched = run["prefetch_useful_per_token"] + run["prefetch_wasted_per_token"]
        assert 0 <= prefetched <= run["loads_per_token"]
        assert 0 < run["unstalled_s_per_token"] <= 1 / run["decode_tokens_per_s"] + 1e-6
    assert r["median"]["loads_per_token"] > 0
    assert r["bound_by"] in ("disk", "compute")


def test_bench_command_json_and_summary(model_dir: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", str(model_dir), "--prompt-tokens", "6", "--new-tokens", "4",
            "--repeats", "2", "--cache-experts", "2"]
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert r["repeats"] == 2 and r["options"]["cache_experts_per_layer"] == 2
    assert err.count("tok/s decode") == 2  # one progress line per run
    assert main(args) == 0
    out, _ = capsys.readouterr()
    for label in ("decode", "first token", "hit rate", "expert loads", "disk busy", "bound by"):
        assert label in out
    assert main(["bench", str(model_dir), "--no-offload", "--repeats", "1", "--new-tokens",
                 "3"]) == 0
    out, _ = capsys.readouterr()
    assert "every expert resident" in out and "hit rate" not in out
    assert "kernels" not in out.splitlines()[0]  # torch's, the default: not named


def test_bench_summary_names_the_int8_dot_kernels(model_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(model_dir), "--no-offload", "--repeats", "1", "--new-tokens", "3",
                 "--experts", "int8", "--quant-kernel", "int8-dot"]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[0].endswith(", int8-dot kernels)")


@pytest.mark.parametrize("flag", ["--new-tokens=1", "--repeats=0", "--prompt-tokens=0"])
def test_bench_refuses_degenerate_settings(model_dir: Path, flag: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(model_dir), flag]) == 2
    assert f"argument {flag.split('=')[0]}: must be >=" in capsys.readouterr().err


def test_bench_reports_peak_rss_next_to_the_process_baseline(
        model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", str(model_dir), "--prompt-tokens", "6", "--new-tokens", "3",
            "--repeats", "1", "--cache-experts", "2", "--cpu-memory", "64MiB"]
    assert main([*args, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert 0 < r["process_baseline_rss_bytes"] <= r["peak_rss_bytes"]
    assert r["memory_budget_bytes"] == 64 * 2**20
    assert 0 < r["memory_planned_bytes"] <= r["memory_budget_bytes"]
    assert main(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("memory"))
    assert "peak RSS" in line and "process baseline" in line and "64.0 MiB --cpu-memory budget" in line
    with offload_rt.load(model_dir, cache_experts=2) as rt:  # the API: no baseline was taken
        r = run_bench(rt, prompt_tokens=4, new_tokens=2, repeats=1)
    assert r["process_baseline_rss_bytes"] is None and r["peak_rss_bytes"] > 0


def test_bench_decodes_greedily_whatever_the_model_samples_by_default(
        tmp_path: Path) -> None:
    """A model whose generation_config.json says do_sample must still be benchmarked greedily:
    the same tokens every run, the tokens a greedy generate gives."""
    model = make_hf_checkpoint(tmp_path, SPEC)
    (model / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 1.5, "top_p": 1.0, "top_k": 0}))
    with offload_rt.load(model, cache_experts=2, prefetch=0) as rt:
        result = run_bench(rt, prompt_tokens=8, new_tokens=12, repeats=2, seed=3)
        greedy = rt.generate(bench_prompt(SPEC.vocab_size, 8, 3), max_new_tokens=12,
                             ignore_eos=True, temperature=0.0).token_ids
    assert result["same_tokens_every_run"]
    assert result["token_ids"] == greedy


def test_bench_lists_each_layers_pool(model_dir: Path) -> None:
    """A budget's spare slot goes to layer 0 (3 and 2 slots): before, the JSON said only
    ``cache_experts_per_layer`` 2.5, an average no pool has; now ``cache_experts_by_layer``
    lists the pools (None for one global pool, and both None when experts are resident)."""
    options: dict[str, object] = {"max_seq_len": 64, "prefill_chunk": 8}
    with offload_rt.load(model_dir, cache_experts=2, **options) as rt:
        fp = rt.plan.footprint
    budget = fp.fixed + (2 * SPEC.num_layers + 1 + 1) * fp.slot - 1  # 2 per layer, 1 spare

    def sizes(**more: object) -> tuple[object, object]:
        with offload_rt.load(model_dir, **{**options, **more}) as rt:
            o = run_bench(rt, prompt_tokens=4, new_tokens=2, repeats=1)["options"]
        return o["cache_experts_per_layer"], o["cache_experts_by_layer"]

    assert sizes(cpu_memory=budget) == (2.5, [3, 2])
    assert sizes(cache_experts=2) == (2, [2, 2])
    assert sizes(cpu_memory=budget, pool="global") == (2.5, None)
    assert sizes(offload=False) == (None, None)
