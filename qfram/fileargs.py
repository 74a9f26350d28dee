"""The arguments of a QEMUFile, checked once for both twins of the core."""
from __future__ import annotations

from typing import Any, Tuple

from qfram.errors import OptionError


def check(channel: Any, mode: str, iov_max: int, buf_size: int, release_min: int,
          iov_limit: int) -> Tuple[bool, int]:
    """Refuse what neither twin can work with; returns (writable, the channel's fd or
    -1 for a channel with methods instead)."""
    if mode not in ("rb", "wb"):
        # qemu_file_mode_is_not_valid(): exactly "rb" or "wb"
        raise OptionError(f"QEMUFile mode must be 'rb' or 'wb', not {mode!r}")
    if not 1 <= iov_max <= iov_limit:
        raise OptionError(f"iov_max must be between 1 and {iov_limit}, not {iov_max}")
    if buf_size < 64:
        raise OptionError(f"buf_size must be at least 64 bytes, not {buf_size}")
    if release_min < 0:
        raise OptionError("release_min cannot be negative")
    writable = mode == "wb"
    fd = getattr(channel, "fd", -1)
    if isinstance(fd, int) and fd >= 0:
        return writable, fd
    if writable and not callable(getattr(channel, "writev", None)):
        raise TypeError("a writing channel needs an `fd` or a writev(views) method")
    if not writable and not callable(getattr(channel, "readinto", None)):
        raise TypeError("a reading channel needs an `fd` or a readinto(view) method")
    return writable, -1
