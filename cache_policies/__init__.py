"""Expert-cache eviction policies and a trace simulator. Pure Python: never imports torch."""

from cache_policies.keys import ExpertKey

__all__ = ["ExpertKey"]
