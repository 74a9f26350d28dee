"""qfram's own exception types, shared by the Cython core and its pure-Python twin.

I/O failures surface as the standard ``OSError`` subclasses (``BrokenPipeError``,
``ConnectionResetError``, ...) carrying the real errno.  The types here cover what the
operating system cannot name: a stream that ended too early and a stream whose bytes
break the format.  Both derive from :class:`QFramError`, so a caller that loads
untrusted input can catch exactly qfram's complaints and nothing else.
"""
from __future__ import annotations

import errno


class QFramError(Exception):
    """Base class of every error qfram raises on its own account."""


class StreamEnded(QFramError, OSError, EOFError):
    """The stream ended before a read got the bytes it needed.

    It is an ``OSError`` (errno ``EIO``, as QEMU reports it) and an ``EOFError``.
    ``offset`` is the byte offset in the stream where the short read started,
    ``wanted`` how many bytes it asked for and ``got`` how many arrived.
    """

    def __init__(self, offset: int, wanted: int, got: int, what: str = "read") -> None:
        super().__init__(
            errno.EIO,
            f"stream ended at byte {offset + got}: {what} needed {wanted} bytes from byte "
            f"{offset}, got {got}",
        )
        self.offset = offset
        self.wanted = wanted
        self.got = got

    def __reduce__(self):  # keep pickling (multiprocessing) working with our signature
        return (type(self), (self.offset, self.wanted, self.got))


class OptionError(QFramError, ValueError):
    """An option or argument a caller gave cannot be used (a size that is no size, two
    options that exclude each other).  A ``ValueError`` too, for callers that catch
    that."""


class FormatError(QFramError, ValueError):
    """The bytes of a stream or file break its format.

    ``offset`` is the byte offset of the offending record (or field) in the input.
    """

    def __init__(self, message: str, offset: int = -1) -> None:
        where = f" at byte {offset}" if offset >= 0 else ""
        super().__init__(f"{message}{where}")
        self.offset = offset
        self.reason = message

    def __reduce__(self):
        return (type(self), (self.reason, self.offset))


def raised_in(err: int, where: str, exc: BaseException) -> OSError:
    """The sticky error a file keeps when Python code it called (a signal handler, a
    channel, a hook) raised: an OSError naming what happened, caused by ``exc``.  The
    exception itself is raised once, to the caller of the operation."""
    error = OSError(err, f"{where} raised {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class TooLarge(FormatError):
    """A stream or snapshot declares more RAM than there is room for (``force`` lifts the
    limit)."""


class ChecksumError(FormatError):
    """The restored memory is not what was saved."""


class ReleaseRollbackError(QFramError, OSError):
    """A save failed after it had released pages, and they could not be put back: the
    file that holds them was kept, under the name this error gives."""


class LinkError(QFramError, OSError):
    """A migration's connection could not be made, or is not what it must be."""


class TLSError(QFramError, OSError):
    """A TLS handshake or record failed: the peer is not who it must be, or broke TLS."""


class MigrationFailed(QFramError, RuntimeError):
    """A migration ended without every page in place: the reason says why."""


class NoConfirmation(QFramError, RuntimeError):
    """The destination did not confirm the migration (it failed, or never answered)."""


class QMPError(QFramError, RuntimeError):
    """QEMU refused a command, closed the monitor, or answered something unreadable."""


class NoGuest(QFramError, RuntimeError):
    """A test guest's kernel or init cannot be had here (the reason says why)."""


class StoreError(QFramError, OSError):
    """A snapshot store failed, lied or went silent past its bounds (the reason says
    which request, and what came back)."""


class DeadlinePassed(QFramError, TimeoutError):
    """A whole operation (a migration, a restore into QEMU) took longer than its
    deadline: every wait was ended at once, and the reason says what was going on."""
