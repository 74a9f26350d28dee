"""RAM blocks: named, page-aligned regions of guest memory and what backs them.

A :class:`RAMBlock` is QEMU's RAMBlock: a name (``idstr``), a ``used_length``, the page
size of its backing, and the memory itself, which is one of

* private anonymous memory (``RAMBlock.anonymous``) — what a VM's RAM usually is;
* a memfd (``RAMBlock.memfd``) — shareable with another process through its fd;
* a shared file mapping (``RAMBlock.map_file``) — a path in /dev/shm, on hugetlbfs, or
  the memory file of a running VMM (QEMU's ``memory-backend-file,mem-path=...,share=on``),
  so qfram can snapshot RAM that another process owns;
* any writable buffer the caller already has (``RAMBlock.from_buffer``).

Each block discards pages the way its backing needs (the core picks ``MADV_REMOVE`` for
shared/file memory, ``MADV_DONTNEED`` for private).  Page bitmaps — one bit per target page
(4 KiB), least significant bit first, the layout of QEMU's bitmaps on x86 — are made by
:func:`new_bitmap`.
"""
from __future__ import annotations

import mmap
import os
from typing import Dict, Iterator, List, Optional, Tuple

from qfram import backend
from qfram.errors import OptionError
from qfram.wire import HOST_PAGE_SIZE, TARGET_PAGE_SIZE

MFD_HUGETLB = 0x0004
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def bitmap_bytes(npages: int) -> int:
    """Bytes of a page bitmap, rounded up to whole 64-bit words as QEMU's are."""
    return (npages + 63) // 64 * 8


def new_bitmap(npages: int):
    """A writable page bitmap, all clear.  A large one is a private anonymous mapping:
    the kernel gives it memory only where a bit is set, so a bitmap for RAM that a file
    merely declares costs nothing until pages arrive."""
    size = bitmap_bytes(npages)
    if size < (64 << 10):
        return bytearray(size)
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)


def set_bits(bitmap, first: int, count: int, value: bool) -> None:
    """Set (or clear) bits first .. first+count-1 of a page bitmap, whole bytes at once."""
    end = first + count
    while first < end and first & 7:
        _set_bit(bitmap, first, value)
        first += 1
    whole = (end - first) // 8
    if whole:
        bitmap[first // 8:first // 8 + whole] = (b"\xff" if value else b"\x00") * whole
        first += whole * 8
    while first < end:
        _set_bit(bitmap, first, value)
        first += 1


def _set_bit(bitmap, i: int, value: bool) -> None:
    if value:
        bitmap[i >> 3] |= 1 << (i & 7)
    else:
        bitmap[i >> 3] &= ~(1 << (i & 7)) & 0xFF


def memory_available() -> int:
    """The kernel's estimate of memory available for new allocations (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_room() -> Tuple[int, str]:
    """How much RAM a file may declare for new memory: what is available, less a
    margin for everything else, and how to say so."""
    room = memory_available() * 9 // 10
    return room, "this machine has available"


def disk_room(path: str) -> Tuple[int, str]:
    """How much RAM a file may declare for files under ``path``: the free space there."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, f"the free space on {path}"


def fs_block_size(path: str) -> int:
    """The page size of files on ``path``'s filesystem (a hugetlbfs mount's huge page)."""
    st = os.statvfs(path)
    return st.f_bsize


class RAMBlock:
    """A named region of guest RAM.  Use the class methods to make one."""

    def __init__(self, name: str, region, *, kind: str, page_size: int = HOST_PAGE_SIZE,
                 fd: int = -1, path: Optional[str] = None, owns_region: bool = True) -> None:
        encoded = name.encode()
        if not 0 < len(encoded) <= 255:
            raise OptionError(f"a block name holds 1 to 255 bytes, not {len(encoded)}")
        view = memoryview(region)
        if view.readonly:
            raise OptionError(f"block {name!r}: the region must be writable")
        if view.nbytes % TARGET_PAGE_SIZE:
            raise OptionError(f"block {name!r}: {view.nbytes} bytes is not a whole number "
                             f"of {TARGET_PAGE_SIZE}-byte pages")
        self.name = name
        self.region = region
        self.used_length = view.nbytes
        self.page_size = page_size
        self.kind = kind
        self.fd = fd
        self.path = path
        self._owns_region = owns_region

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def anonymous(cls, name: str, size: int, *, huge: bool = True) -> "RAMBlock":
        """Private anonymous memory.  ``huge``: ask for transparent huge pages
        (restoring into them is 2-3x faster than into 4 KiB pages)."""
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge and hasattr(mmap, "MADV_HUGEPAGE"):
            region.madvise(mmap.MADV_HUGEPAGE)
        return cls(name, region, kind="anonymous")

    @classmethod
    def memfd(cls, name: str, size: int, *, hugetlb: bool = False) -> "RAMBlock":
        """A memfd mapped shared; ``block.fd`` can be passed to another process.
        ``hugetlb``: back it with huge pages (needs free hugetlb pages)."""
        fd = os.memfd_create(f"qfram:{name}", MFD_HUGETLB if hugetlb else 0)
        try:
            os.ftruncate(fd, size)
            region = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        page = fs_block_size(f"/proc/self/fd/{fd}") if hugetlb else HOST_PAGE_SIZE
        return cls(name, region, kind="memfd", fd=fd, page_size=page)

    @classmethod
    def map_file(cls, name: str, path: str, size: Optional[int] = None, *,
                 create: bool = False) -> "RAMBlock":
        """Map a memory file shared (/dev/shm, hugetlbfs, a VMM's mem-path).  ``size``
        defaults to the file's; ``create`` makes (or resizes) the file."""
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if size is None:
                size = os.fstat(fd).st_size
            elif create and os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            if size <= 0:
                raise OptionError(f"{path}: an empty memory file")
            region = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, region, kind="file", path=path, page_size=fs_block_size(path))

    @classmethod
    def map_fd(cls, name: str, fd: int, size: int, *, path: Optional[str] = None) -> "RAMBlock":
        """Map the open file ``fd`` shared, sized to ``size`` (e.g. a new file being
        restored into); the fd stays the caller's."""
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        region = mmap.mmap(fd, size)
        return cls(name, region, kind="file", path=path, page_size=HOST_PAGE_SIZE)

    @classmethod
    def from_buffer(cls, name: str, buf) -> "RAMBlock":
        """Any writable buffer the caller already has (not closed by the block)."""
        return cls(name, buf, kind="buffer", owns_region=False)

    # -- memory ---------------------------------------------------------------------------

    @property
    def npages(self) -> int:
        """Target pages (4 KiB) in the block."""
        return self.used_length // TARGET_PAGE_SIZE

    def discard(self, offset: int = 0, length: int = -1) -> int:
        """Give the whole pages of [offset, offset+length) back to the kernel; they
        read as zero afterwards.  Returns the bytes released."""
        return backend.impl.discard(self.region, offset, length)

    def close(self) -> None:
        """Unmap (if the block made the mapping) and close its memfd."""
        if self._owns_region and hasattr(self.region, "close"):
            self.region.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return (f"<RAMBlock {self.name!r} {self.used_length} bytes {self.kind}"
                f"{' page ' + str(self.page_size) if self.page_size != HOST_PAGE_SIZE else ''}>")


class RAMList:
    """An ordered set of RAM blocks with unique names."""

    def __init__(self, blocks: Optional[List[RAMBlock]] = None) -> None:
        self._blocks: Dict[str, RAMBlock] = {}
        for block in blocks or []:
            self.add(block)

    @classmethod
    def from_files(cls, specs: List[str], single_name: str) -> "RAMList":
        """Memory files mapped shared, each spec 'PATH' or 'NAME=PATH'; a lone PATH is
        named ``single_name``, several are named after their files."""
        ram = cls()
        try:
            for spec in specs:
                name, sep, path = spec.partition("=")
                if not sep:
                    name = single_name if len(specs) == 1 else os.path.basename(spec)
                    path = spec
                ram.add(RAMBlock.map_file(name, path))
        except BaseException:
            ram.close()
            raise
        return ram

    def add(self, block: RAMBlock) -> RAMBlock:
        if block.name in self._blocks:
            raise OptionError(f"a block named {block.name!r} is already in the list")
        self._blocks[block.name] = block
        return block

    def get(self, name: str) -> Optional[RAMBlock]:
        return self._blocks.get(name)

    def __getitem__(self, name: str) -> RAMBlock:
        return self._blocks[name]

    def __contains__(self, name: object) -> bool:
        return name in self._blocks

    def __iter__(self) -> Iterator[RAMBlock]:
        return iter(self._blocks.values())

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def total_size(self) -> int:
        return sum(b.used_length for b in self)

    def close(self) -> None:
        for block in self:
            block.close()

    def __enter__(self) -> "RAMList":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RAMList {[b.name for b in self]}>"
