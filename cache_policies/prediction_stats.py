"""How good a trace's recorded router predictions were, per target layer and lookahead.

A record made at layer ``l`` of a forward call may carry predictions for later layers ``t``
(``Prediction``: the experts the prefetcher would load). They are scored against the experts
the same call's tokens then used at layer ``t`` (decode calls: one token):

    precision = |predicted ∩ used| / |predicted|      recall = |predicted ∩ used| / |used|

summed over predictions before dividing (micro-averaged), overall, per target layer and per
lookahead ``t - l``. With as many predicted experts as top_k, precision equals recall.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cache_policies.trace import Trace


@dataclass
class Score:
    """Summed counts of predictions: experts predicted, used, and both."""

    predictions: int = 0
    predicted: int = 0
    used: int = 0
    correct: int = 0

    def add(self, predicted: set[int], used: set[int]) -> None:
        self.predictions += 1
        self.predicted += len(predicted)
        self.used += len(used)
        self.correct += len(predicted & used)

    @property
    def precision(self) -> float | None:
        return self.correct / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.correct / self.used if self.used else None

    def as_dict(self) -> dict[str, object]:
        return {"predictions": self.predictions, "predicted": self.predicted,
                "used": self.used, "correct": self.correct, "precision": self.precision,
                "recall": self.recall}


@dataclass
class PredictionStats:
    """``overall``, ``by_target`` (layer predicted) and ``by_lookahead`` (layers ahead)."""

    overall: Score = field(default_factory=Score)
    by_target: dict[int, Score] = field(default_factory=dict)
    by_lookahead: dict[int, Score] = field(default_factory=dict)
    unmatched: int = 0  # predictions whose target layer the call never reached

    def as_dict(self) -> dict[str, object]:
        return {"overall": self.overall.as_dict(),
                "by_target": {str(k): v.as_dict() for k, v in sorted(self.by_target.items())},
                "by_lookahead": {str(k): v.as_dict()
                                 for k, v in sorted(self.by_lookahead.items())},
                "unmatched": self.unmatched}


def prediction_stats(trace: Trace) -> PredictionStats:
    """Score every recorded prediction against what its call used at the target layer."""
    used = {(r.step, r.layer): {e for token in r.experts for e in token} for r in trace.records}
    stats = PredictionStats()
    for record in trace.records:
        for p in record.predicted:
            actual = used.get((record.step, p.layer))
            if actual is None:
                stats.unmatched += 1
                continue
            predicted = set(p.experts)
            stats.overall.add(predicted, actual)
            stats.by_target.setdefault(p.layer, Score()).add(predicted, actual)
            stats.by_lookahead.setdefault(p.layer - record.layer, Score()).add(predicted,
                                                                                 actual)
    return stats
