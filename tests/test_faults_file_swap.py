"""Weight files changed under a running model (issue 18, item 1): a run reads the bytes it
validated at load, or stops with a ``CheckpointError``/``LoaderError`` naming the file.

* replaced by an atomic rename (a re-download, a sync tool), or deleted: never seen; the open
  descriptors keep the validated inode (before: another seed's weights were read silently,
  tokens diverged, exit 0; random bytes gave 0,0,0...).
* overwritten in place (same inode): detected at the next read (size or mtime changed).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint
from fault_injection import run_guarded

import offload_rt
import offload_rt.direct_io as dio
from offload_rt.checkpoint import Checkpoint
from offload_rt.errors import CheckpointError, LoaderError, OffloadError

SPEC = TinySpec(num_experts=8, top_k=2, num_layers=3, seed=51)
OTHER_SEED = TinySpec(num_experts=8, top_k=2, num_layers=3, seed=52)
PROMPT = torch.randint(0, SPEC.vocab_size, (12,),
                       generator=torch.Generator().manual_seed(3)).tolist()
NEW_TOKENS = 24
MAX_SEQ = 64
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("swap_src"), SPEC)


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("swap_other"), OTHER_SEED) / WEIGHTS


@pytest.fixture()
def model_dir(source: Path, tmp_path: Path) -> Path:
    """A fresh copy per test: the tests break it."""
    return Path(shutil.copytree(source, tmp_path / "model"))


def load(model_dir: Path, **options: object) -> offload_rt.Runtime:
    return offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k,
                           max_seq_len=MAX_SEQ, **options)


def tokens(rt: offload_rt.Runtime, **sampling: object) -> list[int]:
    outcome = run_guarded(lambda: rt.generate(PROMPT, max_new_tokens=NEW_TOKENS,
                                              ignore_eos=True, **sampling))
    if outcome.error is not None:
        raise outcome.error
    return outcome.result.token_ids


def replace_by_rename(target: Path, data: bytes) -> None:
    """What a downloader or sync tool does: write a temporary file, rename it over."""
    assert len(data) == target.stat().st_size  # same size: a header check could not tell
    tmp = target.with_suffix(".partial")
    tmp.write_bytes(data)
    os.replace(tmp, target)


SAMPLING = [{}, {"temperature": 0.9, "top_p": 0.95, "seed": 7}]


@pytest.mark.parametrize("drop_page_cache", [True, False], ids=["o_direct", "page_cache"])
@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("replacement", ["other_seed", "random_bytes"])
def test_a_file_renamed_over_the_weights_is_never_read(
        model_dir: Path, other_weights: Path, replacement: str, prefetch: int,
        drop_page_cache: bool) -> None:
    target = model_dir / WEIGHTS
    data = other_weights.read_bytes() if replacement == "other_seed" else \
        random.Random(0).randbytes(target.stat().st_size)
    with load(model_dir, prefetch=prefetch, drop_page_cache=drop_page_cache) as rt:
        before = [tokens(rt, **s) for s in SAMPLING]
        replace_by_rename(target, data)
        assert [tokens(rt, **s) for s in SAMPLING] == before


def test_a_deleted_model_folder_keeps_running(model_dir: Path) -> None:
    with load(model_dir, prefetch=1) as rt:
        before = tokens(rt)
        shutil.rmtree(model_dir)
        assert tokens(rt) == before


def overwrite_experts_in_place(model_dir: Path) -> Path:
    """Random bytes over every expert of layer 0, through the same inode (``r+b``)."""
    ckpt = Checkpoint.open(model_dir)
    path = model_dir / WEIGHTS
    with path.open("r+b") as f:
        for e in range(SPEC.num_experts):
            for info in ckpt.expert(0, e).matrices:
                f.seek(info.offset)
                f.write(random.Random(e).randbytes(info.nbytes))
    ckpt.close()
    return path


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("drop_page_cache", [True, False], ids=["o_direct", "page_cache"])
def test_a_file_overwritten_in_place_stops_the_run_naming_it(
        model_dir: Path, prefetch: int, drop_page_cache: bool) -> None:
    with load(model_dir, prefetch=prefetch, drop_page_cache=drop_page_cache) as rt:
        tokens(rt)
        path = overwrite_experts_in_place(model_dir)
        for _ in range(2):  # and it keeps refusing: no later call reads the new bytes
            with pytest.raises(LoaderError, match="changed since it was loaded") as info:
                tokens(rt)
            assert str(path) in str(info.value)
            assert isinstance(info.value.__cause__, CheckpointError)


def test_a_file_truncated_in_place_stops_the_run_naming_it(model_dir: Path) -> None:
    with load(model_dir, prefetch=0) as rt:
        tokens(rt)
        path = model_dir / WEIGHTS
        os.truncate(path, path.stat().st_size // 2)
        with pytest.raises(LoaderError, match="changed since it was loaded") as info:
            tokens(rt)
        assert str(path) in str(info.value) and "bytes" in str(info.value)


def open_descriptors(folder: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


def test_one_descriptor_per_shard_closed_by_close(tmp_path: Path) -> None:
    sharded = make_hf_checkpoint(tmp_path / "sharded", TinySpec(shards=3, seed=5))
    rt = offload_rt.load(sharded, dtype="float32", cache_experts=2, prefetch=1)
    assert sorted(open_descriptors(sharded)) == sorted(
        str(p) for p in sharded.glob("*.safetensors"))
    rt.generate([1, 2, 3], max_new_tokens=4)  # expert reads add an O_DIRECT one per file read
    assert 3 <= len(open_descriptors(sharded)) <= 6
    rt.close()
    assert open_descriptors(sharded) == []
    with pytest.raises(OffloadError, match="closed"):
        rt.checkpoint.read("norm")


def test_without_proc_a_renamed_file_is_refused_by_inode(
        model_dir: Path, other_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /proc is missing, the O_DIRECT descriptor is opened by path and must be the
    inode validated at load; a replaced file is an error naming it, never read."""
    real_open = os.open

    def no_proc(path: object, flags: int, *args: object) -> int:
        if str(path).startswith("/proc/self/fd/"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_proc)
    monkeypatch.setattr(dio, "_refused", set())
    with load(model_dir, prefetch=0, drop_page_cache=True) as rt:  # no expert read yet
        replace_by_rename(model_dir / WEIGHTS, other_weights.read_bytes())
        with pytest.raises(LoaderError, match="replaced by another file since it was loaded"):
            tokens(rt)


def test_refused_o_direct_still_reads_the_validated_inode(
        model_dir: Path, other_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    with load(model_dir, prefetch=1, drop_page_cache=True) as rt:
        before = tokens(rt)
    monkeypatch.setattr(os, "open", no_direct)
    monkeypatch.setattr(dio, "_refused", set())
    with load(model_dir, prefetch=1, drop_page_cache=True) as rt:
        replace_by_rename(model_dir / WEIGHTS, other_weights.read_bytes())
        assert tokens(rt) == before
        assert dio._refused == {model_dir / WEIGHTS}


def test_running_out_of_descriptors_says_which_limit(model_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Descriptors stay open for the run now: running out of them names the limit to raise."""
    def no_more_files(path: object, flags: int, *args: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files", str(path))

    monkeypatch.setattr(os, "open", no_more_files)
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*ulimit -n"):
        Checkpoint.open(model_dir)


def test_a_reopen_that_is_not_permitted_reads_the_open_file(
        model_dir: Path, other_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permissions changed since load (or a locked-down /proc): expert reads fall back to the
    descriptor opened at load, still the validated inode, never the path."""
    with load(model_dir, prefetch=1, drop_page_cache=True) as rt:
        before = tokens(rt)
    real_open = os.open

    def denied(path: object, flags: int, *args: object) -> int:
        if str(path).startswith("/proc/self/fd/"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(dio, "_refused", set())
    with load(model_dir, prefetch=1, drop_page_cache=True) as rt:
        monkeypatch.setattr(os, "open", denied)  # after load: only reopens are refused
        replace_by_rename(model_dir / WEIGHTS, other_weights.read_bytes())
        assert tokens(rt) == before
