"""Where a stream's RAM blocks land when it is read: the one resolver that snapshot.load,
qemu.streams.extract and the postcopy destination share.

A stream names its blocks as it goes (each with a used length, at a byte offset).  A
:class:`RestoreTarget` answers each with the RAMBlock to place its pages in — the
caller's own block (matched by name and length), or a new one: private anonymous memory
(with transparent huge pages only while the file holds enough data to fill them: a
scattered page would otherwise take 2 MiB), or a new file that appears only when the
caller commits (:class:`~qfram.io.outputs.BlockFiles`).  It also keeps the page bitmaps the
record parser fills (``touched``: the memory was written; ``received``: the page
arrived), which cost nothing until pages arrive.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from qfram.errors import FormatError, TooLarge
from qfram.io.outputs import BlockFiles
from qfram.ram import RAMBlock, RAMList, disk_room, new_bitmap
from qfram.wire import TARGET_PAGE_SIZE


class RestoreTarget:
    """Resolves a stream's blocks.

    ``ram``: the caller's blocks; a block the stream names must be there with the same
    length (``fresh``: they are new zero memory, so a zero page needs no write).
    Without ``ram`` new blocks are made: in new ``files`` when given (anonymous memory
    first when it fits ``memory_budget``, written out by the caller), else anonymous
    memory.  ``huge_budget``: bytes of new anonymous blocks that may use transparent
    huge pages.  ``track_received``: keep the bitmap of pages that arrived.
    ``max_bytes``: new blocks may add up to this much (a stream that declares more is
    refused before anything is mapped)."""

    def __init__(self, ram: Optional[RAMList] = None, *, fresh: bool = False,
                 files: Optional[BlockFiles] = None, huge_budget: int = 0,
                 memory_budget: Optional[int] = None, track_received: bool = False,
                 max_bytes: Optional[int] = None) -> None:
        self.created = ram is None
        self.ram = RAMList() if ram is None else ram
        self.fresh = fresh or self.created
        self.files = files
        self.huge_budget = huge_budget
        self.memory_budget = memory_budget
        self.track_received = track_received
        self.max_bytes = max_bytes
        self.new_bytes = 0
        self.touched: Dict[str, object] = {}
        self.received: Dict[str, object] = {}

    def resolve(self, name: str, length: int, offset: int) -> RAMBlock:
        block = self.ram.get(name)
        if block is None:
            if not self.created:
                raise FormatError(f"the stream has block {name!r}, the target RAM has no "
                                  f"such block", offset)
            if self.max_bytes is not None and self.new_bytes + length > self.max_bytes:
                raise FormatError(f"block {name!r} would bring the RAM to "
                                  f"{self.new_bytes + length} bytes; at most "
                                  f"{self.max_bytes} are allowed here (--max-ram)", offset)
            self.new_bytes += length
            block = self.ram.add(self._new_block(name, length, offset))
        elif block.used_length != length:
            raise FormatError(f"block {name!r} is {length:#x} bytes in the stream, "
                              f"{block.used_length:#x} in the target", offset)
        if self.fresh:
            self.touched[name] = new_bitmap(length // TARGET_PAGE_SIZE)
        if self.track_received:
            self.received[name] = new_bitmap(length // TARGET_PAGE_SIZE)
        return block

    def _new_block(self, name: str, length: int, offset: int) -> RAMBlock:
        in_memory = self.memory_budget is None or length <= self.memory_budget
        if self.files is not None:
            out = self.files.new(name, offset)
            if not (in_memory and length <= self.huge_budget):
                return RAMBlock.map_fd(name, out.fd, length, path=out.path)
        if self.memory_budget is not None:
            self.memory_budget -= length
        huge = length <= self.huge_budget
        if huge:
            self.huge_budget -= length
        return RAMBlock.anonymous(name, length, huge=huge)

    @property
    def reader_options(self) -> dict:
        """What a stream reader needs to place pages here."""
        return {"resolve": self.resolve, "touched": self.touched, "received": self.received}

    def close_new(self) -> None:
        """Unmap the blocks this target made (after a failure, or once written out)."""
        if self.created:
            self.ram.close()


def new_block_files(blocks: List[Tuple[str, int]], target: str, what: str,
                    force: bool = False, *,
                    directory: bool = False) -> Tuple[RAMList, BlockFiles]:
    """New memory files to restore ``blocks`` (name, used length) into: ``target``
    itself for one block (unless ``directory``), else a directory with a file per block
    (names with '/' become folders, never outside it).  They appear only on the files'
    commit(), once the restore is verified.  More RAM than the disk has free is refused
    unless ``force`` (``what`` names the source in the message)."""
    files = BlockFiles(target, single=len(blocks) == 1 and not directory)
    ram = RAMList()
    try:
        room, where = disk_room(files.root.path)
        total = sum(length for _, length in blocks)
        if not force and total > room:
            raise TooLarge(f"{what} declares {total / 2**30:.2f} GiB of RAM, more than "
                           f"{where} ({room / 2**30:.2f} GiB); --force to try anyway", 0)
        for name, length in blocks:
            out = files.new(name)
            ram.add(RAMBlock.map_fd(name, out.fd, length, path=out.path))
    except BaseException:
        ram.close()
        files.abort()
        raise
    return ram, files
