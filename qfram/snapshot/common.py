"""The floor every snapshot layout stands on: what a snapshot holds (SnapshotInfo), the
description each one carries (block checksums, page counts, device state), the head
and tail checks of a QEMU migration file, and the checksums a restore is checked with.

Nothing here knows a layout's page format; each layout (stream, mapped, chunked) calls
down into it, never the other way round.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import xxhash

from qfram import wire
from qfram.errors import ChecksumError, FormatError
from qfram.format import savevm
from qfram.format.vmdesc import Description
from qfram.format.vmdesc import find_tail as find_description
from qfram.ram import RAMBlock, RAMList
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
    chunked: Optional[Any] = None         # a chunked file's index (a ChunkedFile)

    @property
    def ram_bytes(self) -> int:
        return sum(b.used_length for b in self.blocks)

    def as_dict(self) -> dict:
        extra = self.chunked.describe() if self.chunked is not None else {}
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


def devices_of(fd: int, info: SnapshotInfo) -> savevm.DeviceState:
    """The device sections a mapped file already holds (kept by incremental saves)."""
    parts = [os.pread(fd, d.end - d.offset, d.offset) for d in info.devices]
    ram_ids = [x.section_id for x in info.sections if x.name == wire.RAM_SECTION]
    return savevm.DeviceState(info.machine, ram_ids[0] if ram_ids else wire.RAM_SECTION_ID,
                              b"".join(parts), [])


def read_head(path: str, fd: int) -> Tuple[Optional[Description], int, int]:
    """The description (from the end of the file), the file size, and where the
    description starts (-1: none)."""
    if os.pread(fd, 4, 0) == LEGACY_INCOMPLETE_MAGIC:
        raise FormatError(f"{path}: an incremental save of qfram 0.1 into this snapshot "
                          f"was interrupted; it is incomplete", 0)
    size = os.fstat(fd).st_size
    description, where = find_description(fd, size)
    return description, size, where


def check_tail(info: savevm.StreamInfo, size: int, where: int) -> None:
    """After EOF comes nothing, or a whole VMDESCRIPTION: anything else is a cut or
    damaged file, even if the RAM itself was all there."""
    after_eof = info.eof_offset + 1
    if size > after_eof and where != after_eof:
        raise FormatError("the bytes after EOF are not a complete VMDESCRIPTION (the file "
                          "is cut or damaged)", after_eof)

