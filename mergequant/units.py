"""Human-readable byte sizes: parse "500MB"/"2GB"/"1.5GiB" and format byte counts."""

import re

from mergequant.errors import MergeQuantError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """Parse a size like ``5GB`` (decimal, as the Hub and transformers use), ``512MiB`` or ``1000``.

    >>> parse_size("500MB")
    500000000
    """
    if isinstance(text, bool):
        raise MergeQuantError(f"cannot parse size {text!r}: use e.g. 500MB, 2GB, 5GB or 1GiB")
    if isinstance(text, int):  # a number of bytes (release files): as positive as a parsed one
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise MergeQuantError(f"cannot parse size {text!r}: use e.g. 500MB, 2GB, 5GB or 1GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise MergeQuantError(f"size must be positive, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """Format a byte count with binary units, e.g. ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
