"""Where a page server's chunks come from: a source decodes one chunk of one block into a
buffer, checked against what the snapshot recorded for it, or raises.

* :class:`ChunkedFileSource` — a chunked snapshot (qfram.snapshot.chunked): each chunk
  read with ``pread`` (a file cut under the server is an error, never a SIGBUS) and
  decoded in C, its xxh3 checked;
* :class:`MappedFileSource` — a mapped snapshot (QEMU's mapped-ram or qfram's): a chunk is
  its present pages, ``pread``; zero pages stay zero.  A mapped file records one checksum
  per block, not per chunk: each clone checks its blocks against it once complete;
* :class:`StoreSource` — a snapshot in an S3 store (qfram.store): chunks fetched through
  this host's chunk cache, their SHA-256 checked.

Every source says what a client needs besides pages (``description`` JSON with the
blocks' checksums, ``machine``, ``ram_section_id``, ``devices``) and names its snapshot
(``name``: the resolved path, or the URL).
"""
from __future__ import annotations

import json
import os
import struct
from typing import List, Optional, Tuple

from qfram import _chunks
from qfram.errors import FormatError
from qfram.format import savevm
from qfram.format.vmdesc import Description
from qfram.snapshot import chunked, inspect_fd, open_locked
from qfram.snapshot.common import SnapshotInfo
from qfram.wire import TARGET_PAGE_SIZE

# the chunk size a page server uses for a mapped snapshot (it has no chunks of its own)
MAPPED_CHUNK = 256 << 10


def description_json(desc: Optional[Description]) -> str:
    """The parts of a description a client checks its RAM against (and QEMU's devices)."""
    if desc is None:
        return "{}"
    return json.dumps({"page_size": desc.page_size, "devices": desc.devices,
                       "qfram": desc.qfram})


class ChunkSource:
    """What a page server serves: blocks cut in ``chunk_bytes`` chunks."""

    name: str
    chunk_bytes: int
    blocks: List[Tuple[str, int]]          # (name, used length)
    description: str = "{}"
    machine: str = ""
    ram_section_id: int = 0
    devices: bytes = b""

    def zero_chunks(self, block: int) -> bytes:
        """A bitmap of the block's chunks that are all zero (never asked for)."""
        raise NotImplementedError

    def decode(self, block: int, chunk: int, out: memoryview) -> None:
        """Chunk ``chunk`` of ``block``, decoded and checked, into ``out`` (its length)."""
        raise NotImplementedError

    def working_set(self) -> Optional[dict]:
        return None

    def close(self) -> None:
        pass


def bitmap(bits: List[bool]) -> bytes:
    out = bytearray(-(-len(bits) // 8))
    for i, bit in enumerate(bits):
        if bit:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


_NATIVE = struct.Struct("=QIIQ")            # qfram.snapshot.chunked's index entries


class ChunkedFileSource(ChunkSource):
    """A chunked snapshot, opened once (and held with a shared lock)."""

    def __init__(self, path: str) -> None:
        self.name = os.path.realpath(path)
        self.fd = open_locked(path)
        try:
            self.file = chunked.read(self.fd, path)
        except BaseException:
            os.close(self.fd)
            raise
        if not self.file.blocks:
            os.close(self.fd)
            raise FormatError(f"{path}: the snapshot holds no RAM", 0)
        self.path = path
        self.chunk_bytes = self.file.chunk_bytes
        self.blocks = [(b.name, b.used_length) for b in self.file.blocks]
        self.description = description_json(self.file.description)
        self.machine = self.file.machine
        self.ram_section_id = self.file.ram_section_id
        self.devices = self.file.devices

    def _entry(self, block: int, chunk: int) -> Tuple[int, int, int, int]:
        return _NATIVE.unpack_from(self.file.blocks[block].index, chunk * _NATIVE.size)

    def zero_chunks(self, block: int) -> bytes:
        b = self.file.blocks[block]
        return bitmap([self._entry(block, c)[2] == chunked.KIND_ZERO
                       for c in range(b.nchunks)])

    def decode(self, block: int, chunk: int, out: memoryview) -> None:
        offset, length, kind, digest = self._entry(block, chunk)
        stored = os.pread(self.fd, length, offset) if length else b""
        if len(stored) != length:
            raise OSError(5, f"{self.path}: chunk {chunk} of block "
                             f"{self.blocks[block][0]!r} is cut short at byte "
                             f"{offset + len(stored)} (was the file cut or replaced?)")
        rc = _chunks.decode_one(kind, stored, out, digest)
        if rc:
            raise FormatError(f"{self.path}: chunk {chunk} of block "
                              f"{self.blocks[block][0]!r} "
                              + ("does not decode" if rc == -1 else
                                 "decodes to other bytes than were saved"), offset)

    def working_set(self) -> Optional[dict]:
        from qfram.format import workingset
        ws, _ = workingset.load(self.path, self.fd, chunked.inspect(self.path, self.file))
        if ws is None:
            return None
        return {"window_pages": ws.window_pages, "touches": ws.in_place_order()}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class MappedFileSource(ChunkSource):
    """A mapped snapshot: its present pages, read chunk by chunk (no per-chunk checksum
    exists: each clone checks its blocks against the snapshot's once complete)."""

    def __init__(self, path: str, chunk_bytes: int = MAPPED_CHUNK) -> None:
        self.name = os.path.realpath(path)
        self.fd = open_locked(path)
        try:
            info: SnapshotInfo = inspect_fd(path, self.fd)
            if info.layout != "mapped":
                raise FormatError(f"{path}: a page server serves the mapped or chunked "
                                  f"layout; this is a {info.layout} snapshot (`qfram "
                                  f"rewrite {path} OUT --layout chunked` makes one)", 0)
            if not info.blocks:
                raise FormatError(f"{path}: the snapshot holds no RAM", 0)
            self.present = [savevm.read_present(self.fd, b, b.bitmap_offset)
                            for b in info.blocks]
        except BaseException:
            os.close(self.fd)
            raise
        self.path = path
        self.info = info
        self.chunk_bytes = chunk_bytes
        self.blocks = [(b.name, b.used_length) for b in info.blocks]
        self.description = description_json(info.description)
        self.machine = info.machine
        ram_ids = [x.section_id for x in info.sections if x.name == "ram"]
        self.ram_section_id = ram_ids[0] if ram_ids else 0
        self.devices = b"".join(os.pread(self.fd, d.end - d.offset, d.offset)
                                for d in info.devices)

    def _pages(self, block: int, chunk: int) -> range:
        per = self.chunk_bytes // TARGET_PAGE_SIZE
        npages = self.blocks[block][1] // TARGET_PAGE_SIZE
        return range(chunk * per, min(npages, (chunk + 1) * per))

    def zero_chunks(self, block: int) -> bytes:
        present = self.present[block]
        n = -(-self.blocks[block][1] // self.chunk_bytes)
        return bitmap([not any(present[p >> 3] >> (p & 7) & 1 for p in self._pages(block, c))
                       for c in range(n)])

    def decode(self, block: int, chunk: int, out: memoryview) -> None:
        b = self.info.blocks[block]
        present = self.present[block]
        pages = self._pages(block, chunk)
        out[:] = bytes(len(out))
        for p in pages:
            if present[p >> 3] >> (p & 7) & 1:
                at = (p - pages.start) * TARGET_PAGE_SIZE
                got = os.preadv(self.fd, [out[at:at + TARGET_PAGE_SIZE]],
                                b.pages_offset + p * TARGET_PAGE_SIZE)
                if got != TARGET_PAGE_SIZE:
                    raise OSError(5, f"{self.path}: page {p} of block {b.name!r} is cut "
                                     f"short (was the file cut or replaced?)")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StoreSource(ChunkSource):
    """A snapshot in a store: chunks fetched through this host's chunk cache (one fetch
    per chunk however many ask), each hashed before it is used; the server's workers
    fetch many at once (a GET is mostly waiting), urgent ones first."""

    threads = 16                      # fetching is waiting: more workers than cores

    def __init__(self, url: str, endpoint=None, cache=None, timeout: Optional[float] = None,
                 deadline: Optional[float] = None) -> None:
        from qfram.store.chunks import ChunkFetcher
        from qfram.store.restore import device_state, open_manifest
        self.name = url
        self.store, self.manifest = open_manifest(url, endpoint, timeout=timeout,
                                                  deadline=deadline)
        self.fetcher = ChunkFetcher(self.store, cache, url)
        self.chunk_bytes = self.manifest.chunk_bytes
        self.blocks = [(b.name, b.used_length) for b in self.manifest.blocks]
        self.description = json.dumps(self.manifest.description)
        state = device_state(self.manifest)
        self.machine, self.ram_section_id = state.machine, state.ram_section_id
        self.devices = state.sections

    def zero_chunks(self, block: int) -> bytes:
        from qfram.format.manifest import ZERO
        return bitmap([d == ZERO for d in self.manifest.blocks[block].chunks])

    def decode(self, block: int, chunk: int, out: memoryview) -> None:
        self.fetcher.fetch(self.manifest.blocks[block].chunks[chunk], out)

    def working_set(self) -> Optional[dict]:
        return self.manifest.working_set

    def close(self) -> None:
        self.store.close()


def open_source(path: str, **store_options) -> ChunkSource:
    """The source for a snapshot: an ``s3://`` URL, or a local file (chunked or
    mapped)."""
    if path.startswith("s3://"):
        return StoreSource(path, **store_options)
    fd = open_locked(path)
    try:
        is_chunked = chunked.is_chunked(fd)
    finally:
        os.close(fd)
    return ChunkedFileSource(path) if is_chunked else MappedFileSource(path)
