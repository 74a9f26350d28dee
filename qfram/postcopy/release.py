"""release-ram that never loses a page: the source gives pages back only once the
destination has confirmed it holds them.

Every batch the source sends is remembered with the stream offset its last byte ends at
(per channel: main and preempt) and the exact pages it carried.  The destination reports,
per channel, the offset before which every page record is in place (QFRAM_RECEIVED on
the return path, a qfram extension the source asks for); batches that end before it are
released on a thread of their own, so madvise never delays a page request.  Should the
destination die, what it never confirmed is still here.
"""
from __future__ import annotations

import collections
import threading
from typing import Deque, List, Tuple

from qfram.ram import RAMBlock
from qfram.wire import TARGET_PAGE_SIZE

Runs = List[Tuple[int, int]]


class ConfirmedRelease:
    """Pages sent and waiting for the destination's word, released once it comes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._confirmed = [0, 0]
        self._pending: List[Deque[Tuple[int, RAMBlock, Runs]]] = [collections.deque(),
                                                                  collections.deque()]
        self._everything = False
        self._stopping = False
        self.released_bytes = 0
        self.confirmations = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="qfram-release")
        self._thread.start()

    def sent(self, channel: int, end: int, block: RAMBlock, runs: Runs) -> None:
        """``runs`` of ``block`` went out on ``channel``; their last byte ends at ``end``."""
        if runs:
            with self._cond:
                self._pending[channel].append((end, block, runs))
                self._cond.notify()

    def confirm(self, channel: int, offset: int) -> None:
        """The destination has every page record of ``channel`` before ``offset``."""
        with self._cond:
            self.confirmations += 1
            if offset > self._confirmed[channel]:
                self._confirmed[channel] = offset
                self._cond.notify()

    def forget_pending(self) -> None:
        """The link was lost: what was sent and not confirmed stays (the destination's
        received bitmap will say what it holds); new streams count from offset 0."""
        with self._cond:
            for queue in self._pending:
                queue.clear()
            self._confirmed = [0, 0]

    def confirm_all(self) -> None:
        """The destination has everything (it said so when it shut down cleanly)."""
        with self._cond:
            self._everything = True
            self._cond.notify()

    def stop(self) -> int:
        """Release what is confirmed, then stop.  Returns the bytes released."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        return self.released_bytes

    def _ready(self) -> List[Tuple[RAMBlock, Runs]]:
        out = []
        for channel, queue in enumerate(self._pending):
            while queue and (self._everything or queue[0][0] <= self._confirmed[channel]):
                _, block, runs = queue.popleft()
                out.append((block, runs))
        return out

    def _run(self) -> None:
        while True:
            with self._cond:
                ready = self._ready()
                while not ready and not self._stopping:
                    self._cond.wait()
                    ready = self._ready()
                stopping = self._stopping
            for block, runs in ready:
                for first, count in runs:
                    self.released_bytes += block.discard(first * TARGET_PAGE_SIZE,
                                                         count * TARGET_PAGE_SIZE)
            if stopping and not ready:
                return
