"""Runtime options: one frozen dataclass shared by the Python API and the CLI."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from cache_policies import policy_class
from offload_rt.engine.sizes import AUTO
from offload_rt.errors import OptionError

if TYPE_CHECKING:
    import torch

# --dtype spellings -> torch dtype names (torch is imported only when a runtime is built)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
POOLS = ("auto", "layer", "global")
POOL_CHOICE = {"auto": None, "layer": True, "global": False}  # plan_memory's per_layer
EXPERT_FORMATS = ("float", "int8", "int4", "fp8")  # fp8: an fp8 checkpoint's own experts only
QUANT_KERNELS = ("torch", "int8-dot")  # --quant-kernel; quant.formats' use_kernel too
TRUNK_FORMATS = ("float", "int8")  # int8: attention projections and LM head (model.int8_linear)
HYBRID_MODES = ("auto", "off", "always")  # engine.hybrid.MODES (not imported: it needs torch)


# Defaults of the expert-cache options; the fields default to None ("not given") so that a
# value given with offload=False can be refused (it would configure a cache that is not built).
# Prefetch not given: up to DEFAULT_PREFETCH layers ahead, adapting from PREFETCH_FLOOR by how often
# the predictions at each distance come true (engine.prefetch_depth); SCAN_PREFETCH fixed where the
# device holds fewer experts than one token routes to (a deeper guess evicts a nearer need). 2 over
# 1: Mixtral 8x7B 1.08x (8 GiB), 1.13x (automatic budget); 4 over 2 with the automatic budget
# 1.10-1.16x, at 8 GiB 0.91x, on the demo model 0.94x (README "Mixtral 8x7B on a 24 GB, 2-core
# machine", "Deeper prefetch")
DEFAULT_POLICY, DEFAULT_PREFETCH, DEFAULT_POOL, DEFAULT_HYBRID = "lru", 4, "auto", "auto"
PREFETCH_FLOOR = SCAN_PREFETCH = 2
CACHE_OPTIONS = ("policy", "prefetch", "pool", "hybrid")
# The default policy where the device tier holds fewer experts than one token routes to
# (layers x top_k: only a global pool can): LRU keeps none of them to the next token there (a
# cyclic scan), ranking by the router's predictions keeps some, by frequency when prefetch is
# off (no predictions). Evidence: README, "Budgets, worked example".
SCAN_POLICY, SCAN_POLICY_NO_PREDICTIONS = "router", "lfu"
_NO_FLAG = ("prefill_chunk", "drop_page_cache")  # API-only options
_NOT_GIVEN = object()


def option_name(name: str, value: object = _NOT_GIVEN) -> str:
    """How every message names a runtime option, so that it reads for the command line and
    the API alike: the flag, then the ``load()`` keyword in brackets.

    ``option_name("cache_experts")`` -> ``--cache-experts (cache_experts=)``;
    ``option_name("cache_experts", 3)`` -> ``--cache-experts 3 (cache_experts=3)``;
    ``option_name("offload", False)`` -> ``--no-offload (offload=False)``; an option with no
    flag by its keyword alone (``prefill_chunk=512``). A text value after the flag is quoted as
    a shell needs it (``shlex.quote``): ``option_name("hybrid", "")`` -> ``--hybrid ''
    (hybrid='')``.
    """
    keyword = f"{name}=" if value is _NOT_GIVEN else f"{name}={value!r}"
    if name in _NO_FLAG:
        return keyword
    flag = "--" + name.replace("_", "-")
    if name == "offload" and isinstance(value, bool):
        return f"{'--offload' if value else '--no-offload'} ({keyword})"
    if value is _NOT_GIVEN:
        return f"{flag} ({keyword})"
    return f"{flag} {shlex.quote(value) if isinstance(value, str) else value} ({keyword})"


_SIZE = "a size such as '6GiB' or '512MB', a byte count, 'auto' or None"
# option -> (accepted types, None allowed, what to give): checked before any value
_TYPES: dict[str, tuple[tuple[type, ...], bool, str]] = {
    "device": ((str,), False, "a string: cpu, cuda or cuda:N"),
    "dtype": ((str,), True, f"one of {sorted(DTYPES)} or None"),
    "gpu_memory": ((str, int), True, _SIZE),
    "cpu_memory": ((str, int), True, _SIZE),
    "cache_experts": ((int,), True, "an int >= 1 or None"),
    "policy": ((str,), True, "a policy name or 'pkg.module:Class'"),
    "prefetch": ((int,), True, "an int >= 0 (layers ahead; 0 = off)"),
    "pool": ((str,), True, f"one of {list(POOLS)}"),
    "max_seq_len": ((int,), True, "an int >= 1 or None"),
    "prefill_chunk": ((int,), False, "an int >= 1"),
    "offload": ((bool,), True, "True, False or None"),
    "drop_page_cache": ((bool,), False, "True or False"),
    "experts": ((str,), True, f"one of {list(EXPERT_FORMATS)} or None"),
    "group_size": ((int,), True, "an int >= 1 or None"),
    "trunk": ((str,), True, f"one of {list(TRUNK_FORMATS)} or None"),
    "quant_kernel": ((str,), True, f"one of {list(QUANT_KERNELS)} or None"),
    "hybrid": ((str,), True, f"one of {list(HYBRID_MODES)} or None"),
}


def _check_type(name: str, value: object) -> None:
    """OptionError naming ``name`` unless ``value`` has one of its types (a bool is not an
    int here: ``prefetch=True`` is a mistake, not 1)."""
    kinds, nullable, what = _TYPES[name]
    if value is None and nullable:
        return
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise OptionError(f"{option_name(name)} must be {what}, got {value!r} "
                          f"({type(value).__name__})")


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model. Sizes are human strings ('6GiB', '512MB') or 'auto'.

    ``offload``: None = offload only when the experts do not fit the budget, True = always run
    through the expert cache, False = keep every expert resident.

    ``policy``, ``prefetch``, ``pool`` configure the expert cache: None (not given) means
    ``DEFAULT_POLICY`` ('lru'), ``DEFAULT_PREFETCH`` (up to 4 layers ahead, adaptive),
    ``DEFAULT_POOL`` ('auto'), and the constructed options hold those values (``policy_given``
    and ``prefetch_given`` say whether they were given: if not, a runtime replaces the policy
    by its plan's ``default_policy`` and the depth by ``default_prefetch``, and adapts a
    default depth between ``PREFETCH_FLOOR`` and it as the run goes);
    given with ``offload=False`` they are refused, as ``cache_experts`` is (so is
    ``dataclasses.replace(o, offload=False)`` of options that hold them: build new options
    instead).

    ``experts``: the experts' format, None = the folder's (float, or a quantized folder's
    records); ``int8``/``int4`` on a float folder quantize each expert as it is read
    (``offload_rt.quant.select``). ``group_size``: int4's group (default 64), with
    ``experts="int4"`` only.

    ``hybrid`` (a cache option; GPU runs): "auto" computes a missed expert on the CPU when
    the start-up measurement says that beats copying it (``engine.hybrid``), "off" always
    copies (offloaded == resident, bit for bit), "always" computes every miss of at most
    ``engine.hybrid.MAX_HOST_TOKENS`` tokens on the CPU; refused on a CPU run.

    ``trunk``: None = the folder's (float, or the int8 trunk ``offload-rt quantize --trunk
    int8`` stores: ``quant.select.select_trunk``, which refuses "float" with it); "float"
    keeps the trunk in the compute dtype; "int8" quantizes (a float folder's) attention
    projections and the LM head at load (``model.int8_linear``; CPU only: torch has no CUDA
    kernel for int8 weight-only matrix products).

    ``quant_kernel``: how int8/int4 experts and an int8 trunk are multiplied on the CPU for few
    rows: None or "torch" = torch's weight-only kernels (activations in the scale dtype);
    "int8-dot" = offload_rt's (``quant.int_dot``: activations quantized to int8 per group,
    integer dot products; ~2x faster on one thread where AVX-512 VNNI exists, other bits),
    built with the machine's C compiler on first use. Refused on a GPU and for a run with
    nothing quantized (``runtime._check_quant_kernel``).

    Every value is type-checked; a wrong type or value, and options that contradict each
    other, raise ``OptionError`` naming each option as ``option_name`` spells it
    (``_check_combination``); a budget of 'auto' means exactly what leaving it out (None) means.
    """

    device: str = "cpu"
    dtype: str | None = None  # None: the checkpoint's dtype
    gpu_memory: str | int | None = None
    cpu_memory: str | int | None = None
    cache_experts: int | None = None  # research knob: device slots per layer
    policy: str | None = None  # None: DEFAULT_POLICY, or the plan's default_policy
    prefetch: int | None = None  # layers ahead; 0 = off; None: DEFAULT_PREFETCH
    pool: str | None = None  # "layer": per layer; "global": one shared; "auto": layer if it fits
    max_seq_len: int | None = None  # None: min(model context, 4096)
    prefill_chunk: int = 512
    offload: bool | None = None
    drop_page_cache: bool = True  # expert reads bypass the page cache (see README)
    experts: str | None = None  # None: the folder's format; "float", "int8", "int4"
    group_size: int | None = None  # int4 only; None: 64
    trunk: str | None = None  # None: the folder's (float; int8 if stored so); "float", "int8"
    hybrid: str | None = None  # None: DEFAULT_HYBRID; "auto", "off", "always" (engine.hybrid)
    quant_kernel: str | None = None  # None: "torch"; "int8-dot" (quant.int_dot)
    policy_given: bool = field(default=False, init=False, repr=False, compare=False)
    prefetch_given: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _TYPES:
            _check_type(name, getattr(self, name))
        self._check_combination()
        object.__setattr__(self, "policy_given", self.policy is not None)
        object.__setattr__(self, "prefetch_given", self.prefetch is not None)
        defaults = (DEFAULT_POLICY, DEFAULT_PREFETCH, DEFAULT_POOL, DEFAULT_HYBRID)
        for name, default in zip(CACHE_OPTIONS, defaults, strict=True):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        self._check_values()

    def with_chosen(self, **chosen: object) -> RuntimeOptions:
        """A copy with defaults a runtime chose from its plan (``chosen``: policy, prefetch);
        ``policy_given``/``prefetch_given`` stay those of these options (a plain
        ``dataclasses.replace`` would call every filled-in value given)."""
        new = replace(self, **chosen)
        object.__setattr__(new, "policy_given", self.policy_given)
        object.__setattr__(new, "prefetch_given", self.prefetch_given)
        return new

    def _check_values(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise OptionError(f"{option_name('dtype', self.dtype)}: choose one of "
                              f"{sorted(DTYPES)}")
        if self.pool not in POOLS:
            raise OptionError(f"{option_name('pool', self.pool)}: choose one of {list(POOLS)}")
        for name, minimum in (("prefetch", 0), ("cache_experts", 1), ("max_seq_len", 1),
                              ("prefill_chunk", 1), ("group_size", 1)):
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise OptionError(f"{option_name(name)} must be >= {minimum}, got {value}")
        self._check_policy()
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise OptionError(f"{option_name('device', self.device)}: choose cpu or cuda[:N]")
        if self.experts is not None and self.experts not in EXPERT_FORMATS:
            raise OptionError(f"{option_name('experts', self.experts)}: choose one of "
                              f"{', '.join(EXPERT_FORMATS)}")
        if self.hybrid not in HYBRID_MODES:
            raise OptionError(f"{option_name('hybrid', self.hybrid)}: choose one of "
                              f"{', '.join(HYBRID_MODES)}")
        if self.quant_kernel is not None and self.quant_kernel not in QUANT_KERNELS:
            raise OptionError(f"{option_name('quant_kernel', self.quant_kernel)}: choose one of "
                              f"{', '.join(QUANT_KERNELS)}")
        if self.trunk is not None and self.trunk not in TRUNK_FORMATS:
            raise OptionError(f"{option_name('trunk', self.trunk)}: choose one of "
                              f"{', '.join(TRUNK_FORMATS)}")

    def _check_policy(self) -> None:
        try:
            policy_class(self.policy)  # type: ignore[arg-type]  # set by __post_init__
        except ValueError as exc:
            raise OptionError(f"{option_name('policy')}: {exc}") from exc
        if self.policy == "opt":
            raise OptionError(f"{option_name('policy', 'opt')}: Belady's MIN needs the future: "
                              "it runs in the simulator (offload-rt simulate), not live")

    def _check_combination(self) -> None:
        """``OptionError`` for options that would silently override or ignore each other
        (before the cache options' defaults are filled in: only given values count)."""
        for name in ("cache_experts", *CACHE_OPTIONS):
            value = getattr(self, name)
            if value is not None and self.offload is False:
                raise OptionError(
                    f"{option_name(name, value)} and {option_name('offload', False)} "
                    f"contradict each other: {option_name(name)} configures the offloaded "
                    f"expert cache, {option_name('offload', False)} keeps every expert "
                    "resident (there is no cache); drop one")
        if self.group_size is not None and self.experts != "int4":
            raise OptionError(
                f"{option_name('group_size', self.group_size)} applies to --experts int4 only "
                f"(experts={self.experts!r}): int8 has one scale per output channel, float "
                "none; drop --group-size or add --experts int4")
        if self.trunk == "int8" and self.device.startswith("cuda"):
            raise OptionError(
                f"{option_name('trunk', 'int8')} runs on {option_name('device', 'cpu')} only: "
                "torch has no CUDA kernel for int8 weight-only matrix products "
                f"(aten._weight_int8pack_mm: CPU, MPS and XPU); drop --trunk int8 with "
                f"{option_name('device', self.device)}")
        if self.quant_kernel == "int8-dot" and self.device.startswith("cuda"):
            raise OptionError(
                f"{option_name('quant_kernel', 'int8-dot')} is a CPU kernel: it runs on "
                f"{option_name('device', 'cpu')} only (int8 experts on a GPU are dequantized "
                f"for its GEMM; int4 experts and an int8 trunk run on the CPU only); drop "
                f"--quant-kernel with {option_name('device', self.device)}")
        if self.hybrid == "always" and not self.device.startswith("cuda"):
            raise OptionError(
                f"{option_name('hybrid', 'always')} needs {option_name('device', 'cuda')}: it "
                "computes experts that miss the GPU's cache on the CPU, and on a CPU run every "
                "expert already runs where it sits; drop --hybrid")
        if budget_given(self.gpu_memory) and self.device == "cpu":
            raise OptionError(
                f"{option_name('gpu_memory', self.gpu_memory)} has no effect on a CPU run: "
                f"{option_name('device', 'cpu')} is the default, and a CPU run has one "
                f"budget, {option_name('cpu_memory')}; drop --gpu-memory, or add "
                f"{option_name('device', 'cuda')} to use a GPU")

    def torch_device(self) -> torch.device:
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionError(f"--device {self.device}: CUDA is not available in this torch "
                              f"build ({torch.__version__}); use --device cpu or install a "
                              "CUDA build of torch")
        return torch.device(self.device)

    def torch_dtype(self, file_dtype: torch.dtype) -> torch.dtype:
        import torch

        return getattr(torch, DTYPES[self.dtype]) if self.dtype else file_dtype


def default_policy(device_slots: int, token_experts: int, prefetch: int) -> str:
    """The policy of a run that does not name one: ``DEFAULT_POLICY``, or with fewer
    ``device_slots`` than ``token_experts`` (layers x top_k) ``SCAN_POLICY`` when ``prefetch``
    >= 1 records predictions, else ``SCAN_POLICY_NO_PREDICTIONS``."""
    if device_slots >= token_experts:
        return DEFAULT_POLICY
    return SCAN_POLICY if prefetch >= 1 else SCAN_POLICY_NO_PREDICTIONS


def default_prefetch(device_slots: int, token_experts: int) -> int:
    """The prefetch depth (the ceiling of an adaptive one) of a run that does not give one:
    ``DEFAULT_PREFETCH``, or ``SCAN_PREFETCH`` (fixed) with fewer ``device_slots`` than
    ``token_experts`` (layers x top_k)."""
    return DEFAULT_PREFETCH if device_slots >= token_experts else SCAN_PREFETCH


def budget_given(size: str | int | None) -> bool:
    """True for a budget the user sized; False for None and 'auto' (measure what is free)."""
    return size is not None and not (isinstance(size, str) and size.strip().lower() == AUTO)
