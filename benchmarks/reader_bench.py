"""Cold decode speed of offload_rt under three ways of reading experts from disk, interleaved.

    python benchmarks/reader_bench.py MODEL_DIR [--repeats 6] [--cache-experts 2] [--new-tokens 32]

* ``o_direct``: the engine's reader (``O_DIRECT`` into phase-placed slots: no CPU copy, no page
  cache);
* ``buffered_drop``: buffered reads without readahead, pages dropped after each read (what the
  engine falls back to where the file system refuses ``O_DIRECT``);
* ``buffered_readahead``: buffered reads with the kernel's readahead, each matrix's pages
  dropped after the read (offload_rt's reader before ``O_DIRECT``).

Every run is a fresh runtime (cache_experts per layer, prefetch 1) with the model's files evicted
from the page cache after loading; the modes rotate order each repeat. Prints JSON: decode
tokens/s per run, medians, and each mode's median over ``buffered_readahead``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from physical_limit import drop_page_cache, model_files

MODES = ("o_direct", "buffered_drop", "buffered_readahead")


def _read_with_readahead(ckpt: object, key: object, out: object) -> None:
    """offload_rt's reader before O_DIRECT: per matrix a buffered ``preadv`` (the kernel reads
    ahead past it) into ``out``, then POSIX_FADV_DONTNEED on the matrix's own byte range."""
    from offload_rt.safetensors_file import writable_view

    view, pos = writable_view(out), 0  # type: ignore[arg-type]
    for info in ckpt.expert(key.layer, key.expert).matrices:  # type: ignore[attr-defined]
        fd = os.open(info.path, os.O_RDONLY)
        try:
            done = 0
            while done < info.nbytes:
                n = os.preadv(fd, [view[pos + done: pos + info.nbytes]], info.offset + done)
                if n <= 0:
                    raise EOFError(f"{info.path}: ends inside '{info.name}'")
                done += n
            os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        pos += info.nbytes


def _use(mode: str) -> None:
    import offload_rt.direct_io as dio
    from offload_rt.engine.expert_reader import ExpertReader

    if not hasattr(ExpertReader, "_bench_original"):
        ExpertReader._bench_original = ExpertReader.__call__  # type: ignore[attr-defined]
    call = ExpertReader._bench_original  # type: ignore[attr-defined]

    def readahead_call(self: ExpertReader, key: object, out: object) -> None:
        _read_with_readahead(self.ckpt, key, out)

    dio._HAS_DIRECT = mode == "o_direct"
    ExpertReader.__call__ = readahead_call if mode == "buffered_readahead" else call  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--cache-experts", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    a = p.parse_args(argv)
    import offload_rt

    files = model_files(a.model_dir)
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(a.repeats):
        for mode in MODES[rep % 3:] + MODES[:rep % 3]:
            _use(mode)
            with offload_rt.load(a.model_dir, cache_experts=a.cache_experts, prefetch=1,
                                 offload=True, max_seq_len=a.prompt_tokens + a.new_tokens) as rt:
                drop_page_cache(files)
                prompt = [(i * 7919) % rt.config.vocab_size for i in range(a.prompt_tokens)]
                out = rt.generate(prompt, max_new_tokens=a.new_tokens, ignore_eos=True,
                                  temperature=0.0)
            runs[mode].append(out.stats["decode_tokens_per_s"])
            print(f"[{rep}] {mode}: {runs[mode][-1]:.2f} tok/s", file=sys.stderr, flush=True)
    med = {m: statistics.median(v) for m, v in runs.items()}
    base = med["buffered_readahead"]
    print(json.dumps({"benchmark": "reader", "model_dir": str(a.model_dir),
                      "cache_experts": a.cache_experts, "repeats": a.repeats, "runs": runs,
                      "median_decode_tokens_per_s": med,
                      "ratio_to_buffered_readahead": {m: round(v / base, 3) if base else None
                                                      for m, v in med.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
