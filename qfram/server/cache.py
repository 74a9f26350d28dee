"""The page server's cache: one decoded, verified copy of the served RAM in a memfd that
every client maps copy-on-write.

Each block sits at an offset of its own (a multiple of the chunk size); a chunk is in the
cache (READY), being decoded (FILLING), or a hole.  A chunk is decoded into a private
buffer first and then written with ``pwrite``: shmem locks a page while it is written,
so a client touching it meanwhile waits and never sees half a page (a ``memcpy`` into a
shared mapping would show torn pages).  The memfd is sealed against shrinking and
growing: a client's mapping can never lose its file under it (SIGBUS).

Under a memory limit, the least recently asked-for chunks leave (a hole is punched; the
clones' unwritten pages of it go with it, and come back through a fault); a zero chunk
is never in the cache at all.
"""
from __future__ import annotations

import collections
import fcntl
import os
import threading
from typing import List, Tuple

from qfram import backend
from qfram.server.sources import ChunkSource

EMPTY, FILLING, READY = 0, 1, 2
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 2)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 4)


class Cache:
    def __init__(self, source: ChunkSource, memory_limit: int = 0) -> None:
        self.source = source
        self.chunk_bytes = source.chunk_bytes
        self.memory_limit = memory_limit
        self.offsets: List[int] = []
        self.nchunks: List[int] = []
        self.zero: List[bytes] = []
        at = 0
        for i, (_, length) in enumerate(source.blocks):
            self.offsets.append(at)
            self.nchunks.append(-(-length // self.chunk_bytes))
            self.zero.append(source.zero_chunks(i))
            at += self.nchunks[-1] * self.chunk_bytes
        self.size = at
        self.fd = os.memfd_create("qfram-page-cache", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
            # what clients get: the same file, read-only (no write, no seals, no resize)
            self.client_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self.fd)
            raise
        # per block, a state byte per chunk; the READY ones in use order (under a limit)
        self.state = [bytearray(n) for n in self.nchunks]
        self.lru: "collections.OrderedDict[Tuple[int, int], None]" = collections.OrderedDict()
        self.resident = 0
        self.decoded = 0
        self.evicted = 0
        self._local = threading.local()

    def is_zero(self, block: int, chunk: int) -> bool:
        return bool(self.zero[block][chunk >> 3] >> (chunk & 7) & 1)

    def length(self, block: int, chunk: int) -> int:
        return min(self.chunk_bytes, self.source.blocks[block][1] - chunk * self.chunk_bytes)

    def fill(self, block: int, chunk: int) -> None:
        """Decode the chunk into the cache (on a worker thread: the decoding and the
        writes release the GIL)."""
        length = self.length(block, chunk)
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or len(scratch) < self.chunk_bytes:
            scratch = self._local.scratch = bytearray(self.chunk_bytes)
        view = memoryview(scratch)[:length]
        self.source.decode(block, chunk, view)
        at = self.offsets[block] + chunk * self.chunk_bytes
        while view:
            n = os.pwrite(self.fd, view, at)
            view, at = view[n:], at + n

    def mark_ready(self, block: int, chunk: int) -> None:
        if self.state[block][chunk] != READY:
            self.resident += self.length(block, chunk)
            self.decoded += 1
        self.state[block][chunk] = READY
        if self.memory_limit:
            self.lru[(block, chunk)] = None
            self.lru.move_to_end((block, chunk))

    def touch(self, block: int, chunk: int) -> None:
        if self.memory_limit:
            self.lru.move_to_end((block, chunk))

    def evict(self, keep: int = 0) -> int:
        """Punch out the least recently used chunks until the cache fits its limit
        (``keep``: bytes about to come in).  Returns how many left."""
        if not self.memory_limit:
            return 0
        gone = 0
        while self.lru and self.resident + keep > self.memory_limit:
            (block, chunk), _ = self.lru.popitem(last=False)
            length = self.length(block, chunk)
            backend.impl.punch_hole(self.fd, self.offsets[block] + chunk * self.chunk_bytes,
                                    length)
            self.state[block][chunk] = EMPTY
            self.resident -= length
            gone += 1
        self.evicted += gone
        return gone

    def close(self) -> None:
        for fd in (self.client_fd, self.fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.client_fd = -1
