"""The Jinja environment chat templates run in, built as transformers 5 builds it
(``transformers.utils.chat_template_utils._cached_compile_jinja_template``), so a model's
template renders here exactly as ``apply_chat_template`` renders it:

- ``ImmutableSandboxedEnvironment`` (templates come from downloaded folders: no attribute
  tricks, no mutation of the caller's lists), ``trim_blocks`` and ``lstrip_blocks``, the
  ``loopcontrols`` extension (``{% break %}``);
- ``raise_exception(message)``: the template refuses the conversation;
- ``strftime_now(format)``: today's date, for templates that print it;
- ``tojson``: ``json.dumps`` without HTML escaping, non-ASCII kept (``ensure_ascii=False``);
- ``dict(...)`` and ``namespace(...)`` (no underscore-prefixed attributes);
- ``{% generation %}...{% endgeneration %}``: renders its body (transformers uses it to mark
  the assistant's tokens for training masks, which inference does not need).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateRaised(TemplateError):
    """What ``raise_exception(message)`` raises: the template's own refusal."""


def raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
           separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class TemplateDict:
    """``dict(...)`` without the attributes of the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` refusing underscore-prefixed names (CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature: self may be a key
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes on "
                                f"a namespace, got {name!r}")


class GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}body{% endgeneration %}`` renders ``body``."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def make_environment() -> ImmutableSandboxedEnvironment:
    """A fresh environment with transformers' options, filters and globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env
