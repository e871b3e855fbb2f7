"""A model's own Jinja chat template, rendered as transformers' ``apply_chat_template`` renders
it (``transformers.utils.chat_template_utils.render_jinja_template``), then encoded.

The template sees ``messages`` (``[{"role": ..., "content": ...}]``), ``tools`` and
``documents`` (None), ``add_generation_prompt``, and the tokenizer's named special tokens as
text (``bos_token``, ``eos_token``...; see ``tokenizer_config``). A conversation that ends with
an assistant message is continued, as transformers' ``continue_final_message=True`` does:
the template renders the message with a marker after it and the text is cut at the marker,
so the model writes on from the message's last character. Otherwise the prompt ends with the
template's generation prompt (``add_generation_prompt=True``).

The rendered text is encoded without the post-processor's tokens (transformers:
``add_special_tokens=False``); special tokens' text in it becomes their ids.

Errors name the template's file: ``OptionError`` when the template refuses the conversation
(``raise_exception``, e.g. roles that do not alternate), ``TokenizerError`` when the template
does not compile or fails in another way (a template bug).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from jinja2 import Template
from jinja2.exceptions import TemplateSyntaxError

from offload_rt.chat_template_env import TemplateRaised, make_environment
from offload_rt.errors import OptionError, TokenizerError

if TYPE_CHECKING:
    from offload_rt.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker, spacing included


class JinjaChatTemplate:
    """One chat template; ``origin`` names where it came from, for messages
    ("/m/tokenizer_config.json (field 'chat_template')", "/m/chat_template.jinja")."""

    def __init__(self, text: str | None, origin: str, variables: Mapping[str, str],
                 problem: str | None = None) -> None:
        """``variables``: the special tokens' text. ``problem``: why no template can be used
        (said at each use); a template that does not compile gets one here too."""
        self.text, self.origin = text, origin
        self.variables = dict(variables)
        self._problem = problem
        self._template: Template | None = None
        if text is not None and problem is None:
            try:
                self._template = make_environment().from_string(text)
            except TemplateSyntaxError as exc:
                self._problem = (f"{origin}: the chat template does not compile (line "
                                 f"{exc.lineno}: {exc.message})")
        if self._problem is not None:
            log.warning("%s; chat prompts will be refused (raw prompts still work)",
                        self._problem)

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool,
               continue_final_message: bool = False) -> str:
        """The template's text for ``messages`` (validated by the caller)."""
        if self._template is None:
            raise TokenizerError(self._problem or f"{self.origin}: no chat template")
        chat = [dict(m) for m in messages]
        final = ""
        if continue_final_message:
            if "content" not in (self.text or ""):
                raise OptionError(f"{self.origin}: the last message is the assistant's, to be "
                                  "continued, but this chat template never reads 'content'")
            final = chat[-1]["content"]
            chat[-1]["content"] = final + _CONTINUE_TAG
        text = self._render(chat, add_generation_prompt)
        return _cut_at_tag(text, final, self.origin) if continue_final_message else text

    def _render(self, chat: list[dict[str, str]], add_generation_prompt: bool) -> str:
        assert self._template is not None
        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.variables)
        except TemplateRaised as exc:
            raise OptionError(f"{self.origin}: the chat template refused these messages: "
                              f"{exc.message}") from None
        except Exception as exc:  # the template is code from the model folder: any failure
            raise TokenizerError(f"{self.origin}: the chat template failed on these messages: "
                                 f"{type(exc).__name__}: {exc}") from exc

    def encode(self, tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Prompt ids: a generation prompt after the messages, or the continued final
        assistant message."""
        continued = messages[-1]["role"] == "assistant"
        text = self.render(messages, add_generation_prompt=not continued,
                           continue_final_message=continued)
        return tokenizer.encode_rendered(text)

    def __repr__(self) -> str:
        return f"JinjaChatTemplate({self.origin!r})"


def _cut_at_tag(text: str, final: str, origin: str) -> str:
    """The rendered text up to the continued message's end (transformers' rule: where the
    template kept the marker's spacing cut just before it, else also strip what it left)."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise OptionError(f"{origin}: the last message is the assistant's, to be continued, but "
                          "the chat template does not show it as written")
    at = text.rindex(tag)
    if text[at: at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()
