"""Runtime options: one frozen dataclass shared by the Python API and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
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
EXPERT_FORMATS = ("float", "int8", "int4")  # quant.formats.NAMES (that module imports torch)


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model. Sizes are human strings ('6GiB', '512MB') or 'auto'.

    ``offload``: None = offload only when the experts do not fit the budget, True = always run
    through the expert cache, False = keep every expert resident.

    ``experts``: the experts' format, None = the folder's (float, or a quantized folder's
    records); ``int8``/``int4`` on a float folder quantize each expert as it is read
    (``offload_rt.quant.select``). ``group_size``: int4's group (default 64), with
    ``experts="int4"`` only.

    Options that contradict each other raise ``OptionError`` naming both (``check_combination``);
    a budget of 'auto' means exactly what leaving it out (None) means.
    """

    device: str = "cpu"
    dtype: str | None = None  # None: the checkpoint's dtype
    gpu_memory: str | int | None = None
    cpu_memory: str | int | None = None
    cache_experts: int | None = None  # research knob: device slots per layer
    policy: str = "lru"
    prefetch: int = 1  # layers ahead; 0 = off
    pool: str = "auto"  # "layer": a pool per layer; "global": one shared; "auto": layer if it fits
    max_seq_len: int | None = None  # None: min(model context, 4096)
    prefill_chunk: int = 512
    offload: bool | None = None
    drop_page_cache: bool = True  # expert reads bypass the page cache (see README)
    experts: str | None = None  # None: the folder's format; "float", "int8", "int4"
    group_size: int | None = None  # int4 only; None: 64

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise OptionError(f"--dtype {self.dtype!r}: choose one of {sorted(DTYPES)}")
        if self.pool not in POOLS:
            raise OptionError(f"--pool {self.pool!r}: choose one of {list(POOLS)}")
        if self.prefetch < 0:
            raise OptionError(f"--prefetch must be >= 0, got {self.prefetch}")
        if self.cache_experts is not None and self.cache_experts < 1:
            raise OptionError(f"--cache-experts must be >= 1, got {self.cache_experts}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise OptionError(f"--max-seq-len must be >= 1, got {self.max_seq_len}")
        if self.prefill_chunk < 1:
            raise OptionError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        try:
            policy_class(self.policy)
        except ValueError as exc:
            raise OptionError(f"--policy: {exc}") from exc
        if self.policy == "opt":
            raise OptionError("--policy opt (Belady) needs the future: it runs in the simulator "
                              "(offload-rt simulate), not live")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise OptionError(f"--device {self.device!r}: choose cpu or cuda[:N]")
        if self.experts is not None and self.experts not in EXPERT_FORMATS:
            raise OptionError(f"--experts {self.experts!r}: choose one of "
                              f"{', '.join(EXPERT_FORMATS)}")
        if self.group_size is not None and self.group_size < 1:
            raise OptionError(f"--group-size must be >= 1, got {self.group_size}")
        self.check_combination()

    def check_combination(self) -> None:
        """``OptionError`` for options that would silently override or ignore each other."""
        if self.cache_experts is not None and self.offload is False:
            raise OptionError(
                f"--cache-experts {self.cache_experts} and --no-offload contradict each other "
                f"(cache_experts={self.cache_experts}, offload=False): --cache-experts sizes "
                "the offloaded expert cache, --no-offload keeps every expert resident; "
                "drop one")
        if self.group_size is not None and self.experts != "int4":
            raise OptionError(
                f"--group-size {self.group_size} applies to --experts int4 only (group_size="
                f"{self.group_size}, experts={self.experts!r}): int8 has one scale per output "
                "channel, float none; drop --group-size or add --experts int4")
        if budget_given(self.gpu_memory) and self.device == "cpu":
            raise OptionError(
                f"--gpu-memory {self.gpu_memory} has no effect with --device cpu "
                f"(gpu_memory={self.gpu_memory!r}, device='cpu'): a CPU run has one budget, "
                "--cpu-memory; drop --gpu-memory or use --device cuda")

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


def budget_given(size: str | int | None) -> bool:
    """True for a budget the user sized; False for None and 'auto' (measure what is free)."""
    return size is not None and not (isinstance(size, str) and size.strip().lower() == AUTO)
