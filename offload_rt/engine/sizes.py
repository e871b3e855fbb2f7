"""Human memory sizes ('6GiB', '512MB', 'auto') for budget options."""

from __future__ import annotations

from offload_rt.errors import OptionError

AUTO = "auto"


def parse_size(text: str | int | None, option: str) -> int | None:
    """Bytes for ``text``; None for None or 'auto' (the caller measures what is free).

    accelerate's parser is used because it already knows both decimal (MB, GB) and binary
    (MiB, GiB) units; we only add the option name to its error.
    """
    if text is None:
        return None
    if isinstance(text, int):
        value = text
    elif text.strip().lower() == AUTO:
        return None
    else:
        from accelerate.utils import convert_file_size_to_int  # imports torch: only when needed

        s = text.strip()
        try:
            value = int(s) if s.isdigit() else convert_file_size_to_int(s)
        except ValueError:
            raise OptionError(f"{option}: cannot read size {text!r}; write e.g. 6GiB, 512MB, "
                              "a byte count, or auto") from None
    if value <= 0:
        raise OptionError(f"{option}: size must be positive, got {text!r}")
    return value


def format_size(n: float) -> str:
    """Bytes as a short binary-unit string: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
