"""Routing traces: what the router chose, per forward call and layer, in a versioned file.

A trace is everything the cache simulator needs to replay a real run, and no weights: which
experts each token of each forward call routed to, per layer, optionally with the router's
probabilities and the predictions the runtime made for later layers. Pure Python (``json`` and
``gzip``), so traces load without torch. The on-disk format is described in
``docs/trace_format.md``: JSON lines, gzip-compressed when the name ends in ``.gz``; line 1 is the
header object, every further line one ``Record``.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from cache_policies.capacity import Capacity, pool_size
from cache_policies.keys import ExpertKey
from cache_policies.trace_checks import (
    FieldError,
    expert_rows,
    header_problem,
    non_negative,
    order_problem,
    record_object,
)

FORMAT = "offload_rt.trace"
VERSION = 1
RECORDS = "records"  # header key: the number of record lines that follow (a framing count)
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class TraceHeader:
    """What the run was: model shape and the cache settings it ran with (None: unknown/none)."""

    num_layers: int
    num_experts: int
    top_k: int
    model: dict[str, Any] = field(default_factory=dict)  # the model's config, as recorded
    expert_bytes: int | None = None  # one packed expert in the compute dtype
    policy: str | None = None  # the runtime's eviction policy
    capacity: int | None = None  # slots of one device pool (the smallest, when they differ)
    pool: str | None = None  # "layer" (a pool per layer) or "global"
    max_group: int | None = None  # experts the runtime pinned at once (the pool capacity)
    prefetch: int = 0  # layers predicted ahead (0: no predictions recorded)
    precision: int | None = None  # decimals kept in probabilities/weights; None: exact
    prompt_source: str | None = None  # free text: where the prompts came from
    sequences: list[dict[str, Any]] = field(default_factory=list)  # per generate call
    metadata: dict[str, Any] = field(default_factory=dict)  # anything else the recorder adds
    pool_capacities: list[int] | None = None  # each layer's pool when they differ; None: same
    trunk: str = "float"  # the run's trunk format ("int8": --trunk int8); older traces: float
    hybrid: str = "off"  # misses computed on the CPU (--hybrid) in the run; older traces: off


@dataclass(frozen=True)
class Prediction:
    """The runtime's guess, at one layer, of a later ``layer``'s experts (decode steps only)."""

    layer: int
    experts: tuple[int, ...]  # the top-k it would prefetch, most likely first
    probs: tuple[float, ...] = ()  # probabilities over all experts of ``layer``; () = not kept


@dataclass(frozen=True)
class Record:
    """One layer of one forward call (a prefill chunk of T tokens, or a decode token)."""

    step: int  # index of the forward call in the whole trace
    seq: int  # index of the generate call (prompt) it belongs to
    pos: int  # position of the call's first token in its sequence
    layer: int
    experts: tuple[tuple[int, ...], ...]  # [T][K] chosen expert ids, router order
    weights: tuple[tuple[float, ...], ...] = ()  # [T][K] mixing weights; () = not kept
    probs: tuple[tuple[float, ...], ...] = ()  # [T][E] router probabilities; () = not kept
    predicted: tuple[Prediction, ...] = ()  # predictions made at this layer for later ones

    @property
    def num_tokens(self) -> int:
        return len(self.experts)

    def used(self) -> list[int]:
        """The distinct experts the call's tokens use, ascending: what the MoE layer acquires."""
        return [key.expert for key in self._keys]

    @cached_property
    def _keys(self) -> tuple[ExpertKey, ...]:
        experts = self.experts[0] if len(self.experts) == 1 else {
            e for token in self.experts for e in token}
        return tuple(ExpertKey(self.layer, e) for e in sorted(set(experts)))

    def groups(self, max_group: Capacity | None = None) -> list[list[ExpertKey]]:
        """``used()`` as the runtime acquires it: in groups of at most ``max_group`` keys (a
        sequence: ``max_group[layer]``, the size of this record's layer's pool)."""
        keys = self._keys
        if max_group is not None:
            max_group = pool_size(max_group, self.layer)
        if not keys:
            return []
        if not max_group or len(keys) <= max_group:
            return [list(keys)]
        return [list(keys[i:i + max_group]) for i in range(0, len(keys), max_group)]


@dataclass
class Trace:
    """A header and the records in the order the runtime made them."""

    header: TraceHeader
    records: list[Record] = field(default_factory=list)

    def access_steps(self, max_group: Capacity | None = None) -> list[list[ExpertKey]]:
        """The runtime's acquisitions, one simulator step per pinned group.

        For each forward call, layer by layer, the call's distinct experts in ascending order,
        split into groups of at most ``max_group`` (the pool's capacity, or each layer's pool's
        in layer order; None = no split).
        """
        return [group for record in self.records for group in record.groups(max_group)]

    @property
    def num_tokens(self) -> int:
        """Tokens run through the model: the sum of T over forward calls."""
        tokens: dict[int, int] = {}
        for record in self.records:
            tokens.setdefault(record.step, record.num_tokens)
        return sum(tokens.values())

    @property
    def has_predictions(self) -> bool:
        return any(record.predicted for record in self.records)


# ---- writing ------------------------------------------------------------------------------------


def write_trace(path: str | Path, trace: Trace) -> None:
    """Write ``trace`` as JSON lines; gzip-compressed when ``path`` ends in ``.gz``.

    The header's ``records`` key holds the number of record lines, so a reader can tell a
    file cut short (a full disk, an interrupted copy) from a complete one.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as out:  # type: ignore[operator]
        header = {"format": FORMAT, "version": VERSION, **asdict(trace.header),
                  RECORDS: len(trace.records)}
        out.write(_dumps(header) + "\n")
        for record in trace.records:
            out.write(_dumps(_record_json(record)) + "\n")


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _record_json(r: Record) -> dict[str, Any]:
    out: dict[str, Any] = {"step": r.step, "seq": r.seq, "pos": r.pos, "layer": r.layer,
                           "experts": r.experts}
    if r.weights:
        out["weights"] = r.weights
    if r.probs:
        out["probs"] = r.probs
    if r.predicted:
        out["predicted"] = [[p.layer, p.experts, p.probs] if p.probs else [p.layer, p.experts]
                            for p in r.predicted]
    return out


# ---- reading ------------------------------------------------------------------------------------


def read_trace(path: str | Path) -> Trace:
    """Read a trace file (plain or gzip'd, detected from its bytes).

    Raises ``ValueError`` naming the file (and line) when it is not a trace, has a version this
    reader does not know or a header shape no model has, holds a malformed record (see
    ``trace_checks``: fields, ranges, the order of steps and layers), or is cut short: fewer (or
    more) records than its header's ``records`` count (written since that key was added; older
    files are read without the check), or a gzip stream without its end. A file of no records
    reads as an empty ``Trace``.
    """
    path = Path(path)
    lines = _lines(path)
    header, count = _parse_header(path, next(lines, None))
    numbered = [(n, _parse_record(path, n, text, header))
                for n, text in enumerate(lines, start=2) if text.strip()]
    _check_count(path, count, len(numbered))
    records = [record for _, record in numbered]
    for (number, record), previous in zip(numbered, [None, *records]):
        problem = order_problem(record, previous)
        if problem:
            raise ValueError(f"{path}: line {number}: {problem}")
    return Trace(header, records)


def _check_count(path: Path, expected: object, found: int) -> None:
    if expected is None:
        return
    if not isinstance(expected, int) or isinstance(expected, bool) or expected < 0:
        raise ValueError(f"{path}: header field {RECORDS!r} must be a count, got {expected!r}")
    if found != expected:
        what = "truncated (cut short?)" if found < expected else "longer than its header says"
        raise ValueError(f"{path}: {what}: the header counts {expected} records, the file holds "
                         f"{found}; record the trace again")


def _lines(path: Path) -> Iterator[str]:
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
        opener = gzip.open if compressed else open
        with opener(path, "rt", encoding="utf-8") as src:  # type: ignore[operator]
            yield from src
    except EOFError as exc:  # gzip: the stream stops before its end-of-stream marker
        raise ValueError(f"{path}: truncated (cut short?): the gzip stream ends before its "
                         "end marker; record the trace again") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read trace file: {exc}") from exc


def _json_line(path: Path, number: int, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {number} is not valid JSON ({exc})") from exc


def _parse_header(path: Path, text: str | None) -> tuple[TraceHeader, object]:
    """The header of line 1, and its ``records`` count (None: not written)."""
    if text is None:
        raise ValueError(f"{path}: empty file, not an {FORMAT} file")
    obj = _json_line(path, 1, text)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} file (line 1 must be a header object with "
                         f'"format": "{FORMAT}")')
    version = obj.get("version")
    if version != VERSION:
        raise ValueError(f"{path}: {FORMAT} version {version!r} is not supported; this reader "
                         f"understands version {VERSION}")
    known = TraceHeader.__dataclass_fields__
    fields = {k: v for k, v in obj.items() if k in known}
    missing = [k for k in ("num_layers", "num_experts", "top_k") if not isinstance(
        fields.get(k), int)]
    if missing:
        raise ValueError(f"{path}: header lacks integer field(s) {missing}")
    problem = header_problem(fields)
    if problem:
        raise ValueError(f"{path}: {problem}")
    extra = {k: v for k, v in obj.items()
             if k not in known and k not in ("format", "version", RECORDS)}
    if extra:  # keys from a newer writer of the same version: keep them, do not fail
        fields["metadata"] = {**fields.get("metadata", {}), **extra}
    return TraceHeader(**fields), obj.get(RECORDS)


def _parse_record(path: Path, number: int, text: str, header: TraceHeader) -> Record:
    """Line ``number``'s record, its fields checked against the header."""
    obj = _json_line(path, number, text)
    try:
        obj = record_object(obj)
        record = Record(step=non_negative(obj, "step"), seq=non_negative(obj, "seq", 0),
                        pos=non_negative(obj, "pos", 0), layer=non_negative(obj, "layer"),
                        experts=expert_rows(obj, header.top_k, header.num_experts),
                        weights=_rows(obj.get("weights", ()), float),
                        probs=_rows(obj.get("probs", ()), float),
                        predicted=tuple(_prediction(p) for p in obj.get("predicted", ())))
    except FieldError as exc:
        raise ValueError(f"{path}: line {number}: malformed record: {exc}") from exc
    except (TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"{path}: line {number}: malformed record ({exc!r})") from exc
    _check_ranges(path, number, record, header)
    return record


def _rows(rows: Sequence[Sequence[Any]], kind: type) -> tuple[tuple[Any, ...], ...]:
    return tuple(tuple(kind(v) for v in row) for row in rows)


def _prediction(item: Sequence[Any]) -> Prediction:
    probs = tuple(float(p) for p in item[2]) if len(item) > 2 else ()
    return Prediction(int(item[0]), tuple(int(e) for e in item[1]), probs)


def _check_ranges(path: Path, number: int, r: Record, header: TraceHeader) -> None:
    layers, experts = header.num_layers, header.num_experts
    bad = None
    if not 0 <= r.layer < layers:
        bad = f"layer {r.layer} outside num_layers={layers}"
    elif any(not 0 <= p.layer < layers for p in r.predicted):
        bad = f"a predicted layer outside num_layers={layers}"
    elif any(not 0 <= e < experts for p in r.predicted for e in p.experts):
        bad = f"a predicted expert id outside num_experts={experts}"
    if bad:
        raise ValueError(f"{path}: line {number}: {bad}")
