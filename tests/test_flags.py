"""Flags that meet: each combination has one deliberate rule, the same in the CLI and the API.

Contradictions are refused (``offload-rt: error: ...`` naming both flags, exit 2; ``OptionError``
naming both options in the API); ``auto`` means exactly what leaving a flag out means; the demo
model is the default model everywhere (``generate``, ``chat``, ``bench``, ``trace``, ``load()``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import offload_rt
from cache_policies.synthetic import synthetic_trace
from cache_policies.trace import read_trace, write_trace
from offload_rt.cli import main
from offload_rt.demo import DEMO_CACHE_EXPERTS, demo_model_dir
from offload_rt.errors import BudgetError, OffloadError, OptionError

PROMPT = ("--prompt", "The capital of France is")


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("offload-rt: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def demo_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = cli(capsys, "generate", *PROMPT, "--max-new-tokens", "4", "--json", *argv)
    assert code == 0, err
    return json.loads(out.splitlines()[-1])


# ---- the demo's default cache: 'auto' is the same as no flag ------------------------------------


def test_cpu_memory_auto_is_the_same_as_no_flag_for_the_demo(
        capsys: pytest.CaptureFixture[str]) -> None:
    # prefetch off: what a background load moves depends on thread timing, the cache does not
    implicit = demo_json(capsys, "--prefetch", "0")
    spelled = demo_json(capsys, "--prefetch", "0", "--cpu-memory", "auto", "--gpu-memory", "auto")
    assert implicit["stats"]["offloaded"] is True and spelled["stats"]["offloaded"] is True
    for key in ("hits", "misses", "bytes_moved"):
        assert spelled["stats"][key] == implicit["stats"][key], key
    assert spelled["token_ids"] == implicit["token_ids"]


def test_api_auto_budget_keeps_the_demo_cache() -> None:
    with offload_rt.load(cpu_memory="auto", prefetch=0) as rt:
        assert rt.offloaded and rt.plan.device_slots_per_pool == DEMO_CACHE_EXPERTS


# ---- contradictions are refused, naming both -----------------------------------------------------


def test_cache_experts_with_no_offload_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(*cli(capsys, "generate", *PROMPT, "--cache-experts", "2", "--no-offload"),
                   "--cache-experts", "--no-offload")


def test_api_cache_experts_with_offload_false_raises() -> None:
    with pytest.raises(OptionError, match=r"cache_experts.*offload=False"):
        offload_rt.load(cache_experts=2, offload=False)


def test_gpu_memory_on_a_cpu_run_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(*cli(capsys, "generate", *PROMPT, "--gpu-memory", "6GiB"),
                   "--gpu-memory", "--device cpu")
    with pytest.raises(OptionError, match=r"gpu_memory.*device='cpu'"):
        offload_rt.load(gpu_memory="6GiB", device="cpu")


def test_no_offload_with_a_budget_too_small_for_every_expert_is_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    from offload_rt.engine.budget import footprint

    with offload_rt.load(cache_experts=2, prefetch=0) as rt:  # only to read the sizes
        cfg, fp = rt.config, footprint(rt.config, rt.dtype, rt.max_seq_len, 512)
    budget = fp.fixed + (cfg.num_experts * cfg.num_layers - 1) * fp.slot  # one expert short
    with pytest.raises(BudgetError, match=r"--no-offload.*--cpu-memory"):
        offload_rt.load(cpu_memory=budget, offload=False)
    assert_refused(*cli(capsys, "generate", *PROMPT, "--cpu-memory", str(budget),
                        "--no-offload"), "--no-offload", "--cpu-memory")


# ---- simulate: capacities the runtime refuses, predictions a trace does not have ------------------


SYNTHETIC = ("simulate", "--synthetic", "--layers", "2", "--experts", "4", "--top-k", "2",
             "--tokens", "20", "--policies", "lru,opt")


@pytest.mark.parametrize(("capacity", "needles"), [
    ("1", ("--capacity 1", "top_k (2)")),
    ("2,5", ("--capacity 5", "4 experts per layer")),
])
def test_simulate_refuses_capacities_the_runtime_refuses(
        capsys: pytest.CaptureFixture[str], capacity: str, needles: tuple[str, ...]) -> None:
    assert_refused(*cli(capsys, *SYNTHETIC, "--capacity", capacity), *needles)
    assert_refused(*cli(capsys, *SYNTHETIC, "--capacity", capacity, "--pool", "global"),
                   *needles)


def test_simulate_default_capacities_are_those_the_trace_allows(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, *SYNTHETIC, "--json")  # default 2,4,6; the trace has 4 experts
    assert code == 0, err
    assert sorted({r["capacity"] for r in json.loads(out)["rows"]}) == [2, 4]


def test_router_without_predictions_is_footnoted(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    plain = tmp_path / "plain.jsonl"
    write_trace(plain, synthetic_trace(num_layers=2, num_experts=4, tokens=30))
    code, out, _ = cli(capsys, "simulate", plain, "--policies", "lru,router", "--capacity", "2")
    assert code == 0
    assert "no prefetch predictions" in out and "router" in out.splitlines()[-1]
    code, out, _ = cli(capsys, "simulate", plain, "--policies", "lru,router", "--capacity", "2",
                       "--json")
    data = json.loads(out)
    by_policy = {r["policy"]: r for r in data["rows"]}
    assert by_policy["router"]["predictions"] is False and by_policy["lru"]["predictions"] is None
    assert any("router" in note for note in data["notes"])


def test_router_with_predictions_has_no_footnote(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    predicted = tmp_path / "predicted.jsonl"
    write_trace(predicted, synthetic_trace(num_layers=2, num_experts=4, tokens=30,
                                           predict_accuracy=0.8))
    code, out, _ = cli(capsys, "simulate", predicted, "--policies", "lru,router", "--capacity",
                       "2", "--json")
    data = json.loads(out)
    assert code == 0 and data["notes"] == []
    assert {r["policy"]: r["predictions"] for r in data["rows"]} == {"lru": None, "router": True}


def test_modelled_prefetch_without_predictions_is_footnoted(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plain = tmp_path / "plain.jsonl"
    write_trace(plain, synthetic_trace(num_layers=2, num_experts=4, tokens=30))
    code, out, _ = cli(capsys, "simulate", plain, "--policies", "lru", "--capacity", "2",
                       "--prefetch")
    assert code == 0 and "--prefetch" in out.splitlines()[-1]


# ---- token counts are checked by the parser, naming the flag -------------------------------------


@pytest.mark.parametrize("argv", [
    ("generate", *PROMPT, "--max-new-tokens", "0"),
    ("chat", "--max-new-tokens", "0"),
    ("trace", *PROMPT, "-o", "t.jsonl", "--max-new-tokens", "-1"),
])
def test_max_new_tokens_below_one_names_the_flag(capsys: pytest.CaptureFixture[str],
                                                 argv: tuple[str, ...]) -> None:
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == ""
    assert "argument --max-new-tokens: must be >= 1" in err and "Traceback" not in err


def test_bench_new_tokens_below_two_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "bench", "--new-tokens", "1")
    assert code == 2 and "argument --new-tokens: must be >= 2" in err


def test_api_still_names_max_new_tokens() -> None:
    with offload_rt.load(cache_experts=2, prefetch=0) as rt, \
            pytest.raises(OptionError, match="max_new_tokens"):
        rt.generate("hi", max_new_tokens=0)


# ---- the demo is the default model everywhere ----------------------------------------------------


def test_trace_without_model_dir_records_the_demo(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    out = tmp_path / "demo.trace.jsonl"
    code, _, err = cli(capsys, "trace", *PROMPT, "--max-new-tokens", "3", "-o", out)
    assert code == 0, err
    header = read_trace(out).header
    assert header.num_experts == 8 and header.pool == "layer"
    assert header.capacity == DEMO_CACHE_EXPERTS  # the same default cache as generate


def test_load_without_a_path_runs_the_readme_example() -> None:
    rt = offload_rt.load()
    try:
        assert Path(rt.checkpoint.model_dir) == demo_model_dir()
        out = rt.generate("The capital of France is", max_new_tokens=32)
        assert out.text and out.stats["hit_rate"] > 0  # the README shows it
    finally:
        rt.close()


# ---- public errors --------------------------------------------------------------------------------


def test_every_public_error_is_exported() -> None:
    from offload_rt import errors

    assert offload_rt.BusyError is errors.BusyError
    public = {name for name, value in vars(errors).items()
              if isinstance(value, type) and issubclass(value, OffloadError)}
    assert public <= set(offload_rt.__all__)
    for name in public:
        assert getattr(offload_rt, name) is getattr(errors, name)


def test_import_offload_rt_does_not_import_torch() -> None:
    probe = ("import sys, offload_rt; offload_rt.BusyError; offload_rt.OptionError; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
