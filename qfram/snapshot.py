"""Snapshot files: guest RAM saved to disk and restored, in two layouts.

* ``stream``: a QEMU migration stream (what ``migrate "exec:cat > FILE"`` writes): page
  records through the core's batch path, ZERO records for zero pages, optionally
  compressed (``zlib``: QEMU's COMPRESS_PAGE; ``lz4``: a qfram extension).
* ``mapped``: QEMU's mapped-ram layout: every page at a fixed offset (``pages_offset +
  offset``, ``pages_offset`` aligned to 1 MiB), zero pages are holes, a bitmap per block
  says which pages are present.  Written with pwrite from several threads (GIL
  released), optionally with O_DIRECT; updated in place by ``incremental`` saves
  (through qfram.journal); restored by reading only the present pages — eagerly, or
  lazily on first touch (qfram.faults).

Every save goes to an unnamed file that is fsync'd and renamed into place
(qfram.io.outputs), so a crash leaves the old snapshot or the new one; with release, pages
go only once durable, and come back if the save fails (qfram.io.durable).  Each block's
xxh3-64 checksum is kept in the VMDESCRIPTION JSON (QEMU's loader ignores it) and checked
on restore; a restore that fails raises and the memory it was writing is not reported
good.
"""
from __future__ import annotations

import fcntl
import functools
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import xxhash

from qfram import wire
from qfram.format import savevm
from qfram.io import channel
from qfram.io import outputs
from qfram import backend
from qfram.errors import FormatError
from qfram.format.vmdesc import Description
from qfram.io.durable import DurableRelease, ReleaseRollbackError  # noqa: F401 (re-exported)
from qfram.format.vmdesc import find_tail as find_description
from qfram.ram import RAMBlock, RAMList, bitmap_bytes, memory_room
from qfram.io.targets import RestoreTarget
from qfram.wire import TARGET_PAGE_SIZE

FORMAT_VERSION = 1
CHUNK_PAGES = 512                 # 2 MiB: hashed, then sent while still in cache
# RAM per PART section in the stream layout; with release, each PART is written, made
# durable (fdatasync) and only then released: tens of MiB keep the syncs few and RSS
# falling as the save goes
PART_BYTES = 32 << 20
WINDOW_PAGES = PART_BYTES // 4096  # the same window for the mapped layout
LEGACY_INCOMPLETE_MAGIC = b"QINC"  # qfram 0.1 marked a file it was updating in place

Progress = Optional[Callable[[int, int], None]]


class _Timed:
    """A result with ``ram_bytes`` moved in ``seconds``: JSON gets the rate too."""

    ram_bytes: int
    seconds: float

    def as_dict(self) -> dict:
        rate = round(self.ram_bytes / self.seconds / 1e9, 3) if self.seconds else None
        return dict(self.__dict__, gbps=rate)


@dataclass
class SaveResult(_Timed):
    path: str
    layout: str
    ram_bytes: int
    file_bytes: int
    pages: int
    zero_pages: int
    unchanged_pages: int
    seconds: float
    released_bytes: int
    checksums: Dict[str, str]
    compression: Optional[str] = None


@dataclass
class LoadResult(_Timed):
    path: str
    layout: str
    ram_bytes: int
    pages: int
    zero_pages: int
    seconds: float
    verified: bool
    blocks: List[dict] = field(default_factory=list)


@dataclass
class SnapshotInfo:
    """What a snapshot or QEMU migration stream holds (``inspect``)."""

    path: str
    file_bytes: int
    layout: str                           # "stream", "mapped" or "chunked"
    machine: str
    capabilities: List[str]
    blocks: List[savevm.BlockInfo]
    devices: List[savevm.DeviceSection]
    sections: List[savevm.Section]        # START, FULL and END sections (PARTs are many)
    commands: List[Tuple[int, int, int]]  # (command, length, offset)
    eof_offset: int
    ram_end_offset: int                   # the RAM's END section (-1: none)
    written_by_qfram: bool
    compression: Optional[str] = None
    created: Optional[str] = None
    vmdescription: bool = False
    description: Optional[Description] = None      # as read (not in as_dict)
    chunked: Optional[object] = None      # a chunked file's index (qfram.chunked)

    @property
    def ram_bytes(self) -> int:
        return sum(b.used_length for b in self.blocks)

    def as_dict(self) -> dict:
        extra = {}
        if self.chunked is not None:
            from qfram import chunked
            extra = chunked.describe(self.chunked)
        return dict({
            "path": self.path, "file_bytes": self.file_bytes,
            "format": "qfram-chunked" if self.chunked is not None
            else "qemu-migration-stream", "layout": self.layout,
            "machine": self.machine, "capabilities": self.capabilities,
            "ram_bytes": self.ram_bytes, "blocks": [b.as_dict() for b in self.blocks],
            "qfram": self.written_by_qfram, "compression": self.compression,
            "created": self.created, "eof_offset": self.eof_offset,
            "ram_end_offset": self.ram_end_offset,
            "sections": [{"type": wire.SECTION_NAMES.get(x.kind, x.kind), "id": x.section_id,
                          "name": x.name, "offset": x.offset} for x in self.sections],
            "devices": [dict(d.__dict__) for d in self.devices],
            "commands": [{"cmd": c, "length": n, "offset": o} for c, n, o in self.commands],
            "vmdescription": self.vmdescription,
        }, **extra)


class ChecksumError(FormatError):
    """The restored memory is not what was saved."""


def check_checksums(ram: RAMList, blocks: List[Tuple[str, int]],
                    description: Optional[Description], what: str = "restored") -> bool:
    """Check each of ``blocks`` (name, used length) in ``ram`` against the checksum the
    snapshot recorded for it.  False when it recorded none; ChecksumError when one
    differs or a block has none."""
    saved = description.blocks if description else {}
    if not saved:
        return False
    for name, used_length in blocks:
        entry = saved.get(name)
        if entry is None or entry.used_length != used_length:
            raise ChecksumError(f"block {name!r} is not described by the snapshot's "
                                f"checksums")
        got = checksum(ram[name].region, used_length)
        if got != entry.xxh3_64:
            raise ChecksumError(f"block {name!r}: {what} contents hash to {got}, the "
                                f"snapshot recorded {entry.xxh3_64}")
    return True


def checksum(region, length: int) -> str:
    """The xxh3-64 of a block's contents, as hex."""
    h = xxhash.xxh3_64()
    view = memoryview(region)[:length]
    for off in range(0, length, 64 << 20):
        h.update(view[off:off + (64 << 20)])
    return h.hexdigest()


def make_description(layout: str, blocks: List[RAMBlock], sums: Dict[str, str],
                 counts: Dict[str, Tuple[int, int]], compression: Optional[str],
                 devices: Optional[savevm.DeviceState]) -> dict:
    return {
        "page_size": TARGET_PAGE_SIZE,
        "devices": devices.description if devices else [],
        "qfram": {
            "format": FORMAT_VERSION, "layout": layout, "checksum": "xxh3_64",
            "compression": compression,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "blocks": [{"name": b.name, "used_length": b.used_length,
                        "xxh3_64": sums[b.name], "pages": counts[b.name][0],
                        "zero_pages": counts[b.name][1]} for b in blocks],
        },
    }


# ---------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------


def save(ram: RAMList, path: str, *, layout: str = "stream", machine: Optional[str] = None,
         release: bool = False, compress: Optional[str] = None, incremental: bool = False,
         direct: bool = False, threads: int = 2, progress: Progress = None,
         devices: Optional[savevm.DeviceState] = None,
         chunk_bytes: int = 64 << 10) -> SaveResult:
    """Save the blocks of ``ram`` to ``path``.

    ``release`` gives pages back to the kernel as the save goes, once their bytes are
    durable in the new file (written and fdatasync'd, every 32 MiB); if the save fails
    before the file is committed, every released page is read back from it first, so
    the RAM ends as it began.  ``compress``: None, "zlib" (QEMU's COMPRESS_PAGE) or
    "lz4" (qfram extension); stream layout only.  ``incremental`` (mapped layout):
    update an existing snapshot of the same blocks in place, writing only the pages that
    changed, through a journal (a crash leaves the old snapshot or the new one).
    ``direct``: write the pages with O_DIRECT (mapped layout).  ``machine``: the machine
    type in the configuration section (default: the device state's, else
    pc-i440fx-7.2).  ``devices``: device sections to carry (from
    ``qemu.device_state``), copied byte for byte before EOF.

    ``layout="chunked"`` (qfram.chunked): ``chunk_bytes`` chunks compressed on their own
    with ``compress`` (lz4, the default, or zstd) on ``threads`` threads — small and
    still random-access, but QEMU cannot load it."""
    if layout not in ("stream", "mapped", "chunked"):
        raise ValueError(f"layout is 'stream', 'mapped' or 'chunked', not {layout!r}")
    if layout == "chunked":
        compress = compress or "lz4"
        if compress not in ("lz4", "zstd") or release or incremental or direct:
            raise ValueError("the chunked layout compresses with lz4 or zstd, and is "
                             "written whole: no release, incremental or direct saves")
    elif compress not in (None, "zlib", "lz4"):
        raise ValueError(f"compression is zlib or lz4, not {compress!r}")
    elif compress and layout != "stream":
        raise ValueError("compression needs the stream or chunked layout (mapped pages "
                         "have fixed offsets)")
    if (incremental or direct) and layout != "mapped":
        raise ValueError("incremental and direct saves need the mapped layout")
    blocks = list(ram)
    if not blocks:
        raise ValueError("nothing to save: the RAM list is empty")
    if machine is None:
        machine = devices.machine if devices else wire.DEFAULT_MACHINE
    t0 = time.perf_counter()
    if incremental and os.path.exists(path):
        from qfram import journal
        result = journal.save_incremental(blocks, path, release, progress)
    else:
        out = outputs.new_file(path)
        releaser = DurableRelease(release)
        try:
            if layout == "chunked":
                result = _save_chunked(blocks, out.fd, machine, compress, threads, devices,
                                       chunk_bytes)
            elif layout == "stream":
                result = _save_stream(blocks, out.fd, machine, compress, progress, devices,
                                      releaser)
            else:
                result = _save_mapped(blocks, out.fd, machine, direct, threads, progress,
                                      devices, releaser)
            out.commit()
        except BaseException as exc:
            try:
                releaser.undo(out.fd, exc, out)
            finally:
                out.abort()
            raise
    result.path = path
    result.seconds = time.perf_counter() - t0
    result.file_bytes = os.path.getsize(path)
    return result


def _save_chunked(blocks: List[RAMBlock], fd: int, machine: str, codec: str,
                  threads: int, devices: Optional[savevm.DeviceState],
                  chunk_bytes: int) -> SaveResult:
    from qfram import chunked
    sums, counts = chunked.save(blocks, fd, codec=codec, chunk_bytes=chunk_bytes,
                                threads=threads, machine=machine, devices=devices)
    return SaveResult("", "chunked", sum(b.used_length for b in blocks), 0,
                      sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values()),
                      0, 0.0, 0, sums, codec)


def _save_stream(blocks: List[RAMBlock], fd: int, machine: str, compress: Optional[str],
                 progress: Progress, devices: Optional[savevm.DeviceState],
                 releaser: DurableRelease) -> SaveResult:
    f = channel.fdopen(fd, "wb", owned=False)
    sid = devices.ram_section_id if devices else wire.RAM_SECTION_ID
    sums: Dict[str, str] = {}
    counts: Dict[str, Tuple[int, int]] = {}
    total = sum(b.used_length for b in blocks)
    done = 0
    savevm.put_header(f, machine)
    savevm.put_ram_setup(f, sid, blocks)
    part_pages = PART_BYTES // TARGET_PAGE_SIZE
    for block in blocks:
        hasher = xxhash.xxh3_64()
        view = memoryview(block.region)
        pages = zeros = 0
        for part in range(0, block.npages, part_pages):
            part_offset = f.tell_fast()
            end = min(part + part_pages, block.npages)
            with savevm.ram_part(f, sid):
                named = True              # each PART names its block again: always valid
                for first in range(part, end, CHUNK_PAGES):
                    count = min(CHUNK_PAGES, end - first)
                    off, length = first * TARGET_PAGE_SIZE, count * TARGET_PAGE_SIZE
                    hasher.update(view[off:off + length])
                    if compress:
                        p, z, _ = savevm.save_pages_compressed(f, block, first, count,
                                                               compress, named)
                    else:
                        p, z, _ = f.save_pages(block.region, first, count, 0,
                                               wire.RAM_SAVE_FLAG_CONTINUE,
                                               idstr=block.name if named else None)
                    named = False
                    pages += p
                    zeros += z
                    done += length
                    if progress:
                        progress(done, total)
            if releaser.enabled:
                # every PART is a release window: written, made durable, then released
                f.flush()
                releaser.written(fd, block, part, end - part,
                                 functools.partial(_reread_part, block=block,
                                                   offset=part_offset),
                                 part_offset, f.tell() - part_offset)
        sums[block.name] = hasher.hexdigest()
        counts[block.name] = (pages, zeros)
    savevm.put_ram_tail(f, sid, devices, make_description("stream", blocks, sums, counts,
                                                          compress, devices))
    f.flush()
    releaser.finish(fd)
    f.close()
    return SaveResult("", "stream", total, 0, sum(c[0] for c in counts.values()),
                      sum(c[1] for c in counts.values()), 0, 0.0, releaser.bytes, sums,
                      compress)


def _reread_part(fd: int, block: RAMBlock, offset: int) -> None:
    """Put the pages of the PART section at ``offset`` back into ``block``."""
    f = channel.fdopen(fd, "rb", owned=False)
    f.set_offset(offset)
    if f.get_byte() != wire.SECTION_PART:
        raise FormatError("the section to read back is not a PART", offset)
    f.get_be32()
    savevm.RAMSectionReader.for_blocks(f, [block]).read_payload()
    f.close()


@dataclass
class _MappedBlock:
    block: RAMBlock
    bitmap_offset: int
    pages_offset: int
    present: bytearray


def _put_mapped_setup(f, blocks: List[RAMBlock], machine: str, sid: int) -> List[_MappedBlock]:
    """Header, configuration and the ram START section with a mapped-ram header per
    block; the file position jumps past each block's pages, as QEMU's does."""
    layout: List[_MappedBlock] = []

    def mapped_header(f, block: RAMBlock) -> None:
        bitmap_offset = f.tell_fast() + wire.MAPPED_RAM_HEADER.size
        size = bitmap_bytes(block.npages)
        pages_offset = savevm.align_up(bitmap_offset + size, wire.MAPPED_RAM_ALIGN)
        f.put_buffer(wire.MAPPED_RAM_HEADER.pack(wire.MAPPED_RAM_VERSION, TARGET_PAGE_SIZE,
                                                 bitmap_offset, pages_offset))
        f.set_offset(pages_offset + block.used_length)
        layout.append(_MappedBlock(block, bitmap_offset, pages_offset, bytearray(size)))

    # QEMU 9+ validates the capability list against its own: mapped-ram must be named
    savevm.put_header(f, machine, capabilities=("mapped-ram",))
    savevm.put_ram_setup(f, sid, blocks, mapped_header)
    return layout


def _put_mapped_end(f, layout: List[_MappedBlock], sums, counts, sid: int,
                    devices: Optional[savevm.DeviceState]) -> None:
    fd = f.channel.fd
    for mb in layout:
        os.pwrite(fd, mb.present, mb.bitmap_offset)
    blocks = [mb.block for mb in layout]
    savevm.put_ram_tail(f, sid, devices, make_description("mapped", blocks, sums, counts,
                                                          None, devices))
    f.flush()
    os.ftruncate(fd, f.tell())


def _write_blocks(layout: List[_MappedBlock], fd: int, threads: int, progress: Progress,
                  releaser: DurableRelease) -> Tuple[Dict[str, str], Dict[str, Tuple[int, int]]]:
    """Hash each chunk in order here, write it on worker threads (GIL released in the
    core), each chunk at its fixed offset.  Chunks are 64-page aligned, so the workers
    never share a byte of the bitmaps.  With release, the workers are waited for every
    window; the window is made durable, then released."""
    work: "queue.Queue[Optional[Tuple[_MappedBlock, int, int]]]" = queue.Queue(maxsize=64)
    per_block: Dict[str, List[int]] = {mb.block.name: [0, 0] for mb in layout}
    errors: List[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            item = work.get()
            try:
                if item is None:
                    return
                mb, first, count = item
                if errors:
                    continue
                w, z, _, _ = backend.impl.write_pages_at(
                    fd, mb.block.region, mb.pages_offset, mb.present, first, count)
                with lock:
                    per_block[mb.block.name][0] += w
                    per_block[mb.block.name][1] += z
            except BaseException as exc:
                errors.append(exc)
            finally:
                work.task_done()

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, threads))]
    for t in pool:
        t.start()
    sums: Dict[str, str] = {}
    total = sum(mb.block.used_length for mb in layout)
    done = 0
    chunk = CHUNK_PAGES * 8                     # 16 MiB per work item
    try:
        for mb in layout:
            hasher = xxhash.xxh3_64()
            view = memoryview(mb.block.region)
            for window in range(0, mb.block.npages, WINDOW_PAGES):
                window_end = min(window + WINDOW_PAGES, mb.block.npages)
                for first in range(window, window_end, chunk):
                    count = min(chunk, window_end - first)
                    hasher.update(view[first * TARGET_PAGE_SIZE:
                                       (first + count) * TARGET_PAGE_SIZE])
                    work.put((mb, first, count))
                    done += count * TARGET_PAGE_SIZE
                    if progress:
                        progress(done, total)
                if errors:
                    break
                if releaser.enabled:
                    work.join()
                    if errors:
                        break
                    releaser.written(fd, mb.block, window, window_end - window,
                                     functools.partial(_reread_window, mb=mb, first=window,
                                                       count=window_end - window),
                                     mb.pages_offset + window * TARGET_PAGE_SIZE,
                                     (window_end - window) * TARGET_PAGE_SIZE)
            sums[mb.block.name] = hasher.hexdigest()
            if errors:
                break
    finally:
        for _ in pool:
            work.put(None)
        for t in pool:
            t.join()
    if errors:
        raise errors[0]
    counts = {name: (v[0], v[1]) for name, v in per_block.items()}
    return sums, counts


def _reread_window(fd: int, mb: _MappedBlock, first: int, count: int) -> None:
    """Put pages [first, first+count) of a mapped block back from the file."""
    backend.impl.read_pages_at(fd, mb.block.region, mb.pages_offset, mb.present, first, count)


def _save_mapped(blocks: List[RAMBlock], fd: int, machine: str, direct: bool,
                 threads: int, progress: Progress, devices: Optional[savevm.DeviceState],
                 releaser: DurableRelease) -> SaveResult:
    f = channel.fdopen(fd, "wb", owned=False)
    sid = devices.ram_section_id if devices else wire.RAM_SECTION_ID
    layout = _put_mapped_setup(f, blocks, machine, sid)
    page_fd = fd
    if direct:
        # the same (possibly unnamed) file, opened again for O_DIRECT page writes
        page_fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        sums, counts = _write_blocks(layout, page_fd, threads, progress, releaser)
    finally:
        if page_fd != fd:
            os.close(page_fd)
    _put_mapped_end(f, layout, sums, counts, sid, devices)
    releaser.finish(fd)
    f.close()
    total = sum(b.used_length for b in blocks)
    return SaveResult("", "mapped", total, 0, sum(c[0] for c in counts.values()),
                      sum(c[1] for c in counts.values()), 0, 0.0, releaser.bytes, sums)


def devices_of(fd: int, info: SnapshotInfo) -> savevm.DeviceState:
    """The device sections a mapped file already holds (kept by incremental saves)."""
    parts = [os.pread(fd, d.end - d.offset, d.offset) for d in info.devices]
    ram_ids = [x.section_id for x in info.sections if x.name == wire.RAM_SECTION]
    return savevm.DeviceState(info.machine, ram_ids[0] if ram_ids else wire.RAM_SECTION_ID,
                              b"".join(parts), [])


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------


def open_locked(path: str) -> int:
    """The snapshot open read-only with a shared lock (incremental saves wait while it
    is held), after finishing or dropping an interrupted incremental save."""
    from qfram import journal
    journal.recover(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_head(path: str, fd: int) -> Tuple[Optional[Description], int, int]:
    """The description (from the end of the file), the file size, and where the
    description starts (-1: none)."""
    if os.pread(fd, 4, 0) == LEGACY_INCOMPLETE_MAGIC:
        raise FormatError(f"{path}: an incremental save of qfram 0.1 into this snapshot "
                          f"was interrupted; it is incomplete", 0)
    size = os.fstat(fd).st_size
    description, where = find_description(fd, size)
    return description, size, where


def _check_tail(info: savevm.StreamInfo, size: int, where: int) -> None:
    """After EOF comes nothing, or a whole VMDESCRIPTION: anything else is a cut or
    damaged file, even if the RAM itself was all there."""
    after_eof = info.eof_offset + 1
    if size > after_eof and where != after_eof:
        raise FormatError("the bytes after EOF are not a complete VMDESCRIPTION (the file "
                          "is cut or damaged)", after_eof)


def inspect(path: str) -> SnapshotInfo:
    """What a snapshot or any QEMU migration stream (or mapped-ram file) holds: machine,
    capabilities, RAM blocks with sizes, page counts by kind (normal/zero/absent) and
    checksums, device sections with their byte ranges (names from the VMDESCRIPTION
    where present), commands.  Page data is checked and counted, not loaded."""
    fd = open_locked(path)
    try:
        return inspect_fd(path, fd)
    finally:
        os.close(fd)


def inspect_fd(path: str, fd: int) -> SnapshotInfo:
    """inspect() of a snapshot already open (and locked) as ``fd``."""
    from qfram import chunked
    if chunked.is_chunked(fd):
        return _inspect_chunked(path, chunked.read(fd, path))
    description, size, where = _read_head(path, fd)
    f = channel.fdopen(fd, "rb", owned=False)
    info = savevm.StreamInfo()

    def mapped_block(block: savevm.BlockInfo, pos: int) -> None:
        block.pages = savevm.count_bits(savevm.read_present(fd, block, pos))
        block.zero_pages = block.npages - block.pages

    scanner = savevm.FooterScanner(fd, size, description)
    savevm.StreamReader(f, info, on_section=scanner, mapped_block=mapped_block,
                        file_size=size).read()
    f.close()
    _check_tail(info, size, where)
    facts = description.blocks if description else {}
    for b in info.blocks.values():
        b.xxh3_64 = facts[b.name].xxh3_64 if b.name in facts else None
    for d in scanner.ranges:
        d.vmsd_name = description.vmsd_name(d.name, d.instance) if description else None
    q = description.qfram if description else {}
    return SnapshotInfo(
        path, size, "mapped" if info.mapped else "stream", info.machine,
        info.capabilities, list(info.blocks.values()), scanner.ranges, info.sections,
        info.commands, info.eof_offset,
        next((s.offset for s in info.sections if s.kind == wire.SECTION_END
              and s.name == wire.RAM_SECTION), -1),
        bool(q), q.get("compression"), q.get("created"), where >= 0, description)


def _inspect_chunked(path: str, cf) -> SnapshotInfo:
    from qfram import chunked
    q = cf.description.qfram
    info = SnapshotInfo(path, cf.size, "chunked", cf.machine, [], chunked.block_infos(cf),
                        [], [], [], -1, -1, True, cf.codec, q.get("created"), False,
                        cf.description, cf)
    return info


def load(path: str, ram: Optional[RAMList] = None, *, verify: bool = True,
         threads: int = 2, huge: bool = True, zeroed: bool = False,
         force: bool = False) -> Tuple[RAMList, LoadResult]:
    """Restore a snapshot (either layout) into ``ram`` — blocks matched by name and
    length — or into new private anonymous blocks.  ``zeroed``: the caller's blocks are
    known to be all zero (new memory), so zero pages are not even read.  With ``verify``
    every block's checksum is checked when the snapshot has one.  Any error raises;
    memory it was writing must then be considered garbage.

    What the file declares costs nothing until real bytes back it: new memory is
    refused when the snapshot declares more RAM than the machine has available (unless
    ``force``), page bitmaps take memory only where pages arrive, and new blocks get
    transparent huge pages (``huge``: 2-3x faster to fill) only while the file holds
    enough data to fill them — else a few scattered pages would each take 2 MiB."""
    t0 = time.perf_counter()
    from qfram import chunked
    fd = open_locked(path)
    if chunked.is_chunked(fd):
        try:
            ram, cf = chunked.load(fd, path, ram, threads=threads, zeroed=zeroed,
                                   force=force)
        finally:
            os.close(fd)
        blocks = [b.as_dict() for b in chunked.block_infos(cf)]
        return ram, LoadResult(path, "chunked", sum(b["used_length"] for b in blocks),
                               sum(b["pages"] for b in blocks),
                               sum(b["zero_pages"] for b in blocks),
                               time.perf_counter() - t0, True, blocks)
    try:
        description, size, where = _read_head(path, fd)
    except BaseException:
        os.close(fd)
        raise
    target = RestoreTarget(ram, fresh=zeroed, huge_budget=2 * size if huge else 0)
    try:
        def mapped_block(binfo: savevm.BlockInfo, pos: int) -> None:
            present = savevm.read_present(fd, binfo, pos)
            pages, zeros = read_blocks(fd, target.ram[binfo.name], binfo.pages_offset,
                                       present, target.touched.get(binfo.name), threads)
            binfo.pages, binfo.zero_pages = pages, zeros

        f = channel.fdopen(fd, "rb", owned=False)
        info = savevm.StreamReader(f, on_section=savevm.FooterScanner(fd, size, description),
                                   mapped_block=mapped_block, file_size=size,
                                   max_ram=None if force or not target.created
                                   else memory_room(), **target.reader_options).read()
        f.close()
        _check_tail(info, size, where)
        if not info.blocks:
            raise FormatError(f"{path}: the stream holds no RAM", 0)
        verified = check_checksums(target.ram, [(b.name, b.used_length)
                                                for b in info.blocks.values()],
                                   description) if verify else False
    except BaseException:
        target.close_new()
        raise
    finally:
        os.close(fd)
    blocks = [b.as_dict() for b in info.blocks.values()]
    result = LoadResult(path, "mapped" if info.mapped else "stream",
                        sum(b.used_length for b in info.blocks.values()),
                        sum(b.pages for b in info.blocks.values()),
                        sum(b.zero_pages for b in info.blocks.values()),
                        time.perf_counter() - t0, verified, blocks)
    return target.ram, result


MAX_STALE_RUNS = 4096        # zero-over-stale-bytes mappings one block may need


def map_block_private(fd: int, block: savevm.BlockInfo, info: SnapshotInfo):
    """A mapped snapshot's block, mapped copy-on-write (nothing read until touched, the
    file never written), showing what the snapshot holds: where the bitmap says a page
    is zero but the file still has bytes there — QEMU leaves a page it wrote in an
    earlier pass when the page turns zero, and only clears its bit — anonymous zero
    memory is mapped over them.  qfram leaves holes there (its incremental saves punch
    them), so its own files are not searched (~0.1 s a GiB; their checksums would show
    a file that lied)."""
    import mmap
    region = mmap.mmap(fd, block.used_length, flags=mmap.MAP_PRIVATE,
                       offset=block.pages_offset)
    if info.written_by_qfram:
        return region
    try:
        absent = savevm.read_present(fd, block, block.bitmap_offset).translate(_INVERT)
        stale = []
        pos, end = block.pages_offset, block.pages_offset + block.used_length
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:             # ENXIO: no data past pos
                break
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            first = (data - block.pages_offset) // TARGET_PAGE_SIZE
            last = min(block.npages, -(-(hole - block.pages_offset) // TARGET_PAGE_SIZE))
            stale += backend.impl.bitmap_runs(absent, last, first)
            if len(stale) > MAX_STALE_RUNS:
                raise FormatError(f"block {block.name!r}: more than {MAX_STALE_RUNS} runs "
                                  f"of pages the bitmap calls zero hold bytes in the "
                                  f"file; `qfram rewrite` it into a clean one",
                                  block.pages_offset)
            pos = hole
        for first, count in stale:
            _map_zeros(region, first * TARGET_PAGE_SIZE, count * TARGET_PAGE_SIZE)
    except BaseException:
        region.close()
        raise
    return region


_INVERT = bytes(~b & 0xFF for b in range(256))


def _map_zeros(region, offset: int, length: int) -> None:
    """Private anonymous (zero) memory in place of region[offset:offset+length]."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    anchor = ctypes.c_char.from_buffer(region)
    addr = ctypes.addressof(anchor) + offset
    del anchor                      # (an export would keep the mmap from closing)
    got = libc.mmap(addr, length, mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10,        # MAP_FIXED
                    -1, 0)
    if got != addr:
        err = ctypes.get_errno()
        raise OSError(err, f"mapping zeros over stale snapshot bytes: {os.strerror(err)}")


def read_blocks(fd: int, block: RAMBlock, pages_offset: int, present: bytes,
                touched, threads: int) -> Tuple[int, int]:
    """Read a mapped block's present pages on worker threads, 64-page aligned ranges."""
    npages = block.npages
    per = max(64, (npages // max(1, threads) + 63) // 64 * 64)
    ranges = [(first, min(per, npages - first)) for first in range(0, npages, per)]
    results: List[Tuple[int, int]] = []
    errors: List[BaseException] = []

    def run(first: int, count: int) -> None:
        try:
            results.append(backend.impl.read_pages_at(fd, block.region, pages_offset, present,
                                                   first, count, touched=touched))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run, args=r) for r in ranges[1:]]
    for t in workers:
        t.start()
    run(*ranges[0])
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
    return sum(r[0] for r in results), sum(r[1] for r in results)


