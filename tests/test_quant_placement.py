"""The placement rule for records (``engine/placement.py``): a record sits at its file offset's
phase modulo ALIGN when that phase is a multiple of 64 (the alignment its typed parts need:
``quant/record.py``), else at phase 0 (read through the bounce buffer), on every path: resident,
cold and warm reads, a substituted plain reader, the CUDA tier layout run on the CPU. Float
experts quantized as they are read land at phase 0 (they are encoded on the way); their float
matrices are read into a scratch buffer placed at the file's phase, so ``O_DIRECT`` still lands
in place. Checked on the addresses, and on the logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoint_factory import (
    TinySpec,
    make_hf_checkpoint,
    make_quantized_checkpoint,
    read_safetensors,
)
from safetensors.torch import save_file
from test_expert_placement import assert_equal_logits, record_addresses, run_calls
from test_quant_exactness import swap_in, two_tier

import offload_rt
from cache_policies import ExpertKey, make_policy
from offload_rt.checkpoint import Checkpoint
from offload_rt.direct_io import ALIGN, direct_supported
from offload_rt.engine.assemble import build_offloaded, disk_reader
from offload_rt.engine.placement import ExpertPlacement
from offload_rt.quant.reader import QuantizingReader
from offload_rt.quant.record import PART_ALIGN

SPEC = TinySpec(num_experts=4, top_k=1, num_layers=2, hidden_size=64, intermediate_size=128,
                num_heads=4, num_kv_heads=2, seed=33)
MAX_SEQ = 48
CPU = torch.device("cpu")
PHASES = (0, 64, 1088, 200, 4040)  # 200 and 4040 are not multiples of 64: placed at 0
PATHS = ("cold", "warm", "plain_reader", "host_tier")


def _offloaded_path(rt: offload_rt.Runtime, path: str) -> None:
    if path == "plain_reader":  # only a callable (no nbytes), as a user or a fault test injects
        real = disk_reader(rt.checkpoint, True, rt.expert_format)
        swap_in(rt, build_offloaded(rt.checkpoint, rt.model, rt.plan, lambda: make_policy("lru"),
                                    dtype=rt.dtype, device=CPU, prefetch_depth=1,
                                    drop_page_cache=True, reader=lambda k, out: real(k, out),
                                    fmt=rt.expert_format))
    elif path == "host_tier":
        swap_in(rt, two_tier(rt, rt.expert_format, SPEC.num_layers, 1, SPEC.top_k + 1, 1))


def check_every_path(model_dir: Path, expected: dict[ExpertKey, set[int]],
                     **options: object) -> None:
    """Resident and every offloaded path hand the kernels each record at ``expected`` phases,
    and give the same logits."""
    with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=MAX_SEQ,
                         **options) as rt:
        resident = record_addresses(rt.experts)
        want = run_calls(rt)
    assert len(resident) > 2 and resident == {k: expected[k] for k in resident}
    for path in PATHS:
        with offload_rt.load(model_dir, dtype="float32", offload=True, cache_experts=1,
                             prefetch=1, drop_page_cache=path != "warm", max_seq_len=MAX_SEQ,
                             **options) as rt:
            _offloaded_path(rt, path)
            seen = record_addresses(rt.experts)
            got = run_calls(rt)
        assert len(seen) > 1 and {k: seen[k] for k in seen} == {k: expected[k] for k in seen}, \
            path
        assert_equal_logits(got, want, f"{path}, records in {options or 'a folder'}")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("phase", PHASES)
def test_records_sit_at_their_file_phase_when_aligned_enough(tmp_path: Path, fmt: str,
                                                            phase: int) -> None:
    model_dir = make_quantized_checkpoint(tmp_path, SPEC, fmt, 32, record_phase=phase)
    ckpt = Checkpoint.open(model_dir)
    placed = phase if phase % PART_ALIGN == 0 else 0
    keys = [ExpertKey(i, e) for i in range(SPEC.num_layers) for e in range(SPEC.num_experts)]
    assert {ckpt.expert(k.layer, k.expert).parts[0].offset % ALIGN for k in keys} == {phase}
    placement = ExpertPlacement(ckpt, torch.uint8, CPU, alignment=PART_ALIGN)
    assert {placement.read_phase(k) for k in keys} == {placed}
    check_every_path(model_dir, {k: {placed} for k in keys})


@pytest.mark.parametrize("shift", [0, 8, 16])
def test_experts_quantized_at_load_sit_at_phase_zero(tmp_path: Path, shift: int) -> None:
    """Encoded on the way, a record's address does not follow the file: phase 0 everywhere."""
    model_dir = make_hf_checkpoint(tmp_path, SPEC)
    if shift:  # shift the float matrices' phases through a longer __metadata__
        path = model_dir / "model.safetensors"
        metadata, tensors = read_safetensors(path)
        save_file(tensors, path, {**(metadata or {}), "pad": "x" * shift})
    keys = [ExpertKey(i, e) for i in range(SPEC.num_layers) for e in range(SPEC.num_experts)]
    for options in ({"experts": "int8"}, {"experts": "int4", "group_size": 32}):
        check_every_path(model_dir, {k: {0} for k in keys}, **options)


def test_the_float_scratch_buffer_sits_at_the_file_phase(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """QuantizingReader reads the float matrices where O_DIRECT lands them in place: the
    scratch buffer's address modulo ALIGN is the first matrix's file phase (odd phases: a
    float32 checkpoint of odd sizes)."""
    spec = TinySpec(num_experts=4, top_k=1, num_layers=2, hidden_size=64, intermediate_size=96,
                    num_heads=4, num_kv_heads=2, seed=34)
    model_dir = make_hf_checkpoint(tmp_path, spec)
    with offload_rt.load(model_dir, dtype="float32", experts="int8", cache_experts=1,
                         prefetch=0, max_seq_len=MAX_SEQ) as rt:
        reader = rt.experts.reader
        assert isinstance(reader, QuantizingReader)
        seen: dict[ExpertKey, int] = {}
        real = reader.float_reader.__call__

        def recording(key: ExpertKey, out: torch.Tensor) -> None:
            seen[key] = out.data_ptr() % ALIGN
            real(key, out)

        monkeypatch.setattr(type(reader.float_reader), "__call__",
                            lambda _self, key, out: recording(key, out))
        rt.generate(list(range(3, 15)), max_new_tokens=4, ignore_eos=True)
        ckpt = rt.checkpoint
    want = {k: ckpt.expert(k.layer, k.expert).parts[0].offset % ALIGN for k in seen}
    assert seen == want and len(set(want.values())) > 1, want
    if direct_supported(next(model_dir.glob("*.safetensors"))):
        assert reader.direct_matrices > 0
