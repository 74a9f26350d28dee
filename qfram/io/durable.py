"""Giving pages back only once their bytes are durable in a file — and taking them back if
the file never becomes what it was meant to be.

A save with release frees the source's memory as it goes.  "Written" is not "safe" for
a file: the bytes sit in the page cache, and a later ENOSPC, EIO or failed rename would
leave them nowhere.  So pages go in windows (tens of MiB): a window is written, its
writeback started, and once the next one is written too it is fdatasync'd and only then
released.  Should the save fail before its file is committed, :meth:`undo` reads every
released page back from that file; if even that fails, the file is kept under a name of
its own and the error says where.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Callable, List, Optional

from qfram.io import outputs
from qfram import backend
from qfram.errors import ReleaseRollbackError
from qfram.ram import RAMBlock
from qfram.wire import TARGET_PAGE_SIZE

RESCUE_MARK = ".qfram-rescue-"     # a failed save's file kept for the pages in it


@dataclass
class _Released:
    """Pages a save gave back once they were durable in its file, and how to read them
    back from that file (``restore(fd)``) should the save fail before it commits."""

    block: RAMBlock
    first: int
    count: int
    restore: Callable[[int], None]


class DurableRelease:
    """Releases what is durable, remembers it, and puts it back if the save fails.

    Windows are pipelined: when one is written its writeback starts, and the window
    before it — whose writeback had all that time to finish — is fdatasync'd and
    released.  The last one goes in ``finish()``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.done: List[_Released] = []
        self.bytes = 0
        self._waiting: Optional[_Released] = None

    def written(self, fd: int, block: RAMBlock, first: int, count: int,
                restore: Callable[[int], None], offset: int, length: int) -> None:
        """Pages [first, first+count) of ``block`` are written to ``fd``, as the
        ``length`` bytes at ``offset``."""
        if not self.enabled or count == 0:
            return
        backend.impl.start_writeback(fd, offset, length)
        self.finish(fd)
        self._waiting = _Released(block, first, count, restore)

    def finish(self, fd: int) -> None:
        """Make everything written durable and release the window still waiting."""
        entry, self._waiting = self._waiting, None
        if entry is None:
            return
        os.fdatasync(fd)
        self.done.append(entry)
        self.bytes += entry.block.discard(entry.first * TARGET_PAGE_SIZE,
                                          entry.count * TARGET_PAGE_SIZE)

    def undo(self, fd: int, failure: BaseException,
             out: Optional[outputs.NewFile] = None) -> None:
        """Put every released page back from the unfinished file ``fd``; if that fails,
        keep the file (``out``, under a name of its own) and say where."""
        if not self.done:
            return
        try:
            for entry in self.done:
                entry.restore(fd)
        except BaseException as exc:
            kept = out.keep_as(RESCUE_MARK) if out else \
                "the output file"
            pages = sum(e.count for e in self.done)
            raise ReleaseRollbackError(
                errno.EIO, f"{failure}; then {pages} released pages could not be put back "
                           f"({exc}): their bytes are in {kept}") from failure
        self.done.clear()
