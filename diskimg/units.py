"""Byte counts for people: "1.5 GiB" out, "4M" / "4MiB" / "65536" in (binary units)."""
from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human(n: float, *, exact: bool = False) -> str:
    """1536 -> "1.5 KiB".  With `exact`, a whole number of units drops its ".0" ("4 KiB", as
    the used-block scanner describes sizes that are exact multiples)."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            if unit == "B" or (exact and n == int(n)):
                return f"{n:.0f} {unit}"
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """'1M', '4MiB', '65536', '64k' -> bytes.  Raises ValueError."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(t[-1:], 1)
    try:
        return int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise ValueError(f"invalid size {text!r} (use e.g. 1M, 4MiB, 65536)") from None


_DURATIONS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """'30m', '1h', '7d', '2w', '90s', '3600' -> seconds.  Raises ValueError."""
    t = text.strip().lower()
    mult = _DURATIONS.get(t[-1:], None)
    try:
        n = int(t[:-1] if mult else t)
    except ValueError:
        raise ValueError(f"invalid duration {text!r} (use e.g. 90s, 30m, 1h, 7d, 2w)") from None
    if n <= 0:
        raise ValueError(f"invalid duration {text!r}: must be positive")
    return n * (mult or 1)
