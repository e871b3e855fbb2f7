"""Record routing traces from real runs, for the cache simulator (``cache_policies.trace``).

``TracingExperts`` wraps the runtime's ``ExpertProvider``: every call goes to the wrapped one
unchanged (so the run, its cache and its statistics are exactly what they would be), and each
``on_route`` is also written down as a ``Record``: the chosen experts per token, their weights,
the router probabilities, and, on decode steps, the predictions the runtime's prefetcher makes
for later layers. ``record_trace`` does it for a ``Runtime`` and a list of prompts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from cache_policies import ExpertKey
from cache_policies.trace import Prediction, Record, Trace, TraceHeader, write_trace
from offload_rt.engine.offloaded import OffloadedExperts
from offload_rt.engine.prefetch import NextLayerPredictor
from offload_rt.engine.stats import EngineStats
from offload_rt.model.experts import ExpertProvider

log = logging.getLogger(__name__)
DEFAULT_PRECISION = 4  # decimals kept of probabilities and weights
Predictions = tuple[list[ExpertKey], Mapping[ExpertKey, float]]  # (keys to load, all scores)


class TraceRecorder:
    """Accumulates records; ``begin_sequence`` before each generation, ``trace`` at the end.

    ``precision``: decimals kept of probabilities and weights (None: exact float32 values).
    ``probs=False`` leaves out the [T, E] router probabilities, the bulk of a prefill record.
    """

    def __init__(self, header: TraceHeader, *, precision: int | None = DEFAULT_PRECISION,
                 probs: bool = True) -> None:
        self.header = dataclasses.replace(header, precision=precision)
        self.precision, self.keep_probs = precision, probs
        self.records: list[Record] = []
        self.sequences: list[dict[str, Any]] = []
        self._step, self._seq, self._pos, self._tokens = -1, -1, 0, 0
        self._last_layer: int | None = None

    def begin_sequence(self, **info: Any) -> None:
        """A new generation starts (positions restart at 0); ``info`` goes to the header."""
        self._seq += 1
        self._pos, self._last_layer = 0, None
        self.sequences.append(dict(info))

    def add(self, layer: int, probs: torch.Tensor, ids: torch.Tensor,
            predicted: Predictions | None) -> None:
        """One ``on_route``: probs float32 [T, E], ids [T, K]; predictions made at ``layer``."""
        if self._seq < 0:
            self.begin_sequence()
        if self._last_layer is None or layer <= self._last_layer:  # a new forward call
            if self._last_layer is not None:
                self._pos += self._tokens
            self._step += 1
            self._tokens = ids.shape[0]
        self._last_layer = layer
        top = probs.gather(1, ids)  # [T, K], as the router's top-k values
        weights = top / top.sum(dim=-1, keepdim=True)  # the router's renormalisation
        self.records.append(Record(
            step=self._step, seq=self._seq, pos=self._pos, layer=layer,
            experts=tuple(tuple(row) for row in ids.tolist()),
            weights=self._round(weights), probs=self._round(probs) if self.keep_probs else (),
            predicted=self._predictions(predicted)))

    def _round(self, values: torch.Tensor) -> tuple[tuple[float, ...], ...]:
        rows = values.float().tolist()
        if self.precision is None:
            return tuple(tuple(row) for row in rows)
        n = self.precision
        return tuple(tuple(round(v, n) for v in row) for row in rows)

    def _predictions(self, predicted: Predictions | None) -> tuple[Prediction, ...]:
        if predicted is None:
            return ()
        keys, scores = predicted
        out = []
        for layer in dict.fromkeys(k.layer for k in keys):  # nearest layer first
            experts = tuple(k.expert for k in keys if k.layer == layer)
            probs = [scores.get(ExpertKey(layer, e), 0.0) for e in range(self.header.num_experts)]
            kept = tuple(probs if self.precision is None else
                         (round(p, self.precision) for p in probs)) if self.keep_probs else ()
            out.append(Prediction(layer, experts, kept))
        return tuple(out)

    def trace(self) -> Trace:
        return Trace(dataclasses.replace(self.header, sequences=list(self.sequences)),
                     list(self.records))

    def write(self, path: str | Path) -> None:
        write_trace(path, self.trace())


class TracingExperts:
    """An ``ExpertProvider`` that forwards to ``inner`` and records routing into ``recorder``.

    Predictions: taken from ``inner.last_predictions`` when it has that attribute (the
    ``(keys, scores)`` of its latest ``on_route``, or None); otherwise computed here with
    ``predictor``/``depth`` from the hidden state ``observe`` saw, on single-token calls only,
    exactly as ``OffloadedExperts`` does (same predictor, same input: same numbers).
    """

    def __init__(self, inner: ExpertProvider, recorder: TraceRecorder, *,
                 predictor: NextLayerPredictor | None = None, depth: int = 0) -> None:
        self.inner, self.recorder = inner, recorder
        self.predictor, self.depth = predictor, depth
        self._hidden: torch.Tensor | None = None

    def max_group(self, layer: int) -> int:
        return self.inner.max_group(layer)

    def acquire(self, layer: int,
                experts: Sequence[int]) -> AbstractContextManager[Mapping[int, torch.Tensor]]:
        return self.inner.acquire(layer, experts)

    def observe(self, layer: int, hidden: torch.Tensor) -> None:
        self.inner.observe(layer, hidden)
        self._hidden = hidden if hidden.shape[0] == 1 else None

    def on_route(self, layer: int, probs: torch.Tensor, ids: torch.Tensor) -> None:
        self.inner.on_route(layer, probs, ids)
        self.recorder.add(layer, probs, ids, self._predicted(layer))

    def _predicted(self, layer: int) -> Predictions | None:
        if hasattr(self.inner, "last_predictions"):
            return self.inner.last_predictions  # type: ignore[attr-defined, no-any-return]
        if self.predictor is None or self.depth <= 0 or self._hidden is None:
            return None
        return self.predictor.predict(layer, self._hidden, self.depth)


def runtime_header(rt: Any, prompt_source: str | None = None,
                   metadata: Mapping[str, Any] | None = None) -> TraceHeader:
    """The header for a trace of ``rt`` (an ``offload_rt.Runtime``): model and cache settings,
    the trunk format it ran (``--trunk``, resolved: "float" or "int8") and its ``--hybrid``
    mode where misses could run on the CPU ("off" where none could: hybrid off, a CPU run, a
    resident run, or a start-up measurement that never favoured the CPU)."""
    cfg, experts = rt.config, rt.experts
    offloaded = isinstance(experts, OffloadedExperts)
    sizes = [p.capacity for p in experts.device.cache.pools] if offloaded else [0]
    return TraceHeader(
        num_layers=cfg.num_layers, num_experts=cfg.num_experts, top_k=cfg.top_k,
        model={k: list(v) if isinstance(v, tuple) else v  # as JSON reads it back
               for k, v in dataclasses.asdict(cfg).items()},
        expert_bytes=rt.plan.footprint.expert,
        policy=rt.options.policy if offloaded else None,
        capacity=min(sizes) if offloaded else None,
        pool_capacities=sizes if len(set(sizes)) > 1 else None,  # a budget's spare slots
        pool=("layer" if experts.per_layer else "global") if offloaded else None,
        max_group=experts.max_group(0), prefetch=experts.depth if offloaded else 0,
        prompt_source=prompt_source, trunk=rt.options.trunk or "float",
        hybrid=rt.options.hybrid if offloaded and experts.hybrid is not None else "off",
        metadata={"dtype": str(rt.dtype).removeprefix("torch."),
                  "cache_experts": rt.options.cache_experts,
                  "experts": rt.expert_format.spec(),
                  "quant_kernel": rt.options.quant_kernel or "torch", **dict(metadata or {})})


def measured_stats(stats: EngineStats, num_layers: int | None = None) -> dict[str, Any]:
    """The device tier's hits and misses, total and per layer, as a trace header keeps them:
    every layer ``0 .. num_layers - 1`` (when given), 0 where the run counted none, so a layer
    with no hits is listed and not mistaken for a layer the run never reached."""
    layers = sorted(set(stats.layer_hits) | set(stats.layer_misses) |
                    set(range(num_layers or 0)))
    return {"hits": stats.hits, "misses": stats.misses,
            "layer_hits": {str(k): stats.layer_hits.get(k, 0) for k in layers},
            "layer_misses": {str(k): stats.layer_misses.get(k, 0) for k in layers}}


def record_trace(rt: Any, path: str | Path | None, prompts: Sequence[str | Sequence[int]],
                 max_new_tokens: int, metadata: Mapping[str, Any] | None = None, *,
                 prompt_source: str | None = None, precision: int | None = DEFAULT_PRECISION,
                 probs: bool = True, **generate_kwargs: Any) -> Trace:
    """Generate for each prompt with routing traced; write the trace to ``path`` (if given).

    The model is re-attached to a ``TracingExperts`` around ``rt.experts`` for the duration
    (which rebuilds its MoE layers and KV caches) and to ``rt.experts`` again afterwards. The
    runtime's statistics are reset by each ``generate``; the header's ``sequences`` keep each
    generation's device hits and misses (``measured``), which a replay of the trace with the
    same policy and capacity reproduces (prefetch off).
    """
    recorder = TraceRecorder(runtime_header(rt, prompt_source, metadata),
                             precision=precision, probs=probs)
    inner = rt.experts
    offloaded = isinstance(inner, OffloadedExperts)
    tracing = TracingExperts(inner, recorder,
                             predictor=inner.predictor if offloaded else None,
                             depth=inner.depth if offloaded else 0)
    rt.model.attach(tracing, rt.max_seq_len)
    try:
        for prompt in prompts:
            recorder.begin_sequence()
            out = rt.generate(prompt, max_new_tokens=max_new_tokens, **generate_kwargs)
            recorder.sequences[-1].update(prompt_tokens=len(out.prompt_token_ids),
                                          new_tokens=len(out.token_ids),
                                          finish_reason=out.finish_reason)
            if offloaded:  # what the runtime measured, to check a replay against
                recorder.sequences[-1]["measured"] = measured_stats(inner.stats,
                                                                     rt.config.num_layers)
    finally:
        rt.model.attach(inner, rt.max_seq_len)
    trace = recorder.trace()
    if path is not None:
        write_trace(path, trace)
        log.info("wrote %d records (%d tokens) to %s", len(trace.records), trace.num_tokens, path)
    return trace

