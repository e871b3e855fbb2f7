"""Memory of an int8 trunk: the work term covers what its projections allocate (measured with
torch's profiler as ``tests/test_work_memory.py`` does: measured <= estimate <= 2 x measured +
1 MiB), and loading quantizes tensor by tensor, so the float trunk is never whole in memory
(torch's allocations and the process's peak RSS, against the float trunk as control)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint
from test_quant_budget import _quantized_model
from test_rss_budget import RSS_ALLOWANCE, write_big_checkpoint
from test_work_memory import (
    _config,
    _model,
    assert_estimate_bounds,
    assert_generation_within_work,
    peak_allocated,
)

from offload_rt.checkpoint import Checkpoint
from offload_rt.engine import trunk_memory, work_memory
from offload_rt.model import cpu_linear
from offload_rt.model.build import build_trunk, parameter_name
from offload_rt.model.int8_linear import QUANTIZE_BLOCK, quantize_rows, use_int8_linears
from offload_rt.model.transformer import Transformer
from offload_rt.quant.formats import default_scale_dtype
from offload_rt.tensor_names import int8_trunk_shapes, trunk_shapes

MiB = 2**20
WIDE = {"hidden_size": 512, "intermediate_size": 1536, "num_heads": 8, "head_dim": 64}
# small experts, wide attention: the attention phase is the widest, so what the int8
# projections add decides the peak (the float trunk's estimate is below the measured peak here)
ATTENTION = {"hidden_size": 512, "intermediate_size": 64, "num_heads": 16, "num_kv_heads": 16,
             "head_dim": 64}


def int8_trunk(model: Transformer, dtype: torch.dtype) -> Transformer:
    """``model`` with its attention projections and LM head swapped for ``Int8Linear``s holding
    its own weights quantized, as ``build_trunk(trunk="int8")`` builds them."""
    scale = default_scale_dtype(dtype)
    names = [parameter_name(c).removesuffix(".weight") for c in int8_trunk_shapes(model.cfg)]
    floats = {name: model.get_submodule(name) for name in names}
    use_int8_linears(model, names, scale)
    for name, old in floats.items():
        new = model.get_submodule(name)
        new.weight, new.scale = quantize_rows(old.weight, scale)
        new.bias = old.bias
    return model


CASES = {  # name: (config fields, dtype, expert format, tokens, positions attended)
    "bf16-prefill": ({}, torch.bfloat16, None, 512, 512),
    "bf16-decode": ({}, torch.bfloat16, None, 1, 512),
    "float32-prefill": ({}, torch.float32, None, 512, 512),
    "float32-decode": ({"vocab_size": 32000}, torch.float32, None, 1, 64),
    "int4-experts-bf16-prefill": ({}, torch.bfloat16, "int4", 256, 256),
    "wide-bf16-prefill": (WIDE, torch.bfloat16, None, 256, 256),
    "wide-float32-prefill": (WIDE, torch.float32, "int8", 256, 256),
    "attention-float32-24": (ATTENTION, torch.float32, None, 24, 256),
    "attention-bf16-24": (ATTENTION, torch.bfloat16, None, 24, 256),
    "attention-bf16-256": (ATTENTION, torch.bfloat16, None, 256, 256),
}
RUNS = [(name, False) for name in CASES] + [
    (name, True) for name, case in CASES.items() if case[1] == torch.bfloat16 and case[3] > 1]


@pytest.mark.parametrize(("name", "fp32_path"), RUNS,
                         ids=[f"{n}{'-fp32path' if f else ''}" for n, f in RUNS])
def test_forward_peak_bounds_an_int8_trunk(name: str, fp32_path: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill chunks take int8_mm's dequantize path (a bf16 GEMM by oneDNN, or by
    cpu_linear's float32 blocks on CPUs without bf16 instructions), decode rows its kernel."""
    monkeypatch.setattr(cpu_linear, "native_bf16", lambda: not fp32_path)
    fields, dtype, experts, tokens, keys = CASES[name]
    if experts is None:
        model, fmt = _model(_config(**fields), dtype, keys), None
    else:
        model, fmt = _quantized_model(fields, dtype, experts, keys)
    model = int8_trunk(model, dtype)
    ids = torch.randint(0, model.cfg.vocab_size, (tokens,),
                        generator=torch.Generator().manual_seed(1))
    measured = peak_allocated(lambda: model(ids, keys - tokens, last_only=True))
    estimate = work_memory.forward_peak(model.cfg, dtype, tokens, keys, fmt=fmt, trunk="int8")
    assert_estimate_bounds(measured, estimate)


def test_generation_peaks_within_the_work_term() -> None:
    """The demo model offloaded with an int8 trunk, a 40-token prompt in 32-token chunks (the
    dequantize path) then 8 decode steps (the kernel): within ``work``, and close to it."""
    assert_generation_within_work(trunk="int8", prefill_chunk=32, prefetch=0)


LOAD_SPEC = TinySpec(num_layers=8, hidden_size=256, intermediate_size=32, num_heads=8,
                     num_kv_heads=2, num_experts=2, top_k=1, vocab_size=512, seed=8)


def test_a_load_holds_one_float_tensor_at_a_time(tmp_path: Path) -> None:
    """Peak of torch's allocations while ``build_trunk`` runs: the int8 trunk as built, plus
    one float tensor being read (the largest) and one block's quantization temporaries
    (13 bytes a weight: a float32 copy, the scaled and the rounded values, the int8 result),
    well under the float32 trunk, which the float build holds whole (the control): measured
    2.7 MiB against 6.0 MiB."""
    ckpt = Checkpoint.open(make_hf_checkpoint(tmp_path, LOAD_SPEC))
    cfg = ckpt.config
    built = peak_allocated(lambda: build_trunk(ckpt, torch.float32, "cpu", trunk="int8"))
    largest = max(4 * torch.Size(shape).numel() for shape in trunk_shapes(cfg).values())
    block = min(QUANTIZE_BLOCK, max(o * i for o, i in int8_trunk_shapes(cfg).values()))
    estimate = trunk_memory.trunk_bytes(cfg, torch.float32, "int8") + largest + 13 * block
    float_trunk = peak_allocated(lambda: build_trunk(ckpt, torch.float32, "cpu"))
    assert built <= estimate < float_trunk and built < float_trunk / 2, \
        (built, estimate, float_trunk)
    assert float_trunk >= trunk_memory.trunk_bytes(cfg, torch.float32)
    ckpt.close()


RSS_SCRIPT = '''
import json, sys
import torch
from offload_rt.process_memory import peak_rss_bytes, process_baseline_rss

torch.set_num_threads(1)
baseline = process_baseline_rss()
import offload_rt

rt = offload_rt.load(sys.argv[1], trunk=sys.argv[2], offload=False, max_seq_len=64,
                     prefill_chunk=16)
fp = rt.plan.footprint
print(json.dumps({"baseline": baseline, "peak": peak_rss_bytes(),
                  "resident": fp.fixed + 16 * fp.expert, "trunk": fp.trunk}))
'''
# attention-heavy: 8 layers of 1024 x 1024 projections (128 MiB float32, 32 MiB int8), tiny
# experts, so the float trunk is what a load could hold beyond its plan
RSS_SPEC = TinySpec(num_layers=8, hidden_size=1024, intermediate_size=32, num_heads=8,
                    num_kv_heads=8, num_experts=2, top_k=1, vocab_size=512, seed=9)


def _load_rss(tmp_path: Path, model_dir: Path, trunk: str) -> dict[str, int]:
    script = tmp_path / "load_probe.py"
    script.write_text(textwrap.dedent(RSS_SCRIPT))
    proc = subprocess.run([sys.executable, str(script), str(model_dir), trunk],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_rss_of_a_load_stays_within_its_plan(tmp_path: Path) -> None:
    """The process's peak RSS loading an int8 trunk (every expert resident) stays within
    baseline + the plan (trunk, KV cache, work buffers, experts) + the RSS allowance of
    ``test_rss_budget``; the float trunk of the same folder does not fit that bound (control:
    holding the float trunk whole would fail the check)."""
    model_dir = write_big_checkpoint(tmp_path / "attention_heavy", RSS_SPEC)
    int8 = _load_rss(tmp_path, model_dir, "int8")
    bound = int8["baseline"] + int8["resident"] + RSS_ALLOWANCE
    assert int8["peak"] <= bound, (int8["peak"] - bound) / MiB
    plain = _load_rss(tmp_path, model_dir, "float")
    assert plain["peak"] > bound + 32 * MiB, (plain["peak"] - bound) / MiB
    assert plain["trunk"] - int8["trunk"] > 90 * MiB
