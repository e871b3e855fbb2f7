"""Markdown tables of a ``decode_bench.py`` result (``--table``): modes, then limits."""

from __future__ import annotations


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def modes_table(doc: dict) -> str:
    """One row per mode: medians (min-max of decode tok/s in brackets)."""
    s, lim = doc["summary"], doc["summary"].get("limits", {})
    rows = [("| mode | decode tok/s (min-max) | x ort resident | first token s | peak RSS GiB | "
             "MB from disk / token | hit rate | stall | achieved / limit | others' CPU |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, t in s["modes"].items():
        d, gib = t["decode_tokens_per_s"], t["peak_rss_bytes"]["median"] / 2**30
        disk = t.get("disk_read_bytes_per_token", {}).get("median")
        hit, stall = t.get("hit_rate", {}).get("median"), t.get("stall_fraction", {}).get("median")
        ratio = lim.get(mode, {}).get("achieved_over_limit")
        rows.append(f"| {mode} | {d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f}) | "
                    f"{s.get('ratio_to_ort_resident', {}).get(mode, float('nan')):.2f} | "
                    f"{t['time_to_first_token_s']['median']:.2f} | {gib:.2f} | "
                    f"{_cell(None if disk is None else disk / 1e6, '.0f')} | "
                    f"{_cell(hit, '.2f')} | {_cell(stall, '.2f')} | {_cell(ratio, '.2f')} | "
                    f"{t['others_cpu_fraction']['median']:.0%} |")
    return "\n".join(rows)


def limits_table(doc: dict) -> str:
    """One row per offloaded mode with a limit: what bounds it and how close the run came."""
    lim = doc["summary"].get("limits", {})
    rows = [("| setting | format | loads / token | read ms / load | step ms (resident) | "
             "limit tok/s | serial tok/s | achieved | achieved / limit (per run) | bound by |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, m in lim.items():
        if not isinstance(m, dict):
            continue
        runs = ", ".join(f"{v:.2f}" for v in m["achieved_over_limit_runs"])
        read = m["read_s"] * 1e3
        cpu = m.get("cpu_per_load_s") or 0.0
        read_text = f"{read:.1f}" + (f" + {cpu * 1e3:.1f} encode" if cpu else "")
        rows.append(f"| {mode} | {m.get('format', 'bf16')} | {m['required_loads_per_token']:.1f} "
                    f"| {read_text} | {m.get('t_res_s', lim.get('t_res_s', 0)) * 1e3:.1f} | "
                    f"{m['limit_tokens_per_s']:.2f} | {m['serial_tokens_per_s']:.2f} | "
                    f"{m['achieved_tokens_per_s']:.2f} | {m['achieved_over_limit']:.2f} ({runs}) "
                    f"| {m['bound_by']} |")
    return "\n".join(rows)


def markdown_table(doc: dict) -> str:
    """The README's performance tables from a result document, and its ratios."""
    comparisons = doc["summary"].get("comparisons", {})
    ratios = "\n".join(f"* {k}: {v:.2f}" for k, v in comparisons.items())
    return "\n\n".join(t for t in (modes_table(doc), limits_table(doc), ratios) if t)
