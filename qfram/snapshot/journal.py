"""Crash-safe in-place updates of a mapped snapshot: incremental saves through a journal.

An incremental save writes only the pages that changed, into the snapshot itself, so a
crash in the middle could leave a file that is neither the old snapshot nor the new one.
Hence a redo journal beside it, ``.NAME.qfram-journal``: every change — the pages that
changed (their new bytes), the pages that became zero, each block's new bitmap, the new
tail of the file (END section, device state, EOF, VMDESCRIPTION with the new checksums)
and the final size — is written there and made durable *before* the snapshot is touched.
The journal ends with a commit record carrying its own xxh3.  Then the journal is
replayed onto the snapshot, the snapshot synced and the journal removed.

Whoever opens the snapshot next (load, info, the next save) finds no journal; or one
without its commit record (the crash came before any in-place write: it is dropped and
the old snapshot stands); or a committed one (replayed: the new snapshot).  A journal
names the inode it was written for, so one left beside a snapshot that was since
replaced is dropped, never applied to the wrong file.

Journal layout::

    "QFJ1", be32 n, n bytes of JSON: snapshot inode, final size, tail offset, and per
        block its name, page count, pages/bitmap offsets
    per block: changed-pages bitmap, new present-pages bitmap
    be64 n, n bytes: the new tail, written at the tail offset
    per block: the bytes of every changed page that is present, in page order
    "QFJC", be64 xxh3-64 of everything before it
"""
from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import struct
import time
from typing import Dict, List, Optional, Tuple

import xxhash

from qfram import backend
from qfram.errors import FormatError, OptionError
from qfram.format import savevm
from qfram.io import channel
from qfram.ram import RAMBlock, bitmap_bytes
from qfram.results import SaveResult
from qfram.snapshot import chunked, reader
from qfram.snapshot.common import checksum, devices_of, make_description
from qfram.wire import TARGET_PAGE_SIZE

MAGIC = b"QFJ1"
COMMIT = b"QFJC"
SUFFIX = ".qfram-journal"
MAX_HEADER = 1 << 20
IOV_BATCH = 512


def journal_path(path: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}{SUFFIX}")


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _and(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") & int.from_bytes(b, "little")).to_bytes(len(a),
                                                                                  "little")


def _and_not(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") & ~int.from_bytes(b, "little")).to_bytes(len(a),
                                                                                   "little")


def _or(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a),
                                                                                 "little")


# ---------------------------------------------------------------------------------------
# recovery: what the next opener does
# ---------------------------------------------------------------------------------------


def open_locked(path: str) -> int:
    """The snapshot open read-only with a shared lock (incremental saves wait while it
    is held), after finishing or dropping an interrupted incremental save."""
    recover(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def recover(path: str) -> Optional[str]:
    """Finish or drop an incremental save that a crash interrupted.  Returns "replayed",
    "dropped" or None (no journal).  Takes the snapshot's exclusive lock."""
    jpath = journal_path(path)
    if not os.path.exists(jpath):
        return None
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _recover_locked(path, fd)
    finally:
        os.close(fd)


def _recover_locked(path: str, fd: int) -> Optional[str]:
    jpath = journal_path(path)
    try:
        jfd = os.open(jpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None                 # another opener finished it meanwhile
    try:
        header = _committed_header(jfd, os.fstat(fd))
        if header is not None:
            _replay(fd, jfd, header)
    finally:
        os.close(jfd)
    os.unlink(jpath)
    _fsync_dir(path)
    return "replayed" if header is not None else "dropped"


def _committed_header(jfd: int, snap: os.stat_result) -> Optional[dict]:
    """The journal's header if it is whole, committed and meant for this snapshot."""
    size = os.fstat(jfd).st_size
    if size < 8 + 12 or os.pread(jfd, 4, 0) != MAGIC:
        return None
    trailer = os.pread(jfd, 12, size - 12)
    if trailer[:4] != COMMIT:
        return None
    hasher = xxhash.xxh3_64()
    for off in range(0, size - 12, 16 << 20):
        hasher.update(os.pread(jfd, min(16 << 20, size - 12 - off), off))
    if hasher.intdigest() != struct.unpack(">Q", trailer[4:])[0]:
        return None
    n = struct.unpack(">I", os.pread(jfd, 4, 4))[0]
    if n > MAX_HEADER or 8 + n > size:
        return None
    try:
        header = json.loads(os.pread(jfd, n, 8))
    except ValueError:
        return None
    if not isinstance(header, dict) or header.get("inode") != [snap.st_dev, snap.st_ino]:
        return None                 # written for a file that has since been replaced
    header["_body"] = 8 + n
    header["_size"] = size - 12
    return header


def _replay(fd: int, jfd: int, header: dict) -> None:
    """Apply a committed journal to the snapshot and sync it (idempotent: a crash while
    replaying is followed by the same replay)."""
    pos = header["_body"]
    end = header["_size"]
    blocks = header["blocks"]
    final_size = int(header["final_size"])
    maps: List[Tuple[dict, bytes, bytes]] = []
    for b in blocks:
        nbytes = bitmap_bytes(int(b["npages"]))
        if pos + 2 * nbytes > end:
            raise FormatError("the journal's bitmaps run past its end", pos)
        changed = os.pread(jfd, nbytes, pos)
        present = os.pread(jfd, nbytes, pos + nbytes)
        pos += 2 * nbytes
        if int(b["pages_offset"]) + int(b["npages"]) * TARGET_PAGE_SIZE > final_size:
            raise FormatError(f"the journal puts block {b['name']!r} past the file's end", 0)
        maps.append((b, changed, present))
    (tail_len,) = struct.unpack(">Q", os.pread(jfd, 8, pos))
    tail = os.pread(jfd, tail_len, pos + 8)
    if len(tail) != tail_len or int(header["tail_offset"]) + tail_len != final_size:
        raise FormatError("the journal's tail does not end the file", pos)
    pos += 8 + tail_len
    for b, changed, present in maps:
        npages, pages_offset = int(b["npages"]), int(b["pages_offset"])
        data = _and(changed, present)
        for first, count in backend.impl.bitmap_runs(data, npages):
            length = count * TARGET_PAGE_SIZE
            if pos + length > end:
                raise FormatError("the journal's pages run past its end", pos)
            _copy_range(jfd, pos, fd, pages_offset + first * TARGET_PAGE_SIZE, length)
            pos += length
        for first, count in backend.impl.bitmap_runs(_and_not(changed, present), npages):
            backend.impl.punch_hole(fd, pages_offset + first * TARGET_PAGE_SIZE,
                                 count * TARGET_PAGE_SIZE)
        os.pwrite(fd, present, int(b["bitmap_offset"]))
    os.pwrite(fd, tail, int(header["tail_offset"]))
    os.ftruncate(fd, final_size)
    os.fsync(fd)


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    while length > 0:
        try:
            n = os.copy_file_range(src, dst, length, src_off, dst_off)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = os.pwrite(dst, os.pread(src, min(length, 8 << 20), src_off), dst_off)
        if n <= 0:
            raise OSError(errno.EIO, "copying from the journal made no progress")
        src_off += n
        dst_off += n
        length -= n


# ---------------------------------------------------------------------------------------
# the incremental save
# ---------------------------------------------------------------------------------------


def save_incremental(blocks: List[RAMBlock], path: str, release: bool, progress):
    """Update a mapped snapshot in place through a journal: only pages that differ from
    the file are written.  ``release``: every page is given back once the updated
    snapshot is durable."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)          # one writer; readers wait
        _recover_locked(path, fd)
        if chunked.is_chunked(fd):
            raise OptionError(f"{path}: an incremental save needs a mapped snapshot, not a "
                              f"chunked one")
        info = reader.inspect_fd(path, fd)
        if info.layout != "mapped":
            raise OptionError(f"{path}: an incremental save needs a mapped snapshot")
        names = [(b.name, b.used_length) for b in info.blocks]
        if names != [(b.name, b.used_length) for b in blocks]:
            raise OptionError(f"{path} holds blocks {names}; an incremental save needs the "
                              f"same")
        changes, sums, counts, written, unchanged = _compare(fd, blocks, info, progress)
        devices = devices_of(fd, info)
        tail = _new_tail(blocks, info, devices, sums, counts)
        final_size = info.ram_end_offset + len(tail)
        st = os.fstat(fd)
        header = {"version": 1, "inode": [st.st_dev, st.st_ino], "final_size": final_size,
                  "tail_offset": info.ram_end_offset, "created": time.time(),
                  "blocks": [{"name": b.name, "npages": b.npages,
                              "pages_offset": binfo.pages_offset,
                              "bitmap_offset": binfo.bitmap_offset}
                             for b, binfo in zip(blocks, info.blocks)]}
        _write_journal(path, header, blocks, changes, tail)
        jfd = os.open(journal_path(path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            committed = _committed_header(jfd, st)
            if committed is None:
                raise OSError(errno.EIO, f"{journal_path(path)} does not read back whole")
            _replay(fd, jfd, committed)
        finally:
            os.close(jfd)
        os.unlink(journal_path(path))
        _fsync_dir(path)
        released = sum(b.discard() for b in blocks) if release else 0
    finally:
        os.close(fd)
    return SaveResult("", "mapped", sum(b.used_length for b in blocks), 0, written,
                      sum(c[1] for c in counts.values()), unchanged, 0.0, released, sums)


def _compare(fd: int, blocks: List[RAMBlock], info: dict, progress):
    """Per block: which pages changed, which of those hold data, the new bitmap; its
    checksum and page counts.  Also the pages to write, and the data pages kept."""
    changes: Dict[str, Tuple[bytearray, bytearray, bytes]] = {}
    sums: Dict[str, str] = {}
    counts: Dict[str, Tuple[int, int]] = {}
    written = unchanged = 0
    done = 0
    total = sum(b.used_length for b in blocks)
    for block, binfo in zip(blocks, info.blocks):
        nbytes = bitmap_bytes(block.npages)
        present = os.pread(fd, nbytes, binfo.bitmap_offset)
        changed = bytearray(nbytes)
        nonzero = bytearray(nbytes)
        old = mmap.mmap(fd, block.used_length, prot=mmap.PROT_READ,
                        offset=binfo.pages_offset)
        try:
            backend.impl.diff_pages(block.region, old, present, changed, nonzero)
        finally:
            old.close()
        new_present = _or(_and_not(present, changed), _and(changed, nonzero))
        data_pages = _popcount(new_present)
        written += _popcount(_and(changed, nonzero))
        unchanged += _popcount(_and_not(present, changed))
        counts[block.name] = (data_pages, block.npages - data_pages)
        sums[block.name] = _checksum(block)
        changes[block.name] = (changed, nonzero, new_present)
        done += block.used_length
        if progress:
            progress(done, total)
    return changes, sums, counts, written, unchanged


def _popcount(bits: bytes) -> int:
    return bin(int.from_bytes(bits, "little")).count("1")


def _checksum(block: RAMBlock) -> str:
    return checksum(block.region, block.used_length)


def _new_tail(blocks: List[RAMBlock], info: dict, devices, sums, counts) -> bytes:
    """The bytes from the RAM's END section to the end of the file, as they will be."""
    f = channel.buffer_file()
    savevm.put_ram_tail(f, devices.ram_section_id, devices, make_description(
        "mapped", blocks, sums, counts, None, devices))
    f.flush()
    return f.channel.getvalue()


def _write_journal(path: str, header: dict, blocks: List[RAMBlock],
                   changes: Dict[str, Tuple[bytearray, bytearray, bytes]],
                   tail: bytes) -> None:
    jpath = journal_path(path)
    jfd = os.open(jpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                  | os.O_CLOEXEC, 0o600)
    hasher = xxhash.xxh3_64()

    def put(pieces: List) -> None:
        for piece in pieces:
            hasher.update(piece)
        while pieces:
            n = os.writev(jfd, pieces[:IOV_BATCH])
            while pieces and n >= len(pieces[0]):
                n -= len(pieces[0])
                pieces = pieces[1:]
            if n:
                pieces[0] = memoryview(pieces[0])[n:]

    try:
        raw = json.dumps(header).encode()
        put([MAGIC, struct.pack(">I", len(raw)), raw])
        for block in blocks:
            changed, _, new_present = changes[block.name]
            put([bytes(changed), new_present])
        put([struct.pack(">Q", len(tail)), tail])
        for block in blocks:
            changed, nonzero, _ = changes[block.name]
            view = memoryview(block.region)
            runs = backend.impl.bitmap_runs(_and(changed, nonzero), block.npages)
            for i in range(0, len(runs), IOV_BATCH):
                put([view[first * TARGET_PAGE_SIZE:(first + count) * TARGET_PAGE_SIZE]
                     for first, count in runs[i:i + IOV_BATCH]])
        os.fsync(jfd)       # every byte durable before the commit record says so
        trailer = COMMIT + struct.pack(">Q", hasher.intdigest())
        os.write(jfd, trailer)
        os.fsync(jfd)
    except BaseException:
        os.close(jfd)
        os.unlink(jpath)
        raise
    os.close(jfd)
    _fsync_dir(path)

