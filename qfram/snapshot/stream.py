"""The stream layout: a QEMU migration stream (what ``migrate "exec:cat > FILE"``
writes) — page records through the core's batch path, ZERO records for zero pages,
optionally compressed (``zlib``: QEMU's COMPRESS_PAGE; ``lz4``: a qfram extension).
With release, every PART section is a window: written, made durable, then released
(qfram.io.durable).  Reading it back is qfram.snapshot.reader's (one walk reads both
QEMU layouts)."""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import xxhash

from qfram import wire
from qfram.errors import FormatError
from qfram.format import savevm
from qfram.io import channel
from qfram.io.durable import DurableRelease
from qfram.ram import RAMBlock
from qfram.results import SaveResult
from qfram.snapshot.common import CHUNK_PAGES, PART_BYTES, Progress, make_description
from qfram.wire import TARGET_PAGE_SIZE

def save(blocks: List[RAMBlock], fd: int, machine: str, compress: Optional[str],
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

