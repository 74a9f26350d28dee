"""Reading a QEMU migration file, either layout: both are one format (mapped-ram is a
migration stream whose blocks sit at fixed offsets), so one walk of the stream reads
either — what it holds (inspect_fd) or its RAM (load_fd), handing a mapped block's
pages to qfram.snapshot.mapped.read_blocks."""
from __future__ import annotations

import time
from typing import Optional, Tuple

from qfram import wire
from qfram.errors import FormatError
from qfram.format import savevm
from qfram.io import channel
from qfram.io.targets import RestoreTarget
from qfram.ram import RAMList, memory_room
from qfram.results import LoadResult
from qfram.snapshot.common import SnapshotInfo, check_checksums, check_tail, read_head
from qfram.snapshot.mapped import read_blocks

def inspect_fd(path: str, fd: int) -> SnapshotInfo:
    """What the QEMU migration file open (and locked) as ``fd`` holds; its pages are
    checked and counted, not loaded."""
    description, size, where = read_head(path, fd)
    f = channel.fdopen(fd, "rb", owned=False)
    info = savevm.StreamInfo()

    def mapped_block(block: savevm.BlockInfo, pos: int) -> None:
        block.pages = savevm.count_bits(savevm.read_present(fd, block, pos))
        block.zero_pages = block.npages - block.pages

    scanner = savevm.FooterScanner(fd, size, description)
    savevm.StreamReader(f, info, on_section=scanner, mapped_block=mapped_block,
                        file_size=size).read()
    f.close()
    check_tail(info, size, where)
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


def load_fd(path: str, fd: int, ram: Optional[RAMList] = None, *, verify: bool = True,
            threads: int = 2, huge: bool = True, zeroed: bool = False,
            force: bool = False) -> Tuple[RAMList, LoadResult]:
    """Restore the QEMU migration file open as ``fd`` (see qfram.snapshot.load)."""
    t0 = time.perf_counter()
    description, size, where = read_head(path, fd)
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
        check_tail(info, size, where)
        if not info.blocks:
            raise FormatError(f"{path}: the stream holds no RAM", 0)
        verified = check_checksums(target.ram, [(b.name, b.used_length)
                                                for b in info.blocks.values()],
                                   description) if verify else False
    except BaseException:
        target.close_new()
        raise
    blocks = [b.as_dict() for b in info.blocks.values()]
    result = LoadResult(path, "mapped" if info.mapped else "stream",
                        sum(b.used_length for b in info.blocks.values()),
                        sum(b.pages for b in info.blocks.values()),
                        sum(b.zero_pages for b in info.blocks.values()),
                        time.perf_counter() - t0, verified, blocks)
    return target.ram, result
