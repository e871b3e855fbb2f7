"""Expert-cache eviction policies and a trace simulator. Pure Python: never imports torch."""

from cache_policies.base import CachePolicy
from cache_policies.belady import BeladyPolicy, FutureAccesses
from cache_policies.keys import ExpertKey
from cache_policies.lfu import LFUPolicy
from cache_policies.lrfu import LRFUPolicy
from cache_policies.lru import LRUPolicy
from cache_policies.registry import (
    available_policies,
    make_policy,
    policy_class,
    register_policy,
)
from cache_policies.router import RouterPolicy
from cache_policies.simulator import SimResult, flatten, simulate
from cache_policies.static import StaticPolicy

__all__ = [
    "BeladyPolicy",
    "CachePolicy",
    "ExpertKey",
    "FutureAccesses",
    "LFUPolicy",
    "LRFUPolicy",
    "LRUPolicy",
    "RouterPolicy",
    "SimResult",
    "StaticPolicy",
    "available_policies",
    "flatten",
    "make_policy",
    "policy_class",
    "register_policy",
    "simulate",
]
