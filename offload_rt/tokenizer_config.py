"""A Hugging Face folder's tokenizer settings: ``tokenizer_config.json`` (optional), read as
transformers 5 reads it (``PreTrainedTokenizerBase.from_pretrained``).

- Named special tokens: ``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``, ``sep_token``,
  ``cls_token``, ``mask_token`` and any other ``*_token`` key a model adds (``image_token``...).
  Each is a string, an AddedToken object (``{"content": "<s>", ...}``) or null (none). They are
  the chat template's variables (``bos_token``...) and give the BOS/EOS ids of a tokenizer.json.
- ``special_tokens_map.json`` overrides them only when tokenizer_config.json has no
  ``added_tokens_decoder`` (transformers' legacy path; folders it saved have both).
- ``additional_special_tokens`` / ``extra_special_tokens``: more special tokens (no text).
- ``split_special_tokens``: special tokens' text in a prompt stays plain text.
- ``clean_up_tokenization_spaces``: transformers 5 ignores it for BPE models (every tokenizer
  offload_rt has met); for other models it edits decoded text (" ." -> "."), which offload_rt
  does not do, so it is refused there by name.
- ``add_bos_token`` / ``add_eos_token`` are ignored with a tokenizer.json, as transformers
  ignores them: its ``post_processor`` says what a raw prompt starts with.
- ``chat_template``: read by ``chat_template_files``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offload_rt.config import read_json
from offload_rt.errors import TokenizerError

FILE = "tokenizer_config.json"
LEGACY_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")
_EXTRA_LISTS = ("additional_special_tokens", "extra_special_tokens")


@dataclass(frozen=True)
class TokenizerSettings:
    """What ``tokenizer_config.json`` says about tokens (empty when the folder has none).

    ``special_tokens``: name -> text of each named special token that is set.
    ``extra_special_tokens``: the other special tokens' text.
    """

    path: Path | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    extra_special_tokens: tuple[str, ...] = ()
    split_special_tokens: bool = False
    clean_up_tokenization_spaces: bool = False
    clean_up_bpe: bool = False  # transformers' ..._for_bpe_even_though_it_will_corrupt_output

    def where(self, name: str) -> str:
        """"field 'name' in /m/tokenizer_config.json", for messages."""
        return f"field '{name}' in {self.path}"


def read_tokenizer_settings(model_dir: Path) -> TokenizerSettings:
    """The folder's tokenizer_config.json (and legacy special_tokens_map.json) read and
    checked; CheckpointError/TokenizerError name the file and field of a malformed value."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return TokenizerSettings()
    data = read_json(path)
    named = _named_tokens(data, path)
    legacy = Path(model_dir) / LEGACY_SPECIAL_TOKENS_FILE
    if "added_tokens_decoder" not in data and legacy.is_file():
        named.update(_named_tokens(read_json(legacy), legacy))
    extra: list[str] = []
    for key in _EXTRA_LISTS:
        extra += _token_list(data.get(key), path, key)
    cleanup_bpe = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    return TokenizerSettings(
        path=path, data=data,
        special_tokens={k: v for k, v in named.items() if v is not None},
        extra_special_tokens=tuple(dict.fromkeys(extra)),
        split_special_tokens=_flag(data, "split_special_tokens", path),
        clean_up_tokenization_spaces=_flag(data, "clean_up_tokenization_spaces", path),
        clean_up_bpe=_flag(data, cleanup_bpe, path))


def _named_tokens(data: Mapping[str, Any], path: Path) -> dict[str, str | None]:
    """NAMED_TOKENS and the model's own ``*_token`` keys whose value is a token."""
    out: dict[str, str | None] = {}
    for key, value in data.items():
        own = key.endswith("_token") and isinstance(value, (str, Mapping))
        if key in NAMED_TOKENS or own:
            out[key] = _token_text(value, path, key)
    return out


def _token_text(value: Any, path: Path, key: str) -> str | None:
    """A token given as text, as an AddedToken object, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise TokenizerError(f"{path}: field '{key}' must be a token (a string or an object with "
                         f"a string 'content'), got {json.dumps(value)[:80]}")


def _token_list(value: Any, path: Path, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, Mapping):  # extra_special_tokens as {name: token}
        value = list(value.values())
    if not isinstance(value, list):
        raise TokenizerError(f"{path}: field '{key}' must be a list of tokens, got "
                             f"{json.dumps(value)[:80]}")
    texts = [_token_text(item, path, key) for item in value]
    return [t for t in texts if t is not None]


def _flag(data: Mapping[str, Any], key: str, path: Path) -> bool:
    value = data.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise TokenizerError(f"{path}: field '{key}' must be true or false, got {value!r}")
    return value
