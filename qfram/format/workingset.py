"""The working set of a snapshot: the pages a restored program touched first, in the
order it touched them, kept in a small sidecar (``SNAP.ws``) so that the next restore
places them before the program asks (REAP's record-and-prefetch).  A migration has no
snapshot: its destination writes the same file where it is told (``qfram receive
--working-set F``), and the next migration's source sends those pages first.

A working set is a hint, never trusted: it names what it was recorded for (a snapshot:
size, modification time, inode, block checksums; a migration: its blocks' names and
sizes) and ends with its own checksum; one that is damaged, stale or does not fit the
blocks is ignored with the reason why — a restore never fails because of it, and never
places a page outside a block.

Layout (big-endian, like everything qfram writes)::

    "QFRAMWS1"  be32 version  be32 window_pages  be64 recorded (ns since the epoch)
    be64 snapshot size  be64 snapshot mtime (ns)  be64 snapshot inode  be64 fingerprint
        (a migration's: zero, zero, zero, and the fingerprint of its blocks)
    be32 blocks, each: counted name, be64 pages
    be64 touches, each: be32 block index, be64 page
    be64 xxh3-64 of all the bytes before it
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import xxhash

from qfram.errors import FormatError
from qfram.io import outputs

MAGIC = b"QFRAMWS1"
VERSION = 1
SUFFIX = ".ws"
MAX_TOUCHES = 1 << 20           # what the fault server remembers
MAX_WINDOW_PAGES = 4096         # pages placed with a touch: what the fault server takes
_HEAD = struct.Struct(">8sIIQQQQQ")
_TOUCH = struct.Struct(">IQ")


@dataclass
class WorkingSet:
    """Pages (block index, page) in first-touch order, and when they were recorded."""

    touches: List[Tuple[int, int]] = field(default_factory=list)
    window_pages: int = 16
    recorded: float = 0.0           # seconds since the epoch

    @property
    def pages(self) -> int:
        return len(self.touches)

    def in_place_order(self) -> List[Tuple[int, int]]:
        """The pages sorted by block and page: the order they are placed in before the
        program runs (the order of first touch then no longer matters, and adjacent
        pages go in one UFFDIO_COPY, or one PART)."""
        return sorted(set(self.touches))

    @property
    def runs(self) -> int:
        """Runs of adjacent pages, each placed at once."""
        runs, last = 0, None
        for block, page in self.in_place_order():
            if last != (block, page - 1):
                runs += 1
            last = (block, page)
        return runs

    def describe(self) -> dict:
        return dict(pages=self.pages, runs=self.runs, window_pages=self.window_pages,
                    recorded=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.recorded)))


def sidecar_of(snapshot_path: str) -> str:
    return snapshot_path + SUFFIX


def _identity(fd: int, info) -> Tuple[int, int, int, int]:
    """What names the snapshot a sidecar belongs to: changed by any rewrite of it."""
    st = os.fstat(fd)
    digest = xxhash.xxh3_64()
    for b in info.blocks:
        digest.update(f"{b.name}\0{b.used_length}\0{b.xxh3_64 or ''}\0".encode())
    return st.st_size, st.st_mtime_ns, st.st_ino, digest.intdigest()


def _blocks(info) -> List[Tuple[str, int]]:
    return [(b.name, b.used_length // 4096) for b in info.blocks]


def migration_identity(blocks: List[Tuple[str, int]]) -> Tuple[int, int, int, int]:
    """What names a migration's working set: its blocks (name, pages)."""
    digest = xxhash.xxh3_64()
    for name, npages in blocks:
        digest.update(f"{name}\0{npages}\0".encode())
    return 0, 0, 0, digest.intdigest()


def ram_blocks(ram) -> List[Tuple[str, int]]:
    """A RAMList's blocks as a working set names them: (name, pages)."""
    return [(b.name, b.npages) for b in ram]


def for_migration(path: str, ram) -> Tuple[Optional[WorkingSet], str]:
    """The working set a migration's destination recorded at ``path``, if it fits
    ``ram`` (the source's blocks: same names, sizes, order)."""
    blocks = ram_blocks(ram)
    return read(path, migration_identity(blocks), blocks)


def record_migration(path: str, ram, touches: List[Tuple[int, int]],
                     window_pages: int) -> str:
    """Add the first touches a migration's destination saw to the working set at
    ``path`` (what was there first, if it fits ``ram``); what was done, or why not."""
    blocks = ram_blocks(ram)
    before, _ = read(path, migration_identity(blocks), blocks)
    merged = first_touches(before.touches if before is not None else [], touches)
    if not merged:
        return "no first touches to record"
    window = max(window_pages, before.window_pages if before is not None else 1)
    try:
        write(path, migration_identity(blocks), blocks, WorkingSet(merged, window, time.time()))
    except OSError as exc:
        return f"not recorded in {path}: {exc.strerror}"
    return f"{len(merged)} first touches recorded in {path}"


def load(snapshot_path: str, fd: int, info) -> Tuple[Optional[WorkingSet], str]:
    """The sidecar of the snapshot open on ``fd`` (``info`` from inspecting it), or
    None and why it is not used."""
    return read(sidecar_of(snapshot_path), _identity(fd, info), _blocks(info))


def save(snapshot_path: str, fd: int, info, ws: WorkingSet) -> None:
    """Write the snapshot's sidecar whole (temporary file, renamed into place)."""
    write(sidecar_of(snapshot_path), _identity(fd, info), _blocks(info), ws)


def read(path: str, identity: Tuple[int, int, int, int],
         blocks: List[Tuple[str, int]]) -> Tuple[Optional[WorkingSet], str]:
    """The working set at ``path`` if it was recorded for ``identity`` and ``blocks``
    (name, pages), else None and why not."""
    try:
        side = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, "no working set recorded"
    except OSError as exc:
        return None, f"{path}: {exc.strerror}"
    try:
        size = os.fstat(side).st_size
        limit = _HEAD.size + 4 + len(blocks) * 264 + 8 + MAX_TOUCHES * _TOUCH.size + 8
        if size > limit:
            return None, f"{path}: {size} bytes, more than a working set can hold"
        data = os.pread(side, size, 0)
    except OSError as exc:
        return None, f"{path}: {exc.strerror}"
    finally:
        os.close(side)
    try:
        return _parse(data, identity, blocks), ""
    except struct.error:
        return None, f"{path}: cut short inside its block list; ignored"
    except ValueError as exc:
        return None, f"{path}: {exc}; ignored"


def _parse(data: bytes, identity: Tuple[int, int, int, int],
           blocks: List[Tuple[str, int]]) -> WorkingSet:
    if len(data) < _HEAD.size + 8:
        raise FormatError(f"{len(data)} bytes, shorter than a header")
    body, (digest,) = data[:-8], struct.unpack(">Q", data[-8:])
    if xxhash.xxh3_64_intdigest(body) != digest:
        raise FormatError(f"checksum mismatch at byte offset {len(body)}")
    magic, version, window, recorded, *who = _HEAD.unpack_from(body, 0)
    if magic != MAGIC or version != VERSION:
        raise FormatError("not a qfram working set (version 1) at byte offset 0")
    if not 1 <= window <= MAX_WINDOW_PAGES:
        raise FormatError(f"a window of {window} pages at byte offset 12 (1 to "
                          f"{MAX_WINDOW_PAGES})")
    if tuple(who) != tuple(identity):
        raise FormatError("stale: recorded for another snapshot or RAM, or the snapshot "
                         "changed since")
    pos = _HEAD.size
    (nblocks,) = struct.unpack_from(">I", body, pos)
    pos += 4
    recorded_blocks = []
    for _ in range(min(nblocks, len(blocks) + 1)):
        if pos >= len(body):
            raise FormatError(f"block list cut short at byte offset {pos}")
        n = body[pos]
        name = body[pos + 1:pos + 1 + n].decode(errors="replace")
        (npages,) = struct.unpack_from(">Q", body, pos + 1 + n)
        recorded_blocks.append((name, npages))
        pos += 1 + n + 8
    if recorded_blocks != list(blocks):
        raise FormatError("recorded for other blocks than the snapshot's")
    (count,) = struct.unpack_from(">Q", body, pos)
    pos += 8
    if count > MAX_TOUCHES or pos + count * _TOUCH.size != len(body):
        raise FormatError(f"{count} touches declared at byte offset {pos - 8}, "
                         f"{len(body) - pos} bytes hold them")
    sizes = [npages for _, npages in recorded_blocks]
    touches = []
    for k, (block, page) in enumerate(_TOUCH.iter_unpack(body[pos:])):
        if block >= len(sizes) or page >= sizes[block]:
            raise FormatError(f"page {page} of block {block} lies outside the snapshot "
                             f"(byte offset {pos + k * _TOUCH.size})")
        touches.append((block, page))
    return WorkingSet(touches, window, recorded / 1e9)


def write(path: str, identity: Tuple[int, int, int, int], blocks: List[Tuple[str, int]],
          ws: WorkingSet) -> None:
    """Write a working set whole (temporary file, renamed into place) or not at all."""
    head = _HEAD.pack(MAGIC, VERSION, ws.window_pages, int(ws.recorded * 1e9), *identity)
    parts = [head, struct.pack(">I", len(blocks))]
    for name, npages in blocks:
        encoded = name.encode()
        parts.append(bytes([len(encoded)]) + encoded + struct.pack(">Q", npages))
    touches = ws.touches[:MAX_TOUCHES]
    parts.append(struct.pack(">Q", len(touches)))
    parts.extend(_TOUCH.pack(b, p) for b, p in touches)
    body = b"".join(parts)
    data = memoryview(body + struct.pack(">Q", xxhash.xxh3_64_intdigest(body)))
    with outputs.new_file(path) as out:
        while data:
            data = data[os.write(out.fd, data):]


def first_touches(*orders: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """The pages of ``orders`` one after the other, each once, where it first came."""
    seen = set()
    out = []
    for order in orders:
        for touch in order:
            if touch not in seen:
                seen.add(touch)
                out.append(touch)
    return out
