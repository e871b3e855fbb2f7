"""Expert formats in ``decode_bench.py``: which folder and ``load`` options a mode runs, and the
physical limit of each format.

A mode's format is part of its name: ``ort_<setting>`` runs the float (bf16) folder,
``ort_int8_<setting>`` / ``ort_int4_<setting>`` the folders ``offload-rt quantize`` wrote
(``--int8-dir``, ``--int4-dir``: records read from disk), ``ort_int8load_<setting>`` /
``ort_int4load_<setting>`` the float folder quantized as it is read (``experts=``: the disk reads
bf16 bytes, the CPU encodes each load), ``ort_int8dot_<setting>`` / ``ort_int4dot_<setting>``
those folders computed by the int8-dot kernels (``--quant-kernel int8-dot``). ``<setting>`` is ``resident``, ``50_cold``, ``25_cold``,
``50_warm`` or ``25_warm`` (experts cached per layer: all, 4 or 2 of 8 of that format's own
experts; page cache dropped or kept).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FORMATS = ("bf16", "int8", "int4", "int8load", "int4load", "int8dot", "int4dot")
SETTINGS = {"resident": (1.0, "warm"), "50_cold": (0.5, "cold"), "50_warm": (0.5, "warm"),
            "25_cold": (0.25, "cold"), "25_warm": (0.25, "warm")}
PATTERN = re.compile(r"ort_(?:(int8|int4)(load|dot)?_)?(resident|\d+_(?:cold|warm))")
FORMAT_SET = ["ort_resident", "ort_50_cold", "ort_25_cold",
              "ort_int8_resident", "ort_int8_50_cold", "ort_int8_25_cold",
              "ort_int4_resident", "ort_int4_50_cold", "ort_int4_25_cold",
              "ort_int8load_25_cold", "ort_int4load_25_cold"]


def parse(mode: str) -> tuple[str, float, str] | None:
    """``mode`` -> (format, fraction of experts cached, page cache), None if not an ort mode."""
    m = PATTERN.fullmatch(mode)
    if not m or m.group(3) not in SETTINGS:
        return None
    fmt = "bf16" if m.group(1) is None else m.group(1) + (m.group(2) or "")
    return (fmt, *SETTINGS[m.group(3)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--int8-dir", type=Path, help="an int8 folder (offload-rt quantize) of "
                                                      "MODEL_DIR, for ort_int8_* modes")
    parser.add_argument("--int4-dir", type=Path, help="an int4 folder of MODEL_DIR, for "
                                                      "ort_int4_* modes")
    parser.add_argument("--group-size", type=int, default=None,
                        help="ort_int4load_* modes: int4 group size (default: --int4-dir's, "
                             "else 64)")


def source(fmt: str, args: argparse.Namespace) -> tuple[Path, dict]:
    """(folder, load options) of a format."""
    if fmt == "bf16":
        return args.model_dir.resolve(), {}
    if fmt in ("int8", "int4", "int8dot", "int4dot"):
        base = fmt.removesuffix("dot")
        folder = getattr(args, f"{base}_dir")
        if folder is None:
            raise SystemExit(f"ort_{fmt}_* modes need --{base}-dir (offload-rt quantize "
                             f"{args.model_dir} OUT --experts {base})")
        return folder.resolve(), ({"quant_kernel": "int8-dot"} if fmt != base else {})
    name = fmt.removesuffix("load")
    opts: dict = {"experts": name}
    if name == "int4":
        opts["group_size"] = args.group_size or folder_group_size(args.int4_dir) or 64
    return args.model_dir.resolve(), opts


def folder_group_size(folder: Path | None) -> int | None:
    if folder is None:
        return None
    quant = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    return quant.get("experts", {}).get("group_size")


def resident_of(fmt: str) -> str:
    """The resident mode whose step time is ``fmt``'s compute (at load: the same records)."""
    base = fmt.removesuffix("load")
    return "ort_resident" if base == "bf16" else f"ort_{base}_resident"


def read_and_cpu_s(fmt: str, phys: dict, run: dict | None, cache: str) -> tuple[float, float]:
    """(seconds of disk per load, seconds of CPU per load outside the forward) for ``fmt``.

    Cold reads: the faster of the start-of-run measurement (``read_cold_effective_s``, one
    expert of this format's file: a record, or bf16 matrices) and, for records and bf16, the
    disk's busy time per load in this run (the rate drifts); quantizing at load adds the
    encoder's CPU time (``encode_s``) and its in-run busy time counts the encoding too, so it is
    not used. Warm reads: the page-cache copy (``read_warm_s``; at load plus the encoding)."""
    own = phys["formats"][fmt]
    encode = own.get("encode_s") or 0.0
    if cache == "warm":
        return own["read_warm_s"]["median"], encode
    t_read = own["read_cold_effective_s"]
    if run is not None and run.get("disk_busy_s_per_load") and not fmt.endswith("load"):
        t_read = min(t_read, run["disk_busy_s_per_load"])
    return t_read, encode
