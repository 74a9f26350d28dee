"""Dirty-only reset: RAM restored from a snapshot, and returned to it again and again by
undoing only the pages written since (what fuzzers and sandbox pools do by hand).

:class:`Resettable` maps each block of a mapped snapshot copy-on-write
(``MAP_PRIVATE``): nothing is read until touched, a written page becomes the process's
own anonymous copy, an untouched or only read one stays the page cache's.  So the
written pages need no tracking of their own: they are the pages of the mapping that
are present (or swapped) and not the file's, which one PAGEMAP_SCAN finds
(``_uffd.PrivateCopies``).  ``reset()`` hands them back with ``MADV_DONTNEED``, many
ranges per ``process_madvise`` call: the private copies go, and the next touch sees the
file's bytes again — no copy, no write fault ever slowed down, and the scan walks only
the page tables that exist.  (Write protection, uffd-wp async, would find the same
pages but keeps a marker in every page-table entry of the mapping: each scan would then
walk all of them, ~0.5 ms a GiB here, however few pages were written.)

The snapshot is held with a shared lock for as long as it is mapped: an incremental
save would change what unwritten pages show.  Pages the bitmap calls absent read as
zero: holes in the file, or zero memory mapped over the stale bytes QEMU can leave there
(``snapshot.map_block_private``); a write to one is a private copy like any other.
"""
from __future__ import annotations

import os
import time
from typing import List

from qfram import snapshot
from qfram._util.closing import Closing
from qfram._uffd import PrivateCopies
from qfram.results import ResetStats
from qfram.errors import FormatError
from qfram.ram import RAMBlock, RAMList, memory_room
from qfram.errors import TooLarge


class Resettable(Closing):
    """The RAM of the mapped snapshot at ``path``, usable at once (``ram``); ``reset()``
    returns it to the snapshot.  ``force``: map it even when it declares more RAM than
    the machine has available."""

    def __init__(self, path: str, *, force: bool = False) -> None:
        self.path = path
        self._fd = snapshot.open_locked(path)
        self._trackers: List[PrivateCopies] = []
        self._maps: list = []          # what map_block_private mapped (released on close)
        self.ram = RAMList()
        try:
            self.info = snapshot.inspect_fd(path, self._fd)
            if self.info.layout != "mapped":
                raise FormatError(f"{path}: a dirty-only reset needs the mapped layout "
                                  f"(pages at fixed offsets); `qfram rewrite {path} OUT "
                                  f"--layout mapped` makes one", 0)
            room, where = memory_room()
            if not force and self.info.ram_bytes > room:
                raise TooLarge(f"{path} declares {self.info.ram_bytes / 2**30:.2f} GiB of "
                               f"RAM, more than {where}; --force to map it anyway", 0)
            for b in self.info.blocks:   # (inspect checked every offset against the file)
                region = snapshot.map_block_private(self._fd, b, self.info)
                self._maps.append(region)
                block = self.ram.add(RAMBlock(b.name, region, kind="snapshot-private"))
                self._trackers.append(PrivateCopies(block.region))
        except BaseException:
            self.close()
            raise
        self.resets = 0

    def reset(self) -> ResetStats:
        """Undo every write since the restore (or the last reset)."""
        t0 = time.perf_counter()
        pages = runs = 0
        for tracker in self._trackers:
            p, r = tracker.revert_written()
            pages += p
            runs += r
        self.resets += 1
        return ResetStats(pages, runs, time.perf_counter() - t0)

    def verify(self) -> bool:
        """Check every block against the snapshot's checksums (when it has them)."""
        return snapshot.check_checksums(self.ram, [(b.name, b.used_length)
                                                   for b in self.info.blocks],
                                        self.info.description, "reset")

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
        for region in self._maps:
            snapshot.release_private(region)
        self._maps = []
        self.ram.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
