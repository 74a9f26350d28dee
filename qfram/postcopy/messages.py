"""Postcopy's wire messages, as QEMU frames them.

Main stream commands (source -> destination), inside a COMMAND section: ``0x08, be16 cmd,
be16 length, data``.  Return path messages (destination -> source): ``be16 type, be16
length, payload``.
"""
from __future__ import annotations

import struct
from typing import Iterator, List, Optional, Tuple

from qfram import wire
from qfram import backend
from qfram.errors import OptionError, FormatError

# a command's length is a be16: at most this many (start, length) pairs per RAM_DISCARD
MAX_DISCARD_PAIRS = 4000


def advise_payload(host_page_summary: int, target_page_size: int) -> bytes:
    return struct.pack(">QQ", host_page_summary, target_page_size)


def discard_payloads(block: str, ranges: List[Tuple[int, int]]) -> Iterator[bytes]:
    """RAM_DISCARD commands for (start, length) byte ranges of one block: version, the
    counted name and a NUL after it (as QEMU's loadvm checks), then be64 pairs."""
    name = block.encode()
    for i in range(0, len(ranges), MAX_DISCARD_PAIRS):
        pairs = b"".join(struct.pack(">QQ", s, n) for s, n in ranges[i:i + MAX_DISCARD_PAIRS])
        yield bytes([wire.DISCARD_VERSION, len(name)]) + name + b"\0" + pairs


def parse_discard(data: bytes, pos: int) -> Tuple[str, List[Tuple[int, int]]]:
    if len(data) < 2 or data[0] != wire.DISCARD_VERSION:
        raise FormatError("RAM_DISCARD with an unknown version", pos)
    n = data[1]
    name = data[2:2 + n].decode("utf-8", "replace")
    rest = data[3 + n:]
    if n == 0 or len(data) < 3 + n or data[2 + n] != 0 or len(rest) % 16:
        raise FormatError("RAM_DISCARD with a broken name or range list", pos)
    return name, [struct.unpack(">QQ", rest[i:i + 16]) for i in range(0, len(rest), 16)]


def bitmap_ranges(bitmap: bytes, npages: int, page_size: int) -> List[Tuple[int, int]]:
    """The set bits of a page bitmap as (start byte, length) runs."""
    return [(first * page_size, count * page_size)
            for first, count in backend.impl.bitmap_runs(bitmap, npages)]


def put_return_message(f, msg_type: int, payload: bytes = b"") -> None:
    f.put_be16(msg_type)
    f.put_be16(len(payload))
    if payload:
        f.put_buffer(payload)
    f.flush()


def received_payload(channel: int, offset: int) -> bytes:
    return struct.pack(">BQ", channel, offset)


def parse_received(payload: bytes, pos: int = -1) -> Tuple[int, int]:
    if len(payload) != 9 or payload[0] > 1:
        raise FormatError("a broken QFRAM_RECEIVED message", pos)
    channel, offset = struct.unpack(">BQ", payload)
    return channel, offset


def shut_payload(status: int) -> bytes:
    return struct.pack(">I", status & 0xFFFFFFFF)


def read_return_message(f) -> Tuple[int, bytes]:
    """One return path message: (type, payload).  A type the return path does not have
    is refused at once, before its payload is waited for."""
    pos = f.tell()
    msg_type = f.get_be16()
    if msg_type not in wire.RETURN_MESSAGE_NAMES:
        raise FormatError(f"unknown return path message {msg_type}", pos)
    length = f.get_be16()
    return msg_type, f.get_buffer(length)


def parse_page_request(msg_type: int, payload: bytes, last_block: Optional[str],
                       pos: int = -1) -> Tuple[str, int, int]:
    """REQ_PAGES_ID / REQ_PAGES -> (block, start byte, length bytes)."""
    if len(payload) < 12:
        raise FormatError("a page request shorter than 12 bytes", pos)
    start, length = struct.unpack(">QI", payload[:12])
    if msg_type == wire.MIG_RP_MSG_REQ_PAGES_ID:
        n = payload[12] if len(payload) > 12 else 0
        block = payload[13:13 + n].decode("utf-8", "replace")
        if n == 0 or len(payload) != 13 + n:
            raise FormatError("REQ_PAGES_ID with a broken block name", pos)
    else:
        if last_block is None:
            raise FormatError("REQ_PAGES before any REQ_PAGES_ID", pos)
        block = last_block
    return block, start, length


# -- postcopy recovery ----------------------------------------------------------------------

def counted_name(name: str) -> bytes:
    """A block name as QEMU's commands carry it: u8 length, bytes."""
    raw = name.encode()
    if not 0 < len(raw) < 256:
        raise OptionError(f"a block name of {len(raw)} bytes")
    return bytes([len(raw)]) + raw


def parse_counted_name(data: bytes, pos: int) -> str:
    if not data or len(data) != 1 + data[0] or data[0] == 0:
        raise FormatError("a broken block name", pos)
    return data[1:].decode("utf-8", "replace")


def bitmap_wire_bytes(npages: int) -> int:
    """A RECV_BITMAP's size: whole little-endian 64-bit words."""
    return (npages + 63) // 64 * 8


def put_received_bitmap(rp, name: str, bitmap: bytes) -> None:
    """RECV_BITMAP on the return path: the message names the block, the bitmap follows
    (be64 size, the words, be64 RECV_BITMAP_ENDING), as QEMU sends it."""
    f = rp
    put_return_message(f, wire.MIG_RP_MSG_RECV_BITMAP, counted_name(name))
    f.put_be64(len(bitmap))
    f.put_buffer(bitmap)
    f.put_be64(wire.RECV_BITMAP_ENDING)
    f.flush()


def read_received_bitmap(rp, npages: int) -> bytes:
    """The bitmap after a RECV_BITMAP message, checked: its size must be the block's."""
    pos = rp.tell()
    size = rp.get_be64()
    if size != bitmap_wire_bytes(npages):
        raise FormatError(f"a received bitmap of {size} bytes for {npages} pages", pos)
    bitmap = rp.get_buffer(size)
    if rp.get_be64() != wire.RECV_BITMAP_ENDING:
        raise FormatError("a received bitmap without its ending mark", pos)
    return bitmap
