"""Compare eviction policies on a trace: the research kit's entry points in one place.

* ``replay`` (``cache_policies.replay``): one policy at one pool size, exactly as the runtime's
  expert cache would, optionally with recorded predictions and modelled prefetch.
* ``compare`` (``cache_policies.compare``): every policy at every pool size, each against
  ``opt`` (Belady's MIN, the demand-paging optimum) or, with prefetch, ``opt+prefetch``
  (``cache_policies.prefetch_reference``); per-sequence and per-phase counts, bootstrap
  intervals; LRU and opt from one-pass curves (``cache_policies.miss_curve``).
* ``format_table``, ``rows_json``, ``notes`` (``cache_policies.sim_output``): the report.
"""

from __future__ import annotations

from cache_policies.compare import DEFAULT_POLICIES, _steps_trace, compare
from cache_policies.replay import (
    ReplayResult,
    _Replayer,
    _uses_predictions,
    prediction_scores,
    replay,
)
from cache_policies.rows import PoolSize, Row
from cache_policies.sim_output import format_table, notes, rows_json

__all__ = [
    "DEFAULT_POLICIES",
    "PoolSize",
    "ReplayResult",
    "Row",
    "_Replayer",
    "_steps_trace",
    "_uses_predictions",
    "compare",
    "format_table",
    "notes",
    "prediction_scores",
    "replay",
    "rows_json",
]
