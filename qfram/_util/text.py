"""Text for people: sizes they type (``512M``), sizes they read (``1.50 GiB``), and names
from files or peers made safe to print on a terminal."""
from __future__ import annotations

from qfram.errors import OptionError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'4096', '512M', '4G', '1.5G' (binary units; a trailing 'B' or 'iB' is allowed)."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in _UNITS else ""
    number = s[:-1] if unit else s
    try:
        value = float(number)
    except ValueError:
        raise OptionError(f"not a size: {text!r} (try 512M or 4G)") from None
    if value < 0 or value != value:
        raise OptionError(f"a size cannot be negative: {text!r}")
    if value * _UNITS[unit] >= 1 << 63:
        raise OptionError(f"not a size this machine can hold: {text!r}")
    return int(value * _UNITS[unit])


def human(n: float) -> str:
    """Bytes as a person reads them: 512 B, 1.50 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def printable(name: str) -> str:
    """A name as it can be shown on a terminal: control characters (escape sequences
    among them) and other unprintables escaped, the rest as it is."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)
