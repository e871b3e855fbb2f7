"""``AdaptiveDepth``: how many layers ahead to prefetch, from how often the router's predictions
came true at each distance during this run.

A prediction for layer l+j is made at layer l from the hidden state entering l's MoE; the
further ahead, the less often its top-k are the experts layer l+j then routes to. Reading a
wrong guess costs a read (and a slot) that a nearer need may have wanted, so prefetching deeper
pays only while the predictions stay right. Measured (README "Mixtral 8x7B on a 24 GB, 2-core
machine", "Deeper prefetch"): on Mixtral 8x7B's shape with the automatic budget 4 layers ahead
decode 1.10-1.16x faster than 2; on the demo model (right at distances 1..4: 0.76, 0.65, 0.61,
0.54) 4 is 0.94x and reads 20% more.

The rule: prefetch ``floor`` layers ahead; go one layer deeper while the share of predicted
experts used at that distance (precision, over a decaying window) is at least ``threshold``,
up to ``ceiling``. A distance is judged only once ``warmup`` predicted experts were checked at
it. Predictions are checked at every decode step's layers whatever the current depth (the
predictor computes all ``ceiling`` layers: one gate per layer, cheap), so a depth can rise and
fall as the run goes. Only single-token (decode) steps are counted. The depth never changes
what is computed: prefetch only moves bytes earlier.
"""

from __future__ import annotations

from collections.abc import Iterable

from cache_policies import ExpertKey

THRESHOLD = 0.8  # demo model: 0.65 at distance 2 -> stays at 2; Mixtral's shape, small: >= 0.81
WARMUP = 64  # predicted experts checked at a distance before it is judged
WINDOW = 1024  # counts are halved past this many: recent steps weigh most


class AdaptiveDepth:
    """Precision per prediction distance and the depth it allows (see the module docstring).
    Not thread-safe: the engine calls it from the compute thread only."""

    def __init__(self, floor: int, ceiling: int, threshold: float = THRESHOLD,
                 warmup: int = WARMUP, window: int = WINDOW) -> None:
        if not 1 <= floor <= ceiling:
            raise ValueError(f"need 1 <= floor <= ceiling, got {floor}, {ceiling}")
        self.floor, self.ceiling = floor, ceiling
        self.threshold, self.warmup, self.window = threshold, warmup, window
        self.right = [0.0] * (ceiling + 1)  # index: distance
        self.checked = [0.0] * (ceiling + 1)
        self._pending: dict[int, dict[int, frozenset[int]]] = {}  # layer -> distance -> experts
        self.depth = floor

    def precision(self, distance: int) -> float | None:
        """Share of the experts predicted ``distance`` layers ahead that their layer used; None
        before ``warmup`` were checked."""
        checked = self.checked[distance]
        return self.right[distance] / checked if checked >= self.warmup else None

    def routed(self, layer: int, used: Iterable[int]) -> None:
        """Layer ``layer`` of a decode step routed to ``used``: check what was predicted for it."""
        used = frozenset(used)
        for distance, predicted in self._pending.pop(layer, {}).items():
            self.right[distance] += len(predicted & used)
            self.checked[distance] += len(predicted)
            if self.checked[distance] > self.window:
                self.right[distance] /= 2
                self.checked[distance] /= 2
        self._update()

    def predicted(self, layer: int, keys: Iterable[ExpertKey]) -> None:
        """The predictions made at ``layer`` (for layers layer+1 .. layer+ceiling)."""
        by_layer: dict[int, set[int]] = {}
        for key in keys:
            by_layer.setdefault(key.layer, set()).add(key.expert)
        for target, experts in by_layer.items():
            self._pending.setdefault(target, {})[target - layer] = frozenset(experts)

    def forget_step(self) -> None:
        """A step ended early (an error) or a new one begins at layer 0: predictions for layers
        that will not route in this step are dropped unchecked."""
        self._pending.clear()

    def _update(self) -> None:
        depth = self.floor
        while depth < self.ceiling:
            p = self.precision(depth + 1)
            if p is None or p < self.threshold:
                break
            depth += 1
        self.depth = depth

    def within(self, layer: int, keys: Iterable[ExpertKey]) -> list[ExpertKey]:
        """``keys`` (predicted at ``layer``) no further ahead than the current depth."""
        return [k for k in keys if k.layer - layer <= self.depth]
