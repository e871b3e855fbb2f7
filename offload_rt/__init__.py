"""offload_rt: run Mixture-of-Experts language models with expert weights streamed between tiers."""

__version__ = "0.1.0"
