"""The mapped layout: QEMU's mapped-ram.  Every page at a fixed offset (``pages_offset +
offset``, ``pages_offset`` aligned to 1 MiB), zero pages are holes, a bitmap per block
says which pages are present.  Written with pwrite from several threads (GIL released),
optionally with O_DIRECT; updated in place by incremental saves (qfram.snapshot.journal);
read back by reading only the present pages (read_blocks), or mapped copy-on-write
(map_block_private: reset, restore-qemu)."""
from __future__ import annotations

import functools
import os
import queue
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import xxhash

from qfram import backend, wire
from qfram.errors import FormatError
from qfram.format import savevm
from qfram.io import channel
from qfram.io.durable import DurableRelease
from qfram.ram import RAMBlock, bitmap_bytes
from qfram.results import SaveResult
from qfram.snapshot.common import (CHUNK_PAGES, WINDOW_PAGES, Progress, SnapshotInfo,
                                   make_description)
from qfram.wire import TARGET_PAGE_SIZE

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


def save(blocks: List[RAMBlock], fd: int, machine: str, direct: bool,
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


MAX_STALE_RUNS = 4096        # zero-over-stale-bytes mappings one block may need


def map_block_private(fd: int, block: savevm.BlockInfo, info: SnapshotInfo):
    """A mapped snapshot's block, mapped copy-on-write (nothing read until touched, the
    file never written), showing what the snapshot holds: where the bitmap says a page
    is zero but the file still has bytes there — QEMU leaves a page it wrote in an
    earlier pass when the page turns zero, and only clears its bit — anonymous zero
    memory is mapped over them.  qfram leaves holes there (its incremental saves punch
    them), so its own files are not searched (~0.1 s a GiB; their checksums would show
    a file that lied).

    The file may be cut while mapped: a touch past its end is then a SIGBUS, which ends
    the process with status 1 and a line saying which snapshot and page (``_uffd.
    guard_mapping``); ``release_private(region)`` before unmapping it."""
    import mmap
    from qfram import _uffd
    region = mmap.mmap(fd, block.used_length, flags=mmap.MAP_PRIVATE,
                       offset=block.pages_offset)
    _uffd.guard_mapping(region, f"block {block.name} of {info.path}")
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
        release_private(region)
        raise
    return region


def release_private(region) -> None:
    """Unmap what map_block_private mapped (its SIGBUS guard first)."""
    from qfram import _uffd
    _uffd.unguard_mapping(region)
    region.close()


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

