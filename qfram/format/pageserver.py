"""The host page server's protocol (qfram.server serves it, qfram.lazy speaks it).

One snapshot, many clones: the server keeps one decoded, verified copy of the
snapshot's RAM in a memfd (its *cache*), and each client maps that memfd copy-on-write.
A page that is in the cache is mapped by the kernel on first touch, shared by every
clone; a page that is not is a hole, a userfaultfd MISSING fault in the client, whose
chunk the client asks for.

On a unix socket:

1. HELLO, client to server: ``be32 length`` + JSON ``{"qfram_pageserver": 1,
   "snapshot": NAME}`` — the snapshot the client expects (a resolved path, or an
   ``s3://`` URL).  The server checks the peer's credentials (SO_PEERCRED) first.
2. WELCOME, server to client: ``be32 length`` + JSON (:class:`Welcome`), with the cache's
   memfd, opened read-only, in SCM_RIGHTS — or ``{"refused": REASON}`` and the socket
   closes.
3. Frames of 16 bytes, big-endian ``u8 op, u8 block, u16 text length, u32 first chunk,
   u32 count, u32 flags``, a text of that length after FAIL and BYE:

   * REQ (client): make chunks [first, first+count) of the block present in the cache
     (flag URGENT: a thread is waiting for them — they go before the background's);
   * READY (server): they are (each page written whole: a client never sees half a page);
   * FAIL (server): they cannot be (the text says why; the client ends with it);
   * BYE (server): it is going away (the text says why).

A client can only ask for pages: the memfd it holds is read-only, and the server answers
nothing but REQ.  Everything either side receives is checked here — type, size, range —
before it is used.
"""
from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from qfram.errors import FormatError
from qfram.format import jsonshape
from qfram.wire import (PS_FLAG_URGENT, PS_FRAME_BYTES, PS_MAX_TEXT, PS_OP_BYE, PS_OP_FAIL,
                        PS_OP_READY, PS_OP_REQ)

VERSION = 1
FRAME = struct.Struct(">BBHIII")
assert FRAME.size == PS_FRAME_BYTES
OP_REQ, OP_READY, OP_FAIL, OP_BYE = PS_OP_REQ, PS_OP_READY, PS_OP_FAIL, PS_OP_BYE
OP_NAMES = {OP_REQ: "REQ", OP_READY: "READY", OP_FAIL: "FAIL", OP_BYE: "BYE"}
URGENT = PS_FLAG_URGENT
MAX_TEXT = PS_MAX_TEXT          # a FAIL or BYE reason
MAX_HELLO = 64 << 10
MAX_WELCOME = 64 << 20          # zero-chunk bitmaps and the description of a large RAM
MAX_BLOCKS = 64                 # what the fault server registers
MIN_CHUNK, MAX_CHUNK = 4096, 64 << 20


def frame(op: int, block: int = 0, first: int = 0, count: int = 0, text: str = "",
          flags: int = 0) -> bytes:
    raw = text.encode(errors="replace")[:MAX_TEXT]
    return FRAME.pack(op, block, len(raw), first, count, flags) + raw


def parse_frame(head: bytes, ops=(OP_REQ,)) -> tuple:
    """(op, block, text length, first, count, flags) of a frame header; FormatError for
    an op this side does not take."""
    if len(head) != FRAME.size:
        raise FormatError(f"a frame of {len(head)} bytes, not {FRAME.size}")
    op, block, n, first, count, flags = FRAME.unpack(head)
    if op not in ops:
        raise FormatError(f"frame op {op} where {'/'.join(OP_NAMES[o] for o in ops)} is due")
    if n > MAX_TEXT or (op in (OP_REQ, OP_READY) and n):
        raise FormatError(f"a {OP_NAMES[op]} frame with {n} bytes of text")
    if flags & ~URGENT:
        raise FormatError(f"a frame with unknown flags {flags:#x}")
    return op, block, n, first, count, flags


def message(obj: dict) -> bytes:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(raw)) + raw


def hello(snapshot: str) -> bytes:
    return message({"qfram_pageserver": VERSION, "snapshot": snapshot})


def parse_hello(raw: bytes) -> str:
    """The snapshot a client names."""
    obj = jsonshape.json_object(raw, "HELLO", MAX_HELLO)
    if jsonshape.field(obj, "qfram_pageserver", int, "HELLO") != VERSION:
        raise FormatError(f"HELLO: protocol version {obj['qfram_pageserver']}, not {VERSION}")
    name = jsonshape.field(obj, "snapshot", str, "HELLO")
    if not 0 < len(name) <= 4096:
        raise FormatError("HELLO: a snapshot name of 1 to 4096 characters")
    return name


@dataclass
class CacheBlock:
    """A block of the served RAM: where it starts in the cache, which chunks are zero."""

    name: str
    used_length: int
    offset: int                     # in the cache memfd (a multiple of the chunk size)
    zero_chunks: bytes              # bit i set: chunk i is all zero (never in the cache)


@dataclass
class Welcome:
    """What a server tells its client: the RAM's shape, the cache's, and what the client
    needs to check and run it (the description's checksums, the devices QEMU needs)."""

    snapshot: str
    chunk_bytes: int
    cache_bytes: int
    evicts: bool                    # chunks may leave the cache: stay registered for ever
    blocks: List[CacheBlock]
    description: str                # the snapshot's description JSON (checksums)
    machine: str = ""
    ram_section_id: int = 0
    devices: bytes = b""            # device sections, byte for byte
    working_set: Optional[Dict[str, Any]] = None     # {"window_pages", "touches"}
    extra: Dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return message({
            "qfram_pageserver": VERSION, "snapshot": self.snapshot,
            "chunk_bytes": self.chunk_bytes, "cache_bytes": self.cache_bytes,
            "evicts": self.evicts, "description": self.description,
            "machine": self.machine, "ram_section_id": self.ram_section_id,
            "devices": base64.b64encode(self.devices).decode(),
            "working_set": self.working_set,
            "blocks": [{"name": b.name, "used_length": b.used_length, "offset": b.offset,
                        "zero_chunks": base64.b64encode(b.zero_chunks).decode()}
                       for b in self.blocks]})


def refusal(reason: str) -> bytes:
    return message({"qfram_pageserver": VERSION, "refused": reason[:MAX_TEXT]})


def parse_welcome(raw: bytes, cache_size: int) -> Welcome:
    """The WELCOME a server sent, every field checked against the cache it handed over
    (``cache_size``: the memfd's real size): blocks inside it, not overlapping, chunks
    that fit.  A refusal is a FormatError naming the server's reason."""
    what = "the page server's WELCOME"
    obj = jsonshape.json_object(raw, what, MAX_WELCOME)
    if "refused" in obj:
        raise FormatError(f"the page server refused: {str(obj['refused'])[:MAX_TEXT]}")
    if jsonshape.field(obj, "qfram_pageserver", int, what) != VERSION:
        raise FormatError(f"{what}: protocol version {obj['qfram_pageserver']}")
    chunk = jsonshape.field(obj, "chunk_bytes", int, what)
    if not MIN_CHUNK <= chunk <= MAX_CHUNK or chunk & (chunk - 1):
        raise FormatError(f"{what}: a chunk of {chunk} bytes")
    cache_bytes = jsonshape.field(obj, "cache_bytes", int, what)
    if cache_bytes != cache_size:
        raise FormatError(f"{what}: a cache of {cache_bytes} bytes, but the memfd holds "
                          f"{cache_size}")
    raw_blocks = jsonshape.field(obj, "blocks", list, what)
    if not 0 < len(raw_blocks) <= MAX_BLOCKS:
        raise FormatError(f"{what}: {len(raw_blocks)} blocks (1 to {MAX_BLOCKS})")
    blocks: List[CacheBlock] = []
    end = 0
    for i, b in enumerate(raw_blocks):
        where = f"{what}, block {i}"
        if not isinstance(b, dict):
            raise FormatError(f"{where}: not an object")
        name = jsonshape.field(b, "name", str, where)
        length = jsonshape.field(b, "used_length", int, where)
        offset = jsonshape.field(b, "offset", int, where)
        if not 0 < len(name.encode()) <= 255:
            raise FormatError(f"{where}: a name of 1 to 255 bytes")
        if length <= 0 or length % 4096 or offset < end or offset % chunk \
                or offset + length > cache_size:
            raise FormatError(f"{where}: {length} bytes at {offset} do not fit the cache "
                              f"of {cache_size} bytes")
        end = offset + length
        nchunks = -(-length // chunk)
        try:
            zero = base64.b64decode(jsonshape.field(b, "zero_chunks", str, where), validate=True)
        except ValueError:
            raise FormatError(f"{where}: zero_chunks is not base64") from None
        if len(zero) != -(-nchunks // 8):
            raise FormatError(f"{where}: a zero-chunk bitmap of {len(zero)} bytes for "
                              f"{nchunks} chunks")
        blocks.append(CacheBlock(name, length, offset, zero))
    if len({b.name for b in blocks}) != len(blocks):
        raise FormatError(f"{what}: two blocks of one name")
    try:
        devices = base64.b64decode(jsonshape.field(obj, "devices", str, what, ""), validate=True)
    except ValueError:
        raise FormatError(f"{what}: devices is not base64") from None
    ws = obj.get("working_set")
    if ws is not None and not isinstance(ws, dict):
        raise FormatError(f"{what}: working_set is not an object")
    section = jsonshape.field(obj, "ram_section_id", int, what, 0)
    if not 0 <= section < 1 << 32:
        raise FormatError(f"{what}: a RAM section id of {section}")
    return Welcome(jsonshape.field(obj, "snapshot", str, what), chunk, cache_bytes,
                   bool(jsonshape.field(obj, "evicts", bool, what)), blocks,
                   jsonshape.field(obj, "description", str, what), jsonshape.field(obj, "machine", str, what, ""),
                   section, devices, ws)
