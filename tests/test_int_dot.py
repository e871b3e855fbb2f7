"""The int8-dot int4 kernel (``quant.int_dot``, ``native/int_dot.c``): the same bits from the
AVX-512 VNNI path, the portable C path and the torch reference, for every packing, group size,
dtype and row count; close to the float product; clear errors when it cannot be built or used."""

from __future__ import annotations

import itertools
import subprocess
import time
from pathlib import Path

import pytest
import torch

from offload_rt.errors import OptionError
from offload_rt.options import RuntimeOptions
from offload_rt.quant import int4_layout, int_dot, kernels, native
from offload_rt.quant.int4 import dequantize_int4, quantize_int4

SCHEMES = int4_layout.SCHEMES
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _case(scheme: tuple[int, str], group: int, dtype: torch.dtype, rows: int, seed: int = 0,
          n: int = 128, k: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen)
    sz = (torch.randn(k // group, n, 2, generator=gen) * 0.05).to(dtype)
    x = (torch.randn(rows, k, generator=gen) * 3).to(dtype)
    return x, q, int4_layout.pack(q, scheme), sz


@pytest.mark.parametrize(("scheme", "group", "dtype", "rows"),
                         list(itertools.product(SCHEMES, (32, 64, 128, 256), DTYPES, (1, 3))))
def test_every_path_gives_the_references_bits(scheme: tuple[int, str], group: int,
                                               dtype: torch.dtype, rows: int) -> None:
    x, q, w, sz = _case(scheme, group, dtype, rows)
    want = int_dot.int4_reference(x, q, sz, group)
    paths = [p for p in ("best", "portable", "avx2", "vnni") if int_dot.int4_path(scheme, p)]
    for path in paths:
        got = int_dot.int4_dot_mm(x, w, group, sz, scheme, path=path)
        assert got.dtype == dtype
        assert torch.equal(_bits(got), _bits(want)), path


def _cpu_flags() -> tuple[bool, bool]:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    vnni = all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c"))
    return vnni, all(f in flags for f in ("avx2", "f16c"))


def test_the_fastest_path_the_cpu_has_is_taken() -> None:
    """AVX-512 VNNI for torch's AVX-512 packing, AVX2 for it and torch's AVX2 packing, the
    portable loop for the scalar packing and on CPUs with neither."""
    vnni, avx2 = _cpu_flags()
    vector = "avx2" if avx2 else "portable"
    assert int_dot.int4_path((64, "halves")) == ("vnni" if vnni else vector)
    assert int_dot.int4_path((32, "halves")) == vector
    assert int_dot.int4_path((32, "pairs")) == "portable"
    assert int_dot.int4_path((32, "halves"), "vnni") is None
    assert int_dot.int4_path((64, "halves"), "avx2") == ("avx2" if avx2 else None)
    x, _q, w, sz = _case((32, "pairs"), 64, torch.float32, 1)
    with pytest.raises(ValueError, match="no avx2 path"):
        int_dot.int4_dot_mm(x, w, 64, sz, (32, "pairs"), path="avx2")


def test_threads_do_not_change_the_bits() -> None:
    x, _q, w, sz = _case((64, "halves"), 64, torch.bfloat16, 2, n=512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int_dot.int4_dot_mm(x, w, 64, sz, (64, "halves"))
        torch.set_num_threads(2)
        two = int_dot.int4_dot_mm(x, w, 64, sz, (64, "halves"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(_bits(one), _bits(two))


def test_near_the_float_product() -> None:
    """int8 activations cost ~0.5% of the output's scale against the dequantized weights."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(256, 1024, generator=gen)
    q, sz = quantize_int4(w, 64, torch.bfloat16)
    x = torch.randn(4, 1024, generator=gen)
    exact = x @ dequantize_int4(q, sz, 64, torch.float32).t()
    got = int_dot.int4_dot_mm(x, int4_layout.pack(q, (64, "halves")), 64, sz, (64, "halves"))
    err = (got - exact).abs().max() / exact.abs().max()
    assert 0 < err < 0.01


def test_zero_and_non_finite_groups() -> None:
    """An all-zero group contributes nothing; NaN or infinity in a group makes its row NaN."""
    x, q, w, sz = _case((64, "halves"), 64, torch.float32, 3)
    x[0, :64] = 0
    x[1, 70] = float("nan")
    x[2, 5] = float("inf")
    got = int_dot.int4_dot_mm(x, w, 64, sz, (64, "halves"))
    want = int_dot.int4_reference(x, q, sz, 64)
    assert torch.isfinite(got[0]).all() and torch.equal(got[0], want[0])
    assert torch.isnan(got[1]).all() and torch.isnan(got[2]).all()
    assert torch.isnan(want[1]).all() and torch.isnan(want[2]).all()


def test_shapes_it_cannot_take_are_refused() -> None:
    x, _q, w, sz = _case((64, "halves"), 64, torch.float32, 1)
    with pytest.raises(ValueError, match="do not fit"):
        int_dot.int4_dot_mm(x[:, :500], w, 64, sz, (64, "halves"))
    with pytest.raises(TypeError, match="bfloat16/float16/float32"):
        int_dot.int4_dot_mm(x.double(), w, 64, sz, (64, "halves"))


def test_rows_from_which_it_dequantizes() -> None:
    """The int8-dot kernel keeps more rows than torch's before the dequantize + GEMM path."""
    for rows, torch_path, dot_path in ((95, False, False), (96, True, False), (383, True, False),
                                       (384, True, True)):
        x = torch.zeros(rows, 64)
        assert kernels.uses_int4_dequant(x, 128, (64, "halves")) == torch_path
        assert kernels.uses_int4_dequant(x, 128, (64, "halves"), "int8-dot") == dot_path


def test_a_missing_compiler_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_RT_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native.library.cache_clear()
    try:
        with pytest.raises(native.KernelBuildError, match="no-such-cc.*install one") as info:
            native.library("int_dot", "--quant-kernel int8-dot")
        assert isinstance(info.value, OptionError)
        assert "--quant-kernel int8-dot" in str(info.value)
    finally:
        native.library.cache_clear()


def test_a_failing_build_shows_the_compilers_words(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake-cc 1.0 && exit 0\n"
                    "echo 'int_dot.c:1: error: no vectors here' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("OFFLOAD_RT_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fake))
    native.library.cache_clear()
    try:
        with pytest.raises(native.KernelBuildError, match=r"exit 3\):\nint_dot.c:1: error"):
            native.library("int_dot", "--quant-kernel int8-dot")
        assert not list((tmp_path / "cache").glob("*.tmp"))  # no half-written library left
    finally:
        native.library.cache_clear()


def test_the_library_is_built_once_into_the_cache(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_RT_KERNEL_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        native.library("int_dot", "test")
        built = list(tmp_path.glob("int_dot-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        native.library("int_dot", "test")
        assert built[0].stat().st_mtime_ns == stamp
    finally:
        native.library.cache_clear()


def _fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cc: str | None = None) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("OFFLOAD_RT_KERNEL_CACHE", str(cache))
    if cc is not None:
        monkeypatch.setenv("CC", cc)
    native.library.cache_clear()
    return cache


def _script(path: Path, body: str) -> str:
    path.write_bytes(b"#!/bin/sh\n" + body.encode("latin-1"))
    path.chmod(0o755)
    return str(path)


def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (a helper's break test): a truncated library in the cache crashed the process
    with SIGBUS when loaded. Its checksum no longer matches, so it is built again."""
    cache = _fresh_cache(tmp_path, monkeypatch)
    try:
        native.library("int_dot", "test")
        built = next(cache.glob("int_dot-*.so"))
        whole = built.read_bytes()
        built.unlink()  # a new file: this process has the old one mapped (truncating it in
        built.write_bytes(whole[:5000])  # place would SIGBUS the process at exit)
        native.library.cache_clear()
        native.library("int_dot", "test")
        assert built.read_bytes() != whole[:5000] and built.stat().st_size > 5000
        assert built.stat().st_mode & 0o777 == 0o755  # others can load a shared cache's copy
        assert not list(cache.glob("*.tmp*"))
    finally:
        native.library.cache_clear()


def test_compilers_that_misbehave_are_named(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Regressions (a helper's break test): a compiler printing non-UTF-8 bytes gave a
    UnicodeDecodeError, one exiting 0 without output left an empty library in the cache, an
    unbalanced quote in CC a bare ValueError, a blank CC an empty command."""
    silent = _script(tmp_path / "silent", "exit 0\n")
    _fresh_cache(tmp_path, monkeypatch, silent)
    with pytest.raises(native.KernelBuildError, match="silent.*exited 0 but wrote no shared"):
        native.library("int_dot", "test")
    assert not list((tmp_path / "cache").glob("*.so"))
    garbled = _script(tmp_path / "garbled", "printf '\\377\\376 no\\n' >&2; exit 3\n")
    _fresh_cache(tmp_path, monkeypatch, garbled)
    with pytest.raises(native.KernelBuildError, match=r"garbled failed \(exit 3\):\n.* no"):
        native.library("int_dot", "test")
    _fresh_cache(tmp_path, monkeypatch, 'gcc "')
    with pytest.raises(native.KernelBuildError, match="the compiler in CC .*cannot be parsed"):
        native.library("int_dot", "test")
    _fresh_cache(tmp_path, monkeypatch, "   ")  # blank: cc
    try:
        native.library("int_dot", "test")
    finally:
        native.library.cache_clear()


def test_a_hung_compiler_is_stopped_with_its_children(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (a helper's break test): a compiler that never returned left its child
    running after the timeout."""
    marker = tmp_path / "child.pid"
    hung = _script(tmp_path / "hung", f"sleep 60 & echo $! > {marker}; wait\n")
    with pytest.raises(subprocess.TimeoutExpired):
        native._run([hung, "--version"], timeout=1)
    status = Path(f"/proc/{int(marker.read_text())}/status")
    time.sleep(0.2)
    # gone, or dead and waiting for whoever adopted it to reap it
    assert not status.exists() or "State:\tZ" in status.read_text()


def test_the_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OFFLOAD_RT_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored: not absolute
    assert native.cache_dir() == Path.home() / ".cache" / "offload_rt" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.cache_dir() == tmp_path / "offload_rt" / "kernels"
    monkeypatch.setenv("OFFLOAD_RT_KERNEL_CACHE", "~/kc")
    assert native.cache_dir() == Path.home() / "kc"


def test_a_trunk_only_run_builds_the_kernel_at_start_up(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (a helper's break test): float experts with --trunk int8 built the kernel at
    the first forward, so `serve` came up healthy and failed every request."""
    from checkpoint_factory import TinySpec, make_hf_checkpoint

    import offload_rt

    model_dir = make_hf_checkpoint(tmp_path / "m", TinySpec(hidden_size=64, intermediate_size=128))
    _fresh_cache(tmp_path, monkeypatch, str(tmp_path / "no-such-cc"))
    int_dot._lib.cache_clear()
    try:
        with pytest.raises(native.KernelBuildError, match="no-such-cc"):
            offload_rt.load(model_dir, trunk="int8", quant_kernel="int8-dot")
    finally:
        native.library.cache_clear()
        int_dot._lib.cache_clear()


def test_option_values_are_checked() -> None:
    with pytest.raises(OptionError, match="--quant-kernel fast .*torch, int8-dot"):
        RuntimeOptions(quant_kernel="fast")
    assert RuntimeOptions(quant_kernel="int8-dot").quant_kernel == "int8-dot"


def test_a_run_with_nothing_quantized_refuses_it(tmp_path: Path) -> None:
    from checkpoint_factory import TinySpec, make_hf_checkpoint

    import offload_rt
    from offload_rt.model.int8_linear import Int8Linear

    model_dir = make_hf_checkpoint(tmp_path, TinySpec(hidden_size=64, intermediate_size=128))
    with pytest.raises(OptionError, match="--quant-kernel int8-dot computes int8/int4 experts "
                                          "and an int8 trunk, and this run has neither: its "
                                          "experts run as float"):
        offload_rt.load(model_dir, quant_kernel="int8-dot")
    with pytest.raises(OptionError, match="--quant-kernel int8-dot .*is a CPU kernel"):
        offload_rt.load(model_dir, quant_kernel="int8-dot", device="cuda")
    with offload_rt.load(model_dir, quant_kernel="int8-dot", trunk="int8") as rt:
        linears = [m for m in rt.model.modules() if isinstance(m, Int8Linear)]
        assert linears and all(m.kernel == "int8-dot" for m in linears)
        assert rt.expert_format.name == "float"
    with offload_rt.load(model_dir, quant_kernel="int8-dot", experts="int8") as rt:
        assert getattr(rt.expert_format, "kernel", None) == "int8-dot"
    with offload_rt.load(model_dir, quant_kernel="torch", experts="int8", trunk="int8") as rt:
        assert getattr(rt.expert_format, "kernel", None) == "torch"
        assert all(m.kernel == "torch" for m in rt.model.modules() if isinstance(m, Int8Linear))


# ---- int8 weights -----------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "k"), [(64, 1024), (50, 1024), (48, 96), (32, 24), (80, 3584),
                                      (16, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_every_path_gives_the_references_bits(n: int, k: int, dtype: torch.dtype,
                                                   rows: int) -> None:
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    s = (torch.rand(n, generator=gen) * 0.01).to(dtype)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    want = int_dot.int8_reference(x, w, s)
    for path in [p for p in ("best", "portable", "avx2", "vnni") if int_dot.int8_path(k, p)]:
        got = int_dot.int8_dot_mm(x, w, s, path=path)
        assert got.dtype == dtype
        assert torch.equal(_bits(got), _bits(want)), path


def test_int8_groups_and_vector_path() -> None:
    assert [int_dot.int8_group(k) for k in (1024, 3584, 96, 24, 1000, 4096)] == \
        [128, 128, 32, 24, 250, 128]
    vnni, avx2 = _cpu_flags()
    assert int_dot.int8_path(1024) == ("vnni" if vnni else "avx2" if avx2 else "portable")
    assert int_dot.int8_path(24) == "portable"  # groups of 24: the portable loop
    assert int_dot.int8_path(96, "vnni") == ("vnni" if vnni else None)  # groups of 32


def test_int8_near_the_float_product() -> None:
    from offload_rt.quant.int8 import dequantize_int8, quantize_int8

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(256, 1024, generator=gen)
    q, s = quantize_int8(w, torch.bfloat16)
    x = torch.randn(4, 1024, generator=gen)
    exact = x @ dequantize_int8(q, s, torch.float32).t()
    err = (int_dot.int8_dot_mm(x, q, s) - exact).abs().max() / exact.abs().max()
    assert 0 < err < 0.01


def test_int8_rows_from_which_it_dequantizes() -> None:
    for rows, torch_path, dot_path in ((11, False, False), (12, False, True), (24, True, True)):
        x = torch.zeros(rows, 64)
        assert kernels.uses_int8_dequant(x) == torch_path
        assert kernels.uses_int8_dequant(x, "int8-dot") == dot_path
    assert kernels.uses_int8_dequant(torch.zeros(1, 24))  # torch's kernel: K % 16 != 0
    assert not kernels.uses_int8_dequant(torch.zeros(1, 24), "int8-dot")
