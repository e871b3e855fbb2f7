"""A multi-turn chat over a Runtime: history, the model's template, context trimming."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from offload_rt.errors import ContextLengthError

if TYPE_CHECKING:
    from offload_rt.runtime import Runtime


@dataclass
class ChatSession:
    """Keeps the conversation; each ``reply`` streams the assistant's answer.

    When the conversation no longer fits the context with room for ``max_new_tokens``, the
    oldest exchanges are dropped (the system prompt and the new question are kept) and
    ``on_trim(n)`` is called with the number n of user/assistant exchanges dropped, before the
    answer starts (a user interface can say so; the session itself prints nothing).
    An answer stopped by ``runtime.cancel()`` is left out of the history, with its question.
    ``max_new_tokens_source`` says where ``max_new_tokens`` came from ("" = the caller), for
    the error when it leaves no room for a question.
    """

    runtime: Runtime
    system: str | None = None
    max_new_tokens: int = 256
    sampling: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)
    on_trim: Callable[[int], None] | None = None
    max_new_tokens_source: str = ""

    def __post_init__(self) -> None:
        n, context = self.max_new_tokens, self.runtime.max_seq_len
        if n >= context:
            origin = f"{n} is {self.max_new_tokens_source}: " if self.max_new_tokens_source \
                else ""
            raise ContextLengthError(
                f"max_new_tokens {n} leaves no room for a question in the context of {context} "
                f"tokens ({self.runtime.max_seq_len_source}); {origin}pass a smaller one, "
                f"below {context} (--max-new-tokens N; API: max_new_tokens=N)")

    def reset(self) -> None:
        self.history.clear()

    def _messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + turns

    def _fitting(self, question: str) -> list[dict[str, str]]:
        turns = [*self.history, {"role": "user", "content": question}]
        limit = self.runtime.max_seq_len - self.max_new_tokens
        dropped = 0
        while len(self.runtime.encode(messages=self._messages(turns))) > limit:
            if len(turns) <= 1:
                raise ContextLengthError(
                    f"the question alone needs more than {limit} tokens (context "
                    f"{self.runtime.max_seq_len} minus {self.max_new_tokens} for the answer)")
            turns = turns[2:]  # drop the oldest user/assistant exchange
            dropped += 1
        if dropped and self.on_trim is not None:
            self.on_trim(dropped)
        return turns

    def reply(self, question: str) -> Iterator[str]:
        """Stream the answer to ``question``; add the exchange to the history unless the
        answer was cancelled (``finish_reason == "cancelled"``) or the caller stopped early."""
        turns = self._fitting(question)
        pieces: list[str] = []
        for piece in self.runtime.stream(messages=self._messages(turns),
                                         max_new_tokens=self.max_new_tokens, **self.sampling):
            pieces.append(piece)
            yield piece
        result = self.runtime.last_result
        if result is not None and result.finish_reason == "cancelled":
            return
        answer = "".join(pieces).strip()
        self.history = [*turns, {"role": "assistant", "content": answer or " "}]
