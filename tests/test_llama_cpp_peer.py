"""``benchmarks/llama_cpp_peer.py`` end to end without llama.cpp: a stand-in ``llama-bench``
prints llama-bench's JSON, ``offload-rt bench`` runs on a tiny model; every field, ratio and
per-process peak RSS the JSON promises is there. No timing assertions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llama_cpp_peer as peer

# what llama-bench -o json prints (the fields read), for -p 6 -n 4 -r 2; it also records argv
FAKE_BENCH = """#!{python}
import json, sys
open(sys.argv[0] + ".args", "a").write(" ".join(sys.argv[1:]) + "\\n")
test = {{"build_commit": "fake", "model_type": "llama ?B Q4_1", "model_size": 1000}}
print(json.dumps([dict(test, n_prompt=6, n_gen=0, samples_ts=[100.0, 120.0]),
                  dict(test, n_prompt=0, n_gen=4, samples_ts=[40.0, 50.0, 60.0])]))
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("peer")
    model = make_hf_checkpoint(root / "tiny", TinySpec())
    bench = root / "bin" / "llama-bench"
    bench.parent.mkdir()
    bench.write_text(FAKE_BENCH.format(python=sys.executable))
    bench.chmod(0o755)
    gguf = root / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = root / "r.json"
    assert peer.main(["--llama-bin", str(bench.parent), "--threads", "1", "--rounds", "2",
                      "--repeats", "1", "--prompt-tokens", "6", "--new-tokens", "4",
                      "--idle-max-wait", "0", "--llama", f"q4_1={gguf},--mmap-flag,x",
                      "--ort", f"tiny={model},--no-offload", "--out", str(out)]) == 0
    return json.loads(out.read_text()), bench


def test_every_mode_runs_each_round_with_its_figures(result: tuple[dict, Path]) -> None:
    doc, _ = result
    assert [len(doc["runs"][m]) for m in ("q4_1", "tiny")] == [2, 2]
    for runs in doc["runs"].values():
        for run in runs:
            assert run["peak_rss_bytes"] > 0 and run["cpu_s"] >= 0
            assert 0 <= run["others_cpu_fraction"] <= 1
    llama = doc["runs"]["q4_1"][0]
    assert (llama["decode_tokens_per_s"], llama["prompt_tokens_per_s"]) == (50.0, 110.0)
    ours = doc["runs"]["tiny"][0]
    assert ours["prompt_tokens_per_s"] == pytest.approx(6 / ours["time_to_first_token_s"])
    assert len(ours["token_ids"]) == 4 and ours["offloaded"] is False


def test_ratios_are_ours_over_llama_cpp(result: tuple[dict, Path]) -> None:
    doc, _ = result
    modes, ratios = doc["summary"]["modes"], doc["summary"]["ratios_ours_over_llama_cpp"]
    want = modes["tiny"]["decode_tokens_per_s"]["median"] / 50.0
    assert ratios["decode"]["tiny/q4_1"] == round(want, 3)
    assert set(ratios["prompt"]) == {"tiny/q4_1"}


def test_llama_bench_gets_the_shared_settings(result: tuple[dict, Path]) -> None:
    _, bench = result
    calls = Path(str(bench) + ".args").read_text().splitlines()
    assert len(calls) == 2 and calls[0].split()[0] == "-m"
    assert calls[0].split()[2:] == ["-p", "6", "-n", "4", "-t", "1", "-r", "1", "-o", "json",
                                    "-lm", "mmap", "--mmap-flag", "x"]


def test_a_mode_needs_name_and_path(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="NAME=PATH"):
        peer.parse_mode("ort", "tiny")
    with pytest.raises(SystemExit, match="does not exist"):
        peer.parse_mode("ort", f"tiny={tmp_path / 'nope'}")
