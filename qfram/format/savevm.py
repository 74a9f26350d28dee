"""QEMU's migration stream format: the savevm framing and the RAM section in it.

Writing follows QEMU (savevm.c, ram.c, section version 4) so that QEMU's own loader and
tools accept the result; reading treats every input as hostile: every length, offset and
block name is checked before a byte is written, and a bad stream stops with a
:class:`~qfram.errors.FormatError` naming its byte offset.

Layout of a stream::

    be32 "QEVM", be32 3
    CONFIGURATION (0x07): be32 len + machine name [+ subsections 0x05]
    START (0x01) "ram" v4: be64 total|MEM_SIZE, per block (counted idstr, be64 length
          [+ mapped-ram header]), EOS; FOOTER
    PART (0x02): page records ..., EOS; FOOTER        (stream layout only)
    END (0x03): EOS; FOOTER
    [FULL (0x04) device sections]
    EOF (0x00)
    VMDESCRIPTION (0x06): be32 len + JSON (QEMU's loader ignores it; qfram keeps its
          checksums there)

A page record is ``be64 offset|flags``; without CONTINUE a counted block name follows;
then ZERO: one 0 byte, PAGE: the page, COMPRESS_PAGE: be32 len + zlib data, and — a
qfram extension QEMU refuses cleanly as an unknown flag — QFRAM_CODEC: u8 codec, be32
len, data.
"""
from __future__ import annotations

import os
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from qfram import backend
from qfram.format.vmdesc import Description
from qfram.format.vmdesc import encode as encode_description
from qfram.errors import FormatError, TooLarge
from qfram.ram import RAMBlock, bitmap_bytes, set_bits
from qfram.wire import (CODECS, CODEC_LZ4, MAPPED_RAM_ALIGN, MAPPED_RAM_HEADER,
                        MAPPED_RAM_VERSION, QEVM_MAGIC, QEVM_VERSION,
                        RAM_SAVE_FLAG_COMPRESS_PAGE, RAM_SAVE_FLAG_CONTINUE,
                        RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_HOOK, RAM_SAVE_FLAG_MEM_SIZE,
                        RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SAVE_FLAG_PAGE,
                        RAM_SAVE_FLAG_QFRAM_CODEC, RAM_SAVE_FLAG_XBZRLE,
                        RAM_SAVE_FLAG_ZERO, RAM_SECTION, RAM_VERSION, SECTION_COMMAND,
                        SECTION_CONFIGURATION, SECTION_END, SECTION_EOF, SECTION_FOOTER,
                        SECTION_FULL, SECTION_NAMES, SECTION_PART, SECTION_START,
                        SECTION_SUBSECTION, SECTION_VMDESCRIPTION, TARGET_PAGE_SIZE,
                        flag_names)

PAGE_MASK = TARGET_PAGE_SIZE - 1

# zlib's compressBound(4096): the longest COMPRESS_PAGE payload QEMU accepts
ZLIB_BOUND = TARGET_PAGE_SIZE + (TARGET_PAGE_SIZE >> 12) + (TARGET_PAGE_SIZE >> 14) + \
    (TARGET_PAGE_SIZE >> 25) + 13
LZ4_BOUND = TARGET_PAGE_SIZE + TARGET_PAGE_SIZE // 255 + 16

def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------


@dataclass
class DeviceState:
    """The device sections of a stream, as bytes to copy into another stream."""

    machine: str
    ram_section_id: int
    sections: bytes                      # every non-RAM section, headers and footers
    description: List[dict] = field(default_factory=list)   # their VMDESCRIPTION entries


def put_header(f, machine: str, capabilities: Tuple[str, ...] = ()) -> None:
    """Magic, version and the configuration section (machine type; the capabilities
    subsection only when some are named, as QEMU 8.2+ sends it)."""
    f.put_be32(QEVM_MAGIC)
    f.put_be32(QEVM_VERSION)
    f.put_byte(SECTION_CONFIGURATION)
    name = machine.encode()
    f.put_be32(len(name))
    f.put_buffer(name)
    if capabilities:
        f.put_byte(SECTION_SUBSECTION)
        f.put_counted_string("configuration/capabilities")
        f.put_be32(1)
        f.put_be32(len(capabilities))
        for cap in capabilities:
            f.put_counted_string(cap)


def put_section_start(f, section_id: int, name: str, instance: int, version: int,
                      kind: int = SECTION_START) -> None:
    f.put_byte(kind)
    f.put_be32(section_id)
    f.put_counted_string(name)
    f.put_be32(instance)
    f.put_be32(version)


def put_footer(f, section_id: int) -> None:
    f.put_byte(SECTION_FOOTER)
    f.put_be32(section_id)


def put_command(f, cmd: int, data: bytes = b"") -> None:
    """A COMMAND section: be16 command, be16 length, data (savevm.c's commands)."""
    f.put_byte(SECTION_COMMAND)
    f.put_be16(cmd)
    f.put_be16(len(data))
    if data:
        f.put_buffer(data)


@contextmanager
def ram_part(f, section_id: int, kind: int = SECTION_PART) -> Iterator[None]:
    """A PART (or END) section of the RAM: its header, then the page records the
    with-block writes, EOS and the footer."""
    f.put_byte(kind)
    f.put_be32(section_id)
    yield
    f.put_be64(RAM_SAVE_FLAG_EOS)
    put_footer(f, section_id)


def put_ram_setup(f, section_id: int, blocks: List[RAMBlock],
                  block_header: Optional[Callable[[object, RAMBlock], None]] = None) -> None:
    """The RAM section's START: the MEM_SIZE record (total size, then each block's name
    and used length, followed by what ``block_header(f, block)`` writes — a mapped-ram
    header), EOS and the footer."""
    put_section_start(f, section_id, RAM_SECTION, 0, RAM_VERSION)
    f.put_be64(sum(b.used_length for b in blocks) | RAM_SAVE_FLAG_MEM_SIZE)
    for block in blocks:
        f.put_counted_string(block.name)
        f.put_be64(block.used_length)
        if block_header is not None:
            block_header(f, block)
    f.put_be64(RAM_SAVE_FLAG_EOS)
    put_footer(f, section_id)


def put_ram_tail(f, section_id: int, devices: Optional[DeviceState] = None,
                 description: Optional[dict] = None) -> None:
    """The end of a stream: the RAM's END section, the device sections carried over
    byte for byte, EOF, and the VMDESCRIPTION."""
    with ram_part(f, section_id, SECTION_END):
        pass
    if devices:
        f.put_buffer(devices.sections)
    f.put_byte(SECTION_EOF)
    if description is not None:
        put_vmdescription(f, description)


def put_vmdescription(f, description: dict) -> None:
    f.put_buffer(encode_description(description))


def save_pages_compressed(f, block: RAMBlock, first: int, count: int, codec: str,
                          first_record_named: bool) -> Tuple[int, int, int]:
    """Page records with compressed payloads: COMPRESS_PAGE (zlib, QEMU's) or the
    QFRAM_CODEC extension.  Zero pages stay ZERO records.  A Python call per page; the
    codec dominates.  Returns (pages, zero_pages, compressed_bytes)."""
    region = block.region
    view = memoryview(region)
    is_zero = backend.is_zero
    compress = None
    if codec != "zlib":
        import lz4.block
        compress = lz4.block.compress
    named = first_record_named
    pages = zeros = compressed = 0
    for i in range(first, first + count):
        off = i * TARGET_PAGE_SIZE
        zero = is_zero(region, off, TARGET_PAGE_SIZE)
        if zero:
            header = off | RAM_SAVE_FLAG_ZERO
        else:
            header = off | (RAM_SAVE_FLAG_COMPRESS_PAGE if codec == "zlib" else RAM_SAVE_FLAG_QFRAM_CODEC)
        if named:
            f.put_be64(header)
            f.put_counted_string(block.name)
            named = False
        else:
            f.put_be64(header | RAM_SAVE_FLAG_CONTINUE)
        if zero:
            f.put_byte(0)
            zeros += 1
            continue
        page = view[off:off + TARGET_PAGE_SIZE]
        if codec == "zlib":
            compressed += f.put_compression_data(page)
        else:
            data = compress(page, store_size=False)
            f.put_byte(CODECS[codec])
            f.put_be32(len(data))
            f.put_buffer(data)
            compressed += len(data) + 5
        pages += 1
    return pages, zeros, compressed


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------


@dataclass
class BlockInfo:
    """What a stream says about one RAM block, and what reading it found."""

    name: str
    used_length: int
    pages: int = 0              # pages with data (PAGE, compressed)
    zero_pages: int = 0
    compressed_pages: int = 0
    # mapped layout
    bitmap_offset: int = -1
    pages_offset: int = -1
    xxh3_64: Optional[str] = None    # the checksum qfram recorded, when it wrote the file

    @property
    def npages(self) -> int:
        return self.used_length // TARGET_PAGE_SIZE

    @property
    def absent_pages(self) -> int:
        return max(0, self.npages - self.pages - self.zero_pages)

    def as_dict(self) -> dict:
        d = {"name": self.name, "used_length": self.used_length, "pages": self.pages,
             "zero_pages": self.zero_pages, "absent_pages": self.absent_pages}
        if self.compressed_pages:
            d["compressed_pages"] = self.compressed_pages
        if self.pages_offset >= 0:
            d["pages_offset"] = self.pages_offset
            d["bitmap_offset"] = self.bitmap_offset
        if self.xxh3_64 is not None:
            d["xxh3_64"] = self.xxh3_64
        return d


@dataclass
class DeviceSection:
    """A device section found in a stream: its byte range (footer included), measured,
    never interpreted."""

    type: str
    id: int
    name: str
    instance: int
    version: int
    offset: int
    end: int
    vmsd_name: Optional[str] = None


@dataclass
class Section:
    kind: int
    section_id: int
    name: str = ""
    instance: int = 0
    version: int = 0
    offset: int = 0             # byte offset of the section's type byte
    end: int = -1               # byte offset just past it (footer included)


@dataclass
class StreamInfo:
    """What reading a stream's framing found."""

    machine: str = ""
    capabilities: List[str] = field(default_factory=list)
    blocks: Dict[str, BlockInfo] = field(default_factory=dict)
    sections: List[Section] = field(default_factory=list)
    commands: List[Tuple[int, int, int]] = field(default_factory=list)  # (cmd, len, offset)
    mapped: bool = False
    eof_offset: int = -1


def get_header(f, info: StreamInfo) -> None:
    start = f.tell()
    magic = f.get_be32()
    if magic != QEVM_MAGIC:
        raise FormatError(f"not a QEMU migration stream (magic {magic:#010x}, "
                          f"expected {QEVM_MAGIC:#010x})", start)
    version = f.get_be32()
    if version != QEVM_VERSION:
        raise FormatError(f"unsupported stream version {version} (qfram reads 3)", start + 4)


def get_configuration(f, info: StreamInfo) -> None:
    """The configuration section (the type byte already read)."""
    pos = f.tell()
    length = f.get_be32()
    if length > 255:
        raise FormatError(f"machine name of {length} bytes (at most 255)", pos)
    info.machine = f.get_buffer(length).decode("utf-8", "replace")
    while f.peek_byte() == SECTION_SUBSECTION:
        pos = f.tell()
        f.get_byte()
        name = f.get_counted_string().decode("utf-8", "replace")
        version = f.get_be32()
        if name == "configuration/target-page-bits":
            bits = f.get_be32()
            if bits != 12:
                raise FormatError(f"target page bits {bits}: qfram handles 4 KiB pages", pos)
        elif name == "configuration/capabilities":
            count = f.get_be32()
            if count > 64:
                raise FormatError(f"{count} capabilities in the configuration", pos)
            info.capabilities = [f.get_counted_string().decode("utf-8", "replace")
                                 for _ in range(count)]
        elif name == "configuration/uuid":
            f.skip(16)
        else:
            raise FormatError(f"unknown configuration subsection {name!r} (version "
                              f"{version})", pos)


def get_counted_name(f, what: str) -> str:
    pos = f.tell()
    raw = f.get_counted_string()
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise FormatError(f"{what} is not UTF-8: {raw!r}", pos) from None


def read_present(fd: int, block: "BlockInfo", pos: int) -> bytes:
    """A mapped block's bitmap of present pages; bits past its last page are refused
    (they would count pages the block does not have)."""
    present = os.pread(fd, bitmap_bytes(block.npages), block.bitmap_offset)
    if len(present) != bitmap_bytes(block.npages):
        raise FormatError(f"block {block.name!r}: its bitmap is cut short", block.bitmap_offset)
    if int.from_bytes(present, "little") >> block.npages:
        raise FormatError(f"block {block.name!r}: its bitmap marks pages past the block's "
                          f"last page", block.bitmap_offset)
    return present


def count_bits(bits: bytes) -> int:
    return bin(int.from_bytes(bits, "little")).count("1")


class RAMSectionReader:
    """Reads the payload of "ram" sections (QEMU's ram_load_precopy) into RAM blocks.

    ``resolve(name, used_length, offset)`` returns the RAMBlock for a block the stream
    announces (matching or creating it) or raises FormatError; ``mapped_block(info)`` is
    called for each block of a mapped-layout stream once its header is read.  Without a
    resolver the reader only counts (``qfram info``).  ``touched`` and ``received`` map
    block names to the page bitmaps of ``load_pages``.  ``max_ram``: RAM the stream may
    declare at most (refused with :class:`TooLarge` before anything is made for it).
    ``file_size``: the size of the file read (mapped-ram offsets are checked against it;
    None: not a file, so not a mapped-ram stream)."""

    def __init__(self, f, info: StreamInfo,
                 resolve: Optional[Callable[[str, int, int], RAMBlock]] = None,
                 touched: Optional[Dict[str, object]] = None,
                 received: Optional[Dict[str, object]] = None,
                 mapped_block: Optional[Callable[[BlockInfo, int], None]] = None,
                 max_ram: Optional[Tuple[int, str]] = None,
                 file_size: Optional[int] = None) -> None:
        self.f = f
        self.info = info
        self.resolve = resolve
        self.touched = touched if touched is not None else {}
        self.received = received if received is not None else {}
        self.mapped_block = mapped_block
        self.max_ram = max_ram
        self.file_size = file_size
        self.targets: Dict[str, RAMBlock] = {}
        self.last: Optional[BlockInfo] = None
        self.setup_done = False

    @classmethod
    def for_blocks(cls, f, blocks: List[RAMBlock]) -> "RAMSectionReader":
        """A reader of page records into ``blocks`` (their setup already known): to read
        PART sections on their own, e.g. back from a file qfram wrote."""
        reader = cls(f, StreamInfo())
        for block in blocks:
            reader.info.blocks[block.name] = BlockInfo(block.name, block.used_length)
            reader.targets[block.name] = block
        reader.setup_done = True
        return reader

    def read_payload(self) -> None:
        """Records up to and including EOS."""
        f = self.f
        header_pos = f.tell()
        header = f.get_be64()
        while True:
            flags = header & PAGE_MASK
            addr = header & ~PAGE_MASK
            if flags & RAM_SAVE_FLAG_MEM_SIZE:
                if flags != RAM_SAVE_FLAG_MEM_SIZE:
                    raise FormatError(f"MEM_SIZE record with flags {flag_names(flags)}",
                                      header_pos)
                self._read_mem_size(addr, header_pos)
            elif flags == RAM_SAVE_FLAG_EOS:
                return
            elif flags & (RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_COMPRESS_PAGE | RAM_SAVE_FLAG_QFRAM_CODEC):
                kind = flags & ~RAM_SAVE_FLAG_CONTINUE
                if kind not in (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_COMPRESS_PAGE, RAM_SAVE_FLAG_QFRAM_CODEC):
                    raise FormatError(f"unknown combination of RAM flags {flag_names(flags)}",
                                      header_pos)
                block = self._block_for(flags, header_pos)
                if kind in (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO):
                    header = self._pages(block, header, header_pos)
                    header_pos = f.tell() - 8
                    continue
                self._compressed_page(block, kind, addr, header_pos)
            elif flags == RAM_SAVE_FLAG_MULTIFD_FLUSH:
                pass
            elif flags & RAM_SAVE_FLAG_XBZRLE:
                raise FormatError("XBZRLE page record: qfram does not decode XBZRLE",
                                  header_pos)
            elif flags & RAM_SAVE_FLAG_HOOK:
                raise FormatError("RAM hook record (RDMA): not supported", header_pos)
            else:
                raise FormatError(f"unknown RAM record flags {flag_names(flags)}", header_pos)
            header_pos = f.tell()
            header = f.get_be64()

    # -- records ---------------------------------------------------------------------------

    def _read_mem_size(self, total: int, pos: int) -> None:
        f = self.f
        if self.setup_done:
            raise FormatError("a second MEM_SIZE record", pos)
        self.setup_done = True
        if self.max_ram is not None and total > self.max_ram[0]:
            raise TooLarge(f"the stream declares {total / 2**30:.2f} GiB of RAM, more than "
                           f"{self.max_ram[1]} ({self.max_ram[0] / 2**30:.2f} GiB); "
                           f"--force to try anyway", pos)
        mapped = "mapped-ram" in self.info.capabilities
        seen = 0
        while seen < total:
            name_pos = f.tell()
            name = get_counted_name(f, "a block name")
            if not name:
                raise FormatError("an empty block name", name_pos)
            if name in self.info.blocks:
                raise FormatError(f"block {name!r} announced twice", name_pos)
            length = f.get_be64()
            if length == 0 or length & PAGE_MASK or length > total - seen:
                raise FormatError(f"block {name!r}: used length {length:#x} does not fit "
                                  f"the total {total:#x}", name_pos)
            block = BlockInfo(name, length)
            self.info.blocks[name] = block
            seen += length
            if not mapped and f.peek_buffer(4) == MAPPED_RAM_VERSION.to_bytes(4, "big"):
                # Next comes a block name (never empty: its length byte is not 0) or,
                # after the last block, EOS (00 00 00 00 ...): 00 00 00 01 can only be
                # a mapped-ram header's version.
                mapped = True
            if mapped:
                self.info.mapped = True
                self._read_mapped_header(block)
            if self.resolve is not None:
                self.targets[name] = self.resolve(name, length, name_pos)
            if mapped and self.mapped_block is not None:
                self.mapped_block(block, name_pos)
            if mapped:
                f.set_offset(block.pages_offset + block.used_length)
        if seen != total:
            raise FormatError(f"blocks add up to {seen:#x} bytes, MEM_SIZE says {total:#x}",
                              pos)

    def _read_mapped_header(self, block: BlockInfo) -> None:
        f = self.f
        pos = f.tell()
        version, page_size, bitmap_offset, pages_offset = MAPPED_RAM_HEADER.unpack(
            f.get_buffer(MAPPED_RAM_HEADER.size))
        if version != MAPPED_RAM_VERSION:
            raise FormatError(f"block {block.name!r}: mapped-ram header version {version}",
                              pos)
        if page_size != TARGET_PAGE_SIZE:
            raise FormatError(f"block {block.name!r}: page size {page_size}", pos)
        if self.file_size is None:
            raise FormatError("a mapped-ram stream can only be read from a file", pos)
        bitmap_end = bitmap_offset + bitmap_bytes(block.npages)
        if bitmap_offset != pos + MAPPED_RAM_HEADER.size or pages_offset < bitmap_end or \
                pages_offset % MAPPED_RAM_ALIGN:
            raise FormatError(f"block {block.name!r}: bitmap at {bitmap_offset:#x} and "
                              f"pages at {pages_offset:#x} do not fit the layout", pos)
        if pages_offset + block.used_length > self.file_size:
            raise FormatError(f"block {block.name!r}: its pages ({pages_offset:#x} + "
                              f"{block.used_length:#x}) run past the end of the file "
                              f"({self.file_size:#x} bytes)", pos)
        block.bitmap_offset = bitmap_offset
        block.pages_offset = pages_offset

    def _block_for(self, flags: int, pos: int) -> BlockInfo:
        if flags & RAM_SAVE_FLAG_CONTINUE:
            if self.last is None:
                raise FormatError("a CONTINUE record before any block was named", pos)
            return self.last
        name_pos = self.f.tell()
        name = get_counted_name(self.f, "a block name")
        block = self.info.blocks.get(name)
        if block is None:
            raise FormatError(f"unknown block {name!r}", name_pos)
        if self.info.mapped:
            raise FormatError("a page record in a mapped-ram stream", pos)
        self.last = block
        return block

    def _pages(self, block: BlockInfo, header: int, pos: int) -> int:
        """A run of PAGE/ZERO records for one block, in C.  Returns the next header.
        Without a target block the records are only checked and counted."""
        target = self.targets.get(block.name)
        region = target.region if target is not None else block.used_length
        nxt, pages, zeros = self.f.load_pages(region, header, header_pos=pos,
                                              touched=self.touched.get(block.name),
                                              received=self.received.get(block.name))
        block.pages += pages
        block.zero_pages += zeros
        return nxt

    def _compressed_page(self, block: BlockInfo, kind: int, addr: int, pos: int) -> None:
        f = self.f
        if addr + TARGET_PAGE_SIZE > block.used_length:
            raise FormatError(f"page at offset {addr:#x} lies outside block {block.name!r} "
                              f"of {block.used_length:#x} bytes", pos)
        if kind == RAM_SAVE_FLAG_COMPRESS_PAGE:
            bound, codec = ZLIB_BOUND, 0
        else:
            codec_pos = f.tell()
            codec = f.get_byte()
            if codec != CODEC_LZ4:
                raise FormatError(f"unknown qfram codec {codec}", codec_pos)
            bound = LZ4_BOUND
        len_pos = f.tell()
        length = f.get_be32()
        if length == 0 or length > bound:
            raise FormatError(f"compressed page of {length} bytes (at most {bound})", len_pos)
        data = f.get_buffer(length)
        try:
            if codec == 0:
                page = zlib.decompress(data)
            else:
                import lz4.block
                page = lz4.block.decompress(data, uncompressed_size=TARGET_PAGE_SIZE)
        except Exception as exc:
            raise FormatError(f"compressed page does not decompress: {exc}", len_pos) from None
        if len(page) != TARGET_PAGE_SIZE:
            raise FormatError(f"compressed page decompresses to {len(page)} bytes", len_pos)
        target = self.targets.get(block.name)
        if target is not None:
            memoryview(target.region)[addr:addr + TARGET_PAGE_SIZE] = page
            for bits in (self.touched.get(block.name), self.received.get(block.name)):
                if bits is not None:
                    set_bits(bits, addr // TARGET_PAGE_SIZE, 1, True)
        block.pages += 1
        block.compressed_pages += 1


STOP = "stop"      # an on_section/on_command result: the walk ends there


class StreamReader:
    """Walks a migration stream's sections; RAM sections go to a RAMSectionReader.

    ``on_section(section, f)`` may consume a non-RAM section's payload and return True,
    or return STOP to end the walk there; otherwise a non-RAM section is an error (its
    length is not in the stream).  ``on_command(cmd, data, offset)`` sees each COMMAND
    and may return STOP (without it commands are only listed).  ``read()`` returns at
    EOF or STOP; ``stopped`` says which."""

    def __init__(self, f, info: Optional[StreamInfo] = None,
                 on_section: Optional[Callable[[Section, object], object]] = None,
                 on_command: Optional[Callable[[int, bytes, int], object]] = None,
                 **ram_options) -> None:
        self.f = f
        self.info = info or StreamInfo()
        self.on_section = on_section
        self.on_command = on_command
        self.ram = RAMSectionReader(f, self.info, **ram_options)
        self.opened: Dict[int, Section] = {}          # START/FULL sections by id
        self.stopped = False

    def read(self) -> StreamInfo:
        f = self.f
        info = self.info
        get_header(f, info)
        while True:
            pos = f.tell()
            kind = f.get_byte()
            if kind == SECTION_EOF:
                info.eof_offset = pos
                return info
            if kind == SECTION_CONFIGURATION:
                get_configuration(f, info)
                continue
            if kind in (SECTION_START, SECTION_FULL):
                section_id = f.get_be32()
                name = get_counted_name(f, "a section name")
                section = Section(kind, section_id, name, f.get_be32(), f.get_be32(), pos)
                self.opened[section_id] = section
            elif kind in (SECTION_PART, SECTION_END):
                section_id = f.get_be32()
                first = self.opened.get(section_id)
                if first is None:
                    raise FormatError(f"{SECTION_NAMES[kind]} section for unknown id "
                                      f"{section_id}", pos)
                section = Section(kind, section_id, first.name, first.instance,
                                  first.version, pos)
            elif kind == SECTION_COMMAND:
                cmd = f.get_be16()
                data = f.get_buffer(f.get_be16())
                info.commands.append((cmd, len(data), pos))
                if self.on_command is not None and \
                        self.on_command(cmd, data, pos) is STOP:
                    self.stopped = True
                    return info
                continue
            else:
                raise FormatError(f"unknown section type {kind:#04x}", pos)
            if self._section(section) is STOP:
                self.stopped = True
                return info

    def _section(self, section: Section) -> Optional[str]:
        f = self.f
        if section.kind != SECTION_PART:     # PARTs are many and say nothing new
            self.info.sections.append(section)
        if section.name == RAM_SECTION:
            if section.version != RAM_VERSION:
                raise FormatError(f"ram section version {section.version} (qfram reads 4)",
                                  section.offset)
            self.ram.read_payload()
        else:
            consumed = self.on_section(section, f) if self.on_section else False
            if consumed is STOP:
                return STOP
            if not consumed:
                raise FormatError(f"device section {section.name!r} (instance "
                                  f"{section.instance}, version {section.version}): qfram "
                                  f"cannot tell where it ends", section.offset)
        if f.peek_byte() == SECTION_FOOTER:
            pos = f.tell()
            f.get_byte()
            footer_id = f.get_be32()
            if footer_id != section.section_id:
                raise FormatError(f"footer of section {footer_id} closes section "
                                  f"{section.section_id}", pos)
        section.end = f.tell()
        return None


SCAN_CHUNK = 1 << 16


class FooterScanner:
    """Measures non-RAM sections of a seekable stream, whose length the stream does not
    say (QEMU's tools parse them field by field from the VMDESCRIPTION): a section ends
    at its footer (0x7E + its id), accepted only when a valid next section header follows
    — the next device the VMDESCRIPTION lists, when there is one.  Used as a
    StreamReader ``on_section``; the sections are skipped, never interpreted, and their
    byte ranges kept in ``ranges``."""

    def __init__(self, fd: int, size: int, description: Optional[Description]) -> None:
        self.fd = fd
        self.size = size
        self.expected = description.device_names if description else []
        self.seen = 0                      # devices found so far (index into expected)
        self.known_ids: Dict[int, str] = {}
        self.ranges: List[DeviceSection] = []

    def __call__(self, section: Section, f) -> bool:
        start = f.tell()                   # first payload byte
        end = self._payload_end(section, start)
        f.skip(end - start)
        if section.kind in (SECTION_START, SECTION_FULL):
            self.known_ids[section.section_id] = section.name
            self.seen += 1
        self.ranges.append(DeviceSection(SECTION_NAMES[section.kind], section.section_id,
                                         section.name, section.instance, section.version,
                                         section.offset, end + 5))
        return True

    def _payload_end(self, section: Section, start: int) -> int:
        footer = b"\x7e" + struct.pack(">I", section.section_id)
        pos = start
        while pos < self.size:
            data = os.pread(self.fd, SCAN_CHUNK + 300, pos)
            hit = data.find(footer)
            while hit >= 0:
                if hit + 300 > len(data) and pos + len(data) < self.size:
                    break                  # too close to the chunk's end: rescan
                if self._next_header_ok(data, hit + 5, pos + hit + 5):
                    return pos + hit
                hit = data.find(footer, hit + 1)
            if len(data) <= SCAN_CHUNK:
                break
            pos += SCAN_CHUNK
        raise FormatError(f"section {section.name!r} (id {section.section_id}) has no footer "
                          f"followed by a valid section", section.offset)

    def _next_header_ok(self, data: bytes, i: int, offset: int) -> bool:
        """Is data[i:] the start of a plausible next section?"""
        if i >= len(data):
            return offset == self.size
        kind = data[i]
        if kind == SECTION_EOF:
            return offset + 1 == self.size or (i + 1 < len(data) and
                                               data[i + 1] == SECTION_VMDESCRIPTION)
        if kind in (SECTION_START, SECTION_FULL):
            if i + 6 > len(data):
                return False
            n = data[i + 5]
            name = data[i + 6:i + 6 + n]
            if n == 0 or len(name) < n or i + 14 + n > len(data):
                return False
            if not all(32 < c < 127 for c in name):
                return False
            version = struct.unpack(">I", data[i + 10 + n:i + 14 + n])[0]
            if version > 1000:
                return False
            text = name.decode()
            if text == RAM_SECTION:
                return True
            if self.expected:
                # the next device must be the next one the description lists
                return self.seen + 1 < len(self.expected) and self.expected[self.seen + 1] == text
            return True
        if kind in (SECTION_PART, SECTION_END):
            if i + 5 > len(data):
                return False
            sid = struct.unpack(">I", data[i + 1:i + 5])[0]
            return sid in self.known_ids
        if kind == SECTION_COMMAND:
            return i + 5 <= len(data) and struct.unpack(">H", data[i + 1:i + 3])[0] < 32
        return False
