"""The working set of a snapshot: the pages a restored program touched first, in the
order it touched them, kept in a small sidecar (``SNAP.ws``) so that the next restore
places them before the program asks (REAP's record-and-prefetch).

A sidecar is a hint, never trusted: it names the snapshot it was recorded for (size,
modification time, inode, block checksums) and ends with its own checksum; one that is
damaged, stale or does not fit the snapshot's blocks is ignored with the reason why —
a restore never fails because of it, and never places a page outside a block.

Layout (big-endian, like everything qfram writes)::

    "QFRAMWS1"  be32 version  be32 window_pages  be64 recorded (ns since the epoch)
    be64 snapshot size  be64 snapshot mtime (ns)  be64 snapshot inode  be64 fingerprint
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

from qfram import outputs

MAGIC = b"QFRAMWS1"
VERSION = 1
SUFFIX = ".ws"
MAX_TOUCHES = 1 << 20           # what the fault server remembers
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

    @property
    def runs(self) -> int:
        """Runs of adjacent pages in the order they are placed."""
        runs, last = 0, None
        for block, page in self.touches:
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


def load(snapshot_path: str, fd: int, info) -> Tuple[Optional[WorkingSet], str]:
    """The sidecar of the snapshot open on ``fd`` (``info`` from inspecting it), or
    None and why it is not used."""
    path = sidecar_of(snapshot_path)
    try:
        side = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, "no working set recorded"
    except OSError as exc:
        return None, f"{path}: {exc.strerror}"
    try:
        size = os.fstat(side).st_size
        limit = _HEAD.size + 4 + len(info.blocks) * 264 + 8 + MAX_TOUCHES * _TOUCH.size + 8
        if size > limit:
            return None, f"{path}: {size} bytes, more than a working set can hold"
        data = os.pread(side, size, 0)
    except OSError as exc:
        return None, f"{path}: {exc.strerror}"
    finally:
        os.close(side)
    try:
        return _parse(data, fd, info), ""
    except struct.error:
        return None, f"{path}: cut short inside its block list; ignored"
    except ValueError as exc:
        return None, f"{path}: {exc}; ignored"


def _parse(data: bytes, fd: int, info) -> WorkingSet:
    if len(data) < _HEAD.size + 8:
        raise ValueError(f"{len(data)} bytes, shorter than a header")
    body, (digest,) = data[:-8], struct.unpack(">Q", data[-8:])
    if xxhash.xxh3_64_intdigest(body) != digest:
        raise ValueError(f"checksum mismatch at byte offset {len(body)}")
    magic, version, window, recorded, *who = _HEAD.unpack_from(body, 0)
    if magic != MAGIC or version != VERSION:
        raise ValueError("not a qfram working set (version 1) at byte offset 0")
    if tuple(who) != _identity(fd, info):
        raise ValueError("stale: the snapshot changed since it was recorded")
    pos = _HEAD.size
    (nblocks,) = struct.unpack_from(">I", body, pos)
    pos += 4
    recorded_blocks = []
    for _ in range(min(nblocks, len(info.blocks) + 1)):
        if pos >= len(body):
            raise ValueError(f"block list cut short at byte offset {pos}")
        n = body[pos]
        name = body[pos + 1:pos + 1 + n].decode(errors="replace")
        (npages,) = struct.unpack_from(">Q", body, pos + 1 + n)
        recorded_blocks.append((name, npages))
        pos += 1 + n + 8
    if recorded_blocks != _blocks(info):
        raise ValueError("recorded for other blocks than the snapshot's")
    (count,) = struct.unpack_from(">Q", body, pos)
    pos += 8
    if count > MAX_TOUCHES or pos + count * _TOUCH.size != len(body):
        raise ValueError(f"{count} touches declared at byte offset {pos - 8}, "
                         f"{len(body) - pos} bytes hold them")
    sizes = [npages for _, npages in recorded_blocks]
    touches = []
    for k, (block, page) in enumerate(_TOUCH.iter_unpack(body[pos:])):
        if block >= len(sizes) or page >= sizes[block]:
            raise ValueError(f"page {page} of block {block} lies outside the snapshot "
                             f"(byte offset {pos + k * _TOUCH.size})")
        touches.append((block, page))
    return WorkingSet(touches, window, recorded / 1e9)


def save(snapshot_path: str, fd: int, info, ws: WorkingSet) -> None:
    """Write the sidecar whole (temporary file, renamed into place) or not at all."""
    head = _HEAD.pack(MAGIC, VERSION, ws.window_pages, int(ws.recorded * 1e9),
                      *_identity(fd, info))
    parts = [head, struct.pack(">I", len(info.blocks))]
    for name, npages in _blocks(info):
        encoded = name.encode()
        parts.append(bytes([len(encoded)]) + encoded + struct.pack(">Q", npages))
    touches = ws.touches[:MAX_TOUCHES]
    parts.append(struct.pack(">Q", len(touches)))
    parts.extend(_TOUCH.pack(b, p) for b, p in touches)
    body = b"".join(parts)
    data = memoryview(body + struct.pack(">Q", xxhash.xxh3_64_intdigest(body)))
    with outputs.new_file(sidecar_of(snapshot_path)) as out:
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
