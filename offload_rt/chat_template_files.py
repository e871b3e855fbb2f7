"""Where a Hugging Face folder keeps its chat template, found as transformers 5 finds it:

1. ``chat_template.jinja`` (and named ones in ``additional_chat_templates/NAME.jinja``), the
   files newer folders ship; when any exists they replace the template of
2. ``tokenizer_config.json``'s ``chat_template``: one template (a string), or named templates
   (a list of ``{"name": ..., "template": ...}``).

Of named templates the one called ``default`` is used (transformers picks ``tool_use`` only
when tools are passed, which offload_rt never does). A folder with none of these has no
template: the built-in Mixtral-Instruct one (``chat_template.py``) is used instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from offload_rt.chat_template_jinja import JinjaChatTemplate
from offload_rt.errors import TokenizerError
from offload_rt.tokenizer_config import TokenizerSettings

TEMPLATE_FILE = "chat_template.jinja"
NAMED_TEMPLATE_DIR = "additional_chat_templates"
DEFAULT_NAME = "default"


def find_chat_template(model_dir: Path, settings: TokenizerSettings,
                       variables: Mapping[str, str]) -> JinjaChatTemplate | None:
    """The folder's chat template with the tokenizer's special tokens as ``variables``, or
    None when it has none. Files that cannot be read are TokenizerErrors naming them; a
    ``chat_template`` field of the wrong JSON type is, like a template that does not compile,
    a warning at load and an error at each chat prompt (raw prompts still run)."""
    templates = _template_files(Path(model_dir))
    if not templates:
        try:
            templates = _config_templates(settings)
        except TokenizerError as exc:
            return JinjaChatTemplate(None, f"{settings.path} (field 'chat_template')",
                                     variables, problem=str(exc))
    if not templates:
        return None
    if DEFAULT_NAME in templates:
        text, origin = templates[DEFAULT_NAME]
        return JinjaChatTemplate(text, origin, variables)
    names = ", ".join(sorted(templates))
    origin = next(iter(templates.values()))[1]
    return JinjaChatTemplate(None, origin, variables, problem=(
        f"{origin}: the folder has named chat templates ({names}) but none called "
        f"'{DEFAULT_NAME}', the one transformers uses without tools"))


def _template_files(model_dir: Path) -> dict[str, tuple[str, str]]:
    """name -> (text, file) of chat_template.jinja ("default") and the named .jinja files."""
    found: dict[str, tuple[str, str]] = {}
    main = model_dir / TEMPLATE_FILE
    if main.is_file():
        found[DEFAULT_NAME] = (_read(main), str(main))
    named_dir = model_dir / NAMED_TEMPLATE_DIR
    if named_dir.is_dir():
        for path in sorted(named_dir.glob("*.jinja")):
            found[path.name.removesuffix(".jinja")] = (_read(path), str(path))
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read the chat template: {exc}") from exc


def _config_templates(settings: TokenizerSettings) -> dict[str, tuple[str, str]]:
    """name -> (text, origin) of tokenizer_config.json's chat_template field."""
    value: Any = settings.data.get("chat_template")
    if value is None:
        return {}
    origin = f"{settings.path} (field 'chat_template')"
    if isinstance(value, str):
        return {DEFAULT_NAME: (value, origin)}
    if isinstance(value, list) and all(
            isinstance(t, Mapping) and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: (t["template"], f"{origin[:-1]}, template '{t['name']}')")
                for t in value}
    if isinstance(value, Mapping) and value and all(
            isinstance(k, str) and isinstance(t, str) for k, t in value.items()):
        # name -> template, the form transformers holds the list in (and accepts in the file)
        return {k: (t, f"{origin[:-1]}, template '{k}')") for k, t in value.items()}
    raise TokenizerError(f"{settings.where('chat_template')} must be a template (a string), "
                         "a list of {\"name\": ..., \"template\": ...} objects or a "
                         "{\"name\": template} object")
