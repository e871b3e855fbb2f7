"""Direct (O_DIRECT) expert reads: byte-exact for every offset, length and destination phase,
zero-copy where the slot is placed at the file offset's phase, the page cache untouched, a
clean fallback where the file system refuses O_DIRECT, and errors that name the file."""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import random
import tracemalloc
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint
from page_cache import cached_pages, evict

import offload_rt.direct_io as dio
from cache_policies import ExpertKey
from offload_rt.checkpoint import Checkpoint
from offload_rt.direct_io import ALIGN, read_range
from offload_rt.engine.expert_reader import ExpertReader
from offload_rt.engine.placement import ExpertPlacement
from offload_rt.engine.slots import SlotPool, slot_bytes
from offload_rt.errors import CheckpointError

DATA_LEN = 12 * ALIGN + 777


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("dio") / "data.bin"
    data = random.Random(0).randbytes(DATA_LEN)
    path.write_bytes(data)
    return path, data


@pytest.fixture()
def fresh_refusals(monkeypatch: pytest.MonkeyPatch) -> set[Path]:
    """Each test starts with no file marked as refusing O_DIRECT."""
    refused: set[Path] = set()
    monkeypatch.setattr(dio, "_refused", refused)
    return refused


def _aligned_buffer(nbytes: int) -> tuple[mmap.mmap, int]:
    buf = mmap.mmap(-1, nbytes)  # page-aligned
    return buf, ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _supports_direct(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except (OSError, AttributeError):
        return False


@pytest.mark.parametrize("bounce", [dio.BOUNCE, 3 * ALIGN])  # small: many chunks per read
def test_every_range_and_phase_reads_the_right_bytes(data_file: tuple[Path, bytes],
                                                     fresh_refusals: set[Path], bounce: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dio, "BOUNCE", bounce)
    path, data = data_file
    buf, base = _aligned_buffer(DATA_LEN + 3 * ALIGN)
    rng = random.Random(1)
    cases = [(0, DATA_LEN, 0), (ALIGN, ALIGN, 0), (ALIGN - 1, 2, ALIGN - 1), (5, 0, 5),
             (DATA_LEN - 3, 3, (DATA_LEN - 3) % ALIGN), (17, ALIGN, 17), (ALIGN, 10, 0)]
    for _ in range(400):
        offset = rng.randrange(DATA_LEN)
        length = rng.randrange(min(DATA_LEN - offset, rng.choice([9, 2 * ALIGN, DATA_LEN])) + 1)
        phase = offset % ALIGN if rng.random() < 0.7 else rng.randrange(ALIGN)
        cases.append((offset, length, phase))
    zero_copy = 0
    for offset, length, phase in cases:
        for direct in (True, False):
            view = memoryview(buf)[phase: phase + length]
            view[:] = b"\xee" * length
            zero_copy += read_range(path, offset, view, base + phase, direct=direct)
            assert bytes(view) == data[offset: offset + length], (offset, length, phase, direct)
    assert zero_copy > 0 or not _supports_direct(path)


def test_bodies_land_in_place_and_leave_no_pages(data_file: tuple[Path, bytes],
                                                 fresh_refusals: set[Path]) -> None:
    path, data = data_file
    if not _supports_direct(path):
        pytest.skip("this file system refuses O_DIRECT")
    evict(path)
    if cached_pages(path):
        pytest.skip("this file system keeps its pages: nothing to measure")
    buf, base = _aligned_buffer(DATA_LEN + ALIGN)
    offset, length = 1000, 9 * ALIGN + 123
    view = memoryview(buf)[offset: offset + length]  # the congruent phase
    assert read_range(path, offset, view, base + offset, direct=True)
    assert bytes(view) == data[offset: offset + length]
    misplaced = memoryview(buf)[8: 8 + length]  # not congruent: bounced, still no page cache
    assert not read_range(path, offset, misplaced, base + 8, direct=True)
    assert bytes(misplaced) == data[offset: offset + length]
    assert cached_pages(path) == 0
    read_range(path, offset, view, base + offset, direct=False)  # control: buffered reads cache
    assert cached_pages(path) > 0


def test_a_bounced_read_allocates_no_copy_of_its_chunk(data_file: tuple[Path, bytes],
                                                       fresh_refusals: set[Path]) -> None:
    """CI failure (stop 22): a read that could not land in place sliced the bounce mmap, which
    copied each chunk into a new bytes object, BOUNCE bytes per read in flight that no plan
    counted; under an address-space limit the suggested budget's first expert read then
    failed with MemoryError. The chunk now goes through a memoryview."""
    path, data = data_file
    if not _supports_direct(path):
        pytest.skip("this file system refuses O_DIRECT: nothing is bounced")
    buf, base = _aligned_buffer(DATA_LEN + ALIGN)
    offset, length = 1000, 9 * ALIGN + 123
    misplaced = memoryview(buf)[8: 8 + length]  # not congruent with the offset: bounced
    tracemalloc.start()
    try:
        assert not read_range(path, offset, misplaced, base + 8, direct=True)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bytes(misplaced) == data[offset: offset + length]
    assert peak < ALIGN, peak  # was the chunk: 9 * ALIGN + 123 bytes


def test_refused_o_direct_falls_back_once_with_a_warning(
        data_file: tuple[Path, bytes], fresh_refusals: set[Path],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    path, data = data_file
    real_open = os.open
    direct_opens = [0]

    def no_direct(p: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            direct_opens[0] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_direct)
    buf, base = _aligned_buffer(DATA_LEN + ALIGN)
    for offset in (0, 100, 5000):
        view = memoryview(buf)[offset % ALIGN: offset % ALIGN + 3 * ALIGN]
        assert not read_range(path, offset, view, base + offset % ALIGN, direct=True)
        assert bytes(view) == data[offset: offset + 3 * ALIGN]
    assert direct_opens[0] == 1  # remembered: not retried on every read
    assert fresh_refusals == {path}
    warnings = [r for r in caplog.records if "O_DIRECT refused" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()


@pytest.mark.parametrize("direct", [True, False])
def test_reading_past_the_end_names_the_file(data_file: tuple[Path, bytes], direct: bool,
                                             fresh_refusals: set[Path]) -> None:
    path, _ = data_file
    buf, base = _aligned_buffer(4 * ALIGN)
    view = memoryview(buf)[:3 * ALIGN]
    with pytest.raises(CheckpointError, match=str(path)):
        read_range(path, DATA_LEN - ALIGN, view, base + (DATA_LEN - ALIGN) % ALIGN,
                   direct=direct)


def test_missing_file_names_the_file(tmp_path: Path, fresh_refusals: set[Path]) -> None:
    buf, base = _aligned_buffer(ALIGN)
    gone = tmp_path / "gone.safetensors"
    for direct in (True, False):
        with pytest.raises(CheckpointError, match="gone.safetensors"):
            read_range(gone, 0, memoryview(buf)[:10], base, direct=direct)


# ---- slots ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("numel", "dtype"), [(1000, torch.bfloat16), (3 * 1024, torch.float32),
                                              (7, torch.float16)])
def test_slots_are_aligned_disjoint_and_placeable(numel: int, dtype: torch.dtype) -> None:
    pool = SlotPool(4, numel, dtype, torch.device("cpu"))
    item = torch.empty((), dtype=dtype).element_size()
    assert pool.nbytes == 4 * slot_bytes(numel, item) + ALIGN
    spans = []
    for slot in range(4):
        phase = (slot * 1234 * item) % ALIGN
        view = pool.place(slot, phase)
        assert view.numel() == numel and view.dtype == dtype
        assert view.data_ptr() % ALIGN == phase
        assert pool[slot].data_ptr() == view.data_ptr()  # the placement is remembered
        spans.append((view.data_ptr(), view.data_ptr() + numel * item))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    lo, hi = pool.storage.data_ptr(), pool.storage.data_ptr() + pool.nbytes
    assert lo <= spans[0][0] and spans[-1][1] <= hi
    with pytest.raises(ValueError, match="phase"):
        pool.place(0, ALIGN)
    if item > 1:
        with pytest.raises(ValueError, match="phase"):
            pool.place(0, 1)


# ---- the engine's expert reader ------------------------------------------------------------------

SPECS = {  # bf16 files
    "aligned": TinySpec(num_layers=2, num_experts=4, top_k=2, hidden_size=64,
                        intermediate_size=128, dtype=torch.bfloat16, seed=4),  # 16 KiB matrices
    "odd": TinySpec(num_layers=2, num_experts=4, top_k=2, hidden_size=40, intermediate_size=131,
                    num_heads=4, num_kv_heads=2, head_dim=10, dtype=torch.bfloat16, shards=2,
                    seed=5),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_expert_reader_matches_the_checkpoint(tmp_path: Path, name: str,
                                              fresh_refusals: set[Path]) -> None:
    model_dir = make_hf_checkpoint(tmp_path, SPECS[name])
    ckpt = Checkpoint.open(model_dir)
    cfg = ckpt.config
    direct, buffered = ExpertReader(ckpt, direct=True), ExpertReader(ckpt, direct=False)
    placement = ExpertPlacement(ckpt, torch.bfloat16, torch.device("cpu"))
    pool = SlotPool(3, cfg.expert_numel, torch.bfloat16, torch.device("cpu"))
    wide = SlotPool(1, cfg.expert_numel, torch.float32, torch.device("cpu"))
    for layer in range(cfg.num_layers):
        for e in range(cfg.num_experts):
            key = ExpertKey(layer, e)
            want = torch.empty(cfg.expert_numel, dtype=torch.bfloat16)
            ckpt.read_expert_into(layer, e, want)
            first = ckpt.expert(layer, e).matrices[0]
            phase = placement.read_phase(key)
            assert phase == first.offset % ALIGN
            direct(key, pool.place(0, phase))  # placed: zero copy where it can
            direct(key, pool.place(1, (phase + 2) % ALIGN))  # misplaced: bounced
            buffered(key, pool.place(2, phase))
            for slot in range(3):
                assert torch.equal(pool[slot], want), (key, slot)
            direct(key, wide.place(0, 0))  # file bf16 -> compute fp32: read and converted
            assert torch.equal(wide[0], want.float())
    if _supports_direct(next(model_dir.glob("*.safetensors"))):
        assert direct.direct_matrices > 0
    assert buffered.direct_matrices == 0
