"""offload_rt: run Mixture-of-Experts language models with expert weights streamed between tiers.

    import offload_rt
    rt = offload_rt.load("path/to/model", cpu_memory="8GiB", policy="lru", prefetch=1)
    print(rt.generate("The capital of France is", max_new_tokens=16).text)
"""

from offload_rt.errors import OffloadError
from offload_rt.runtime import Output, Runtime, load

__version__ = "0.1.0"
__all__ = ["OffloadError", "Output", "Runtime", "load"]
