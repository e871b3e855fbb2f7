"""The typed key every cache and policy in the project speaks."""

from __future__ import annotations

from typing import NamedTuple


class ExpertKey(NamedTuple):
    """One expert of one MoE layer: ``ExpertKey(layer=3, expert=5)``."""

    layer: int
    expert: int

    def __str__(self) -> str:
        return f"L{self.layer}E{self.expert}"
