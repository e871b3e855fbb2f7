"""Find a policy class by name ("lru") or by dotted path ("mypkg.policies:MyPolicy")."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from cache_policies.base import CachePolicy
from cache_policies.belady import BeladyPolicy
from cache_policies.lfu import LFUPolicy
from cache_policies.lrfu import LRFUPolicy
from cache_policies.lru import LRUPolicy
from cache_policies.router import RouterPolicy
from cache_policies.static import StaticPolicy

_BUILTIN: tuple[type[CachePolicy], ...] = (
    LRUPolicy,
    LFUPolicy,
    LRFUPolicy,
    RouterPolicy,
    StaticPolicy,
    BeladyPolicy,
)
_registry: dict[str, type[CachePolicy]] = {cls.name: cls for cls in _BUILTIN}


def register_policy(cls: type[CachePolicy]) -> type[CachePolicy]:
    """Make ``cls`` available by its ``name``; usable as a class decorator.

    Registering the same class twice is a no-op; taking a name another class holds is an error,
    so a plugin cannot silently replace a built-in policy.
    """
    _check_policy_class(cls, repr(cls))
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty class attribute `name: str`")
    holder = _registry.get(name)
    if holder is not None and holder is not cls:
        raise ValueError(
            f"cache policy name {name!r} is already taken by {holder.__module__}."
            f"{holder.__qualname__}"
        )
    _registry[name] = cls
    return cls


def available_policies() -> list[str]:
    """Registered policy names, sorted."""
    return sorted(_registry)


def make_policy(spec: str, **kwargs: Any) -> CachePolicy:
    """Build a policy from a registered name or a dotted path, passing ``kwargs`` to it.

    Dotted paths: ``"package.module:ClassName"`` or ``"package.module.ClassName"``.
    """
    return policy_class(spec)(**kwargs)


def policy_class(spec: str) -> type[CachePolicy]:
    """Resolve ``spec`` (see ``make_policy``) to a ``CachePolicy`` subclass, or raise ValueError."""
    if spec in _registry:
        return _registry[spec]
    if ":" not in spec and "." not in spec:
        raise ValueError(
            f"unknown cache policy {spec!r}; known policies: {', '.join(available_policies())}; "
            "or give a class by dotted path, e.g. 'mypkg.policies:MyPolicy'"
        )
    module_name, attr_path = _split_dotted(spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"cache policy {spec!r}: cannot import module {module_name!r} ({exc})"
        ) from exc
    obj: Any = module
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as exc:
            raise ValueError(
                f"cache policy {spec!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from exc
    _check_policy_class(obj, repr(spec))
    return obj


def _split_dotted(spec: str) -> tuple[str, str]:
    """'a.b:C' -> ('a.b', 'C'); 'a.b.C' -> ('a.b', 'C')."""
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
    else:
        module_name, _, attr_path = spec.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(
            f"cache policy {spec!r} is not a valid dotted path; expected 'package.module:ClassName'"
        )
    return module_name, attr_path


def _check_policy_class(obj: object, what: str) -> None:
    if not (isinstance(obj, type) and issubclass(obj, CachePolicy)):
        # ValueError, not TypeError: a bad spec string is one kind of error for the caller.
        raise ValueError(  # noqa: TRY004
            f"cache policy {what} is {obj!r}, which is not a CachePolicy subclass"
        )
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        raise ValueError(f"cache policy {what} is abstract: it does not implement {missing}")
