"""Where a trace's accesses come from: each generation (sequence) and phase (prefill, decode).

A record belongs to the *prefill* of its sequence when its first token is one of the prompt's
(``pos < prompt_tokens``, from the header's ``sequences``), else to the *decode*. Traces without
prompt lengths (bare steps, old synthetic traces) count a forward call of more than one token as
prefill. Prefill is where traces of one model differ most: a chunk of T tokens acquires the
distinct experts of all T at once (a 90-token prompt in one chunk makes ~41 accesses on the demo
model, at most 8 per layer; in 90 chunks 1,080, 2 per token and layer), so decode figures
compare across chunkings and prefill ones do not.
A segment is a maximal run of records of one sequence and phase; the replays count hits and
misses per segment (``SimResult.segment_hits``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cache_policies.capacity import Capacity
from cache_policies.trace import Record, Trace

PREFILL, DECODE = "prefill", "decode"


@dataclass(frozen=True)
class Segment:
    """A run of consecutive records of one sequence and phase."""

    seq: int
    phase: str  # PREFILL or DECODE
    records: int
    tokens: int  # tokens run through the model (forward calls' T, once per call)


@dataclass(frozen=True)
class SegmentCounts:
    """A segment with a replay's hits and misses in it."""

    seq: int
    phase: str
    tokens: int
    hits: int
    misses: int


def trace_segments(trace: Trace) -> list[Segment]:
    """The trace's segments, in record order."""
    prompts = _prompt_tokens(trace)
    out: list[Segment] = []
    current: tuple[int, str] | None = None
    records = tokens = 0
    seen_steps: set[int] = set()
    for record in trace.records:
        key = (record.seq, _phase(record, prompts))
        if key != current and current is not None:
            out.append(Segment(current[0], current[1], records, tokens))
            records = tokens = 0
        current = key
        records += 1
        if record.step not in seen_steps:
            seen_steps.add(record.step)
            tokens += record.num_tokens
    if current is not None:
        out.append(Segment(current[0], current[1], records, tokens))
    return out


def segment_steps(trace: Trace, segments: Sequence[Segment], max_group: Capacity | None
                  ) -> list[int]:
    """Simulator steps per segment for groups of at most ``max_group`` keys
    (``Trace.access_steps(max_group)`` cut into the segments)."""
    out, start = [], 0
    for segment in segments:
        records = trace.records[start:start + segment.records]
        out.append(sum(len(r.groups(max_group)) for r in records))
        start += segment.records
    return out


def with_counts(segments: Sequence[Segment], hits: Sequence[int],
                misses: Sequence[int]) -> tuple[SegmentCounts, ...]:
    """Segments paired with a replay's per-segment hits and misses (empty if none counted)."""
    if len(hits) != len(segments):
        return ()
    return tuple(SegmentCounts(s.seq, s.phase, s.tokens, h, m)
                 for s, h, m in zip(segments, hits, misses))


def _prompt_tokens(trace: Trace) -> list[int | None]:
    out: list[int | None] = []
    for info in trace.header.sequences:
        value = info.get("prompt_tokens") if isinstance(info, dict) else None
        out.append(value if isinstance(value, int) and not isinstance(value, bool) else None)
    return out


def _phase(record: Record, prompts: list[int | None]) -> str:
    prompt = prompts[record.seq] if 0 <= record.seq < len(prompts) else None
    if prompt is None:
        return PREFILL if record.num_tokens > 1 else DECODE
    return PREFILL if record.pos < prompt else DECODE
