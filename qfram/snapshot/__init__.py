"""Snapshot files: guest RAM saved to disk and restored, in three layouts, peers of one
another (this module is the only place that chooses between them):

* ``stream`` (qfram.snapshot.stream): a QEMU migration stream, page records one after
  the other, optionally compressed;
* ``mapped`` (qfram.snapshot.mapped): QEMU's mapped-ram, every page at a fixed offset,
  zero pages as holes; updated in place by ``incremental`` saves (qfram.snapshot.journal);
* ``chunked`` (qfram.snapshot.chunked): qfram's compressed, random-access chunks.

Both QEMU layouts are read by one walk (qfram.snapshot.reader); what every layout shares
(description, checksums, SnapshotInfo) is qfram.snapshot.common.  Lazy restore of the
mapped and chunked layouts is qfram.lazy's.

Every save goes to an unnamed file that is fsync'd and renamed into place
(qfram.io.outputs), so a crash leaves the old snapshot or the new one; with release,
pages go only once durable, and come back if the save fails (qfram.io.durable).  Each
block's xxh3-64 checksum is kept in the description and checked on restore; a restore
that fails raises and the memory it was writing is not reported good.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Tuple

from qfram.errors import ChecksumError, OptionError, ReleaseRollbackError
from qfram.format import savevm
from qfram.io import outputs
from qfram.io.durable import DurableRelease
from qfram.ram import RAMList
from qfram.results import Codec, Layout, LoadResult, SaveResult
from qfram.snapshot import chunked, journal, mapped, reader, stream
from qfram.snapshot.common import (Progress, SnapshotInfo, check_checksums, checksum,
                                   devices_of, make_description)
from qfram.snapshot.journal import open_locked
from qfram.snapshot.mapped import map_block_private, read_blocks, release_private
from qfram.wire import DEFAULT_MACHINE

__all__ = ["save", "load", "inspect", "inspect_fd", "open_locked", "SnapshotInfo",
           "SaveResult", "LoadResult", "ChecksumError", "ReleaseRollbackError",
           "DurableRelease", "check_checksums", "checksum", "devices_of", "device_state",
           "make_description", "map_block_private", "read_blocks", "release_private"]

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
    ``device_state``), copied byte for byte before EOF.

    ``layout="chunked"`` (qfram.snapshot.chunked): ``chunk_bytes`` chunks compressed on
    their own with ``compress`` (lz4, the default, or zstd) on ``threads`` threads —
    small and still random-access, but QEMU cannot load it."""
    layout, compress = _check_save_options(layout, compress, release, incremental, direct)
    blocks = list(ram)
    if not blocks:
        raise OptionError("nothing to save: the RAM list is empty")
    if machine is None:
        machine = devices.machine if devices else DEFAULT_MACHINE
    t0 = time.perf_counter()
    if incremental and os.path.exists(path):
        result = journal.save_incremental(blocks, path, release, progress)
    else:
        out = outputs.new_file(path)
        releaser = DurableRelease(release)
        try:
            if layout is Layout.CHUNKED:
                result = chunked.save(blocks, out.fd, codec=compress, chunk_bytes=chunk_bytes,
                                      threads=threads, machine=machine, devices=devices,
                                      progress=progress)
            elif layout is Layout.STREAM:
                result = stream.save(blocks, out.fd, machine, compress, progress, devices,
                                     releaser)
            else:
                result = mapped.save(blocks, out.fd, machine, direct, threads, progress,
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


def _check_save_options(layout, compress, release: bool, incremental: bool,
                        direct: bool) -> Tuple[Layout, Optional[str]]:
    """The layout and codec a save uses, or why these options cannot go together."""
    try:
        layout = Layout(layout)
    except ValueError:
        raise OptionError(f"layout is 'stream', 'mapped' or 'chunked', not {layout!r}") \
            from None
    if compress is not None:
        try:
            compress = Codec(compress).value
        except ValueError:
            raise OptionError(f"compression is zlib, lz4 or zstd, not {compress!r}") \
                from None
    if layout is Layout.CHUNKED:
        compress = compress or Codec.LZ4.value
        if compress not in chunked.CODECS or release or incremental or direct:
            raise OptionError("the chunked layout compresses with lz4 or zstd, and is "
                              "written whole: no release, incremental or direct saves")
    elif compress not in (None, "zlib", "lz4"):
        raise OptionError(f"compression is zlib or lz4, not {compress!r}")
    elif compress and layout is not Layout.STREAM:
        raise OptionError("compression needs the stream or chunked layout (mapped pages "
                          "have fixed offsets)")
    if (incremental or direct) and layout is not Layout.MAPPED:
        raise OptionError("incremental and direct saves need the mapped layout")
    return layout, compress


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
    if chunked.is_chunked(fd):
        return chunked.inspect(path, chunked.read(fd, path))
    return reader.inspect_fd(path, fd)


def device_state(path: str) -> savevm.DeviceState:
    """What a snapshot (or QEMU stream) holds besides RAM: its device sections, byte for
    byte, the machine type and the RAM's section id — to carry into another snapshot."""
    fd = open_locked(path)
    try:
        info = inspect_fd(path, fd)
        if info.chunked is not None:
            return chunked.device_state(info.chunked)
        state = devices_of(fd, info)
    finally:
        os.close(fd)
    state.description = info.description.devices if info.description else []
    return state


def load(path: str, ram: Optional[RAMList] = None, *, verify: bool = True,
         threads: int = 2, huge: bool = True, zeroed: bool = False,
         force: bool = False) -> Tuple[RAMList, LoadResult]:
    """Restore a snapshot (any layout) into ``ram`` — blocks matched by name and
    length — or into new private anonymous blocks.  ``zeroed``: the caller's blocks are
    known to be all zero (new memory), so zero pages are not even read.  With ``verify``
    every block's checksum is checked when the snapshot has one.  Any error raises;
    memory it was writing must then be considered garbage.

    What the file declares costs nothing until real bytes back it: new memory is
    refused when the snapshot declares more RAM than the machine has available (unless
    ``force``), page bitmaps take memory only where pages arrive, and new blocks get
    transparent huge pages (``huge``: 2-3x faster to fill) only while the file holds
    enough data to fill them — else a few scattered pages would each take 2 MiB."""
    fd = open_locked(path)
    try:
        if chunked.is_chunked(fd):
            return chunked.load_snapshot(fd, path, ram, verify=verify, threads=threads,
                                         zeroed=zeroed, force=force)
        return reader.load_fd(path, fd, ram, verify=verify, threads=threads, huge=huge,
                              zeroed=zeroed, force=force)
    finally:
        os.close(fd)
