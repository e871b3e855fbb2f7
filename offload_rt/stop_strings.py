"""Stop strings at the text level: text that may begin a stop string is held back until the next
text settles it, so a stop string is never emitted, even when it spans tokens."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringFilter:
    """Holds back text that might begin a stop string until the next text settles it.

    Invariant: a stop string never starts inside text already released, because any suffix of
    the buffer that is a prefix of a stop string is kept back.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found). After True, stop."""
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = self._partial_match_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release held text at the end of generation: it never became a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_match_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self._stops), default=1)
        for n in range(min(len(buf), longest - 1), 0, -1):
            if any(s.startswith(buf[-n:]) for s in self._stops):
                return n
        return 0
