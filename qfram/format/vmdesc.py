"""The VMDESCRIPTION after a stream's EOF: found, parsed and shape-checked in one place.

QEMU writes ``0x06, be32 length, JSON`` after EOF, describing the device sections; its
loader ignores it, tools read it.  qfram keeps its own facts there too: each block's
xxh3-64 and page counts (snapshots), the per-chunk hashes a postcopy destination checks.
Every reader goes through :func:`parse`, which turns a wrong shape — nesting beyond any
real description, a list where an object belongs, a name that is not a string, a
checksum that is not hex — into a :class:`~qfram.errors.FormatError` naming the byte
offset, never a traceback.  :func:`find_tail` finds it at the end of a seekable file in
time and memory bounded by the file's own size.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from qfram.errors import FormatError
from qfram.wire import SECTION_VMDESCRIPTION

SCAN_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{16}\Z")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}\Z")


@dataclass
class BlockFacts:
    """What qfram recorded about one block when it saved it."""

    name: str
    used_length: int
    xxh3_64: str
    pages: int = 0
    zero_pages: int = 0


@dataclass
class Description:
    """A shape-checked VMDESCRIPTION.  ``devices`` are QEMU's entries (each with a
    string ``name`` and an int ``instance_id``), kept whole to be carried into other
    streams; ``blocks`` qfram's per-block facts; ``qfram`` qfram's object as read."""

    offset: int
    page_size: Optional[int] = None
    devices: List[dict] = field(default_factory=list)
    qfram: Dict[str, Any] = field(default_factory=dict)
    blocks: Dict[str, BlockFacts] = field(default_factory=dict)
    chunk_hashes: Optional[Dict[str, str]] = None      # postcopy: base64 per block
    hash_chunk_pages: int = 0

    def vmsd_name(self, name: str, instance: int) -> Optional[str]:
        for d in self.devices:
            if d.get("name") == name and d.get("instance_id") == instance:
                vmsd = d.get("vmsd_name")
                return vmsd if isinstance(vmsd, str) else None
        return None

    @property
    def device_names(self) -> List[str]:
        return [d["name"] for d in self.devices]


class _Shape:
    """Checks of one JSON value, each failure a FormatError at the description's offset."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def fail(self, where: str, what: str) -> None:
        raise FormatError(f"VMDESCRIPTION: {where} {what}", self.offset)

    def obj(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"is {type(value).__name__}, not an object")
        return value

    def list(self, value: Any, where: str) -> list:
        if not isinstance(value, list):
            self.fail(where, f"is {type(value).__name__}, not a list")
        return value

    def str(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            self.fail(where, f"is {type(value).__name__}, not a string")
        return value

    def int(self, value: Any, where: str, low: int = 0) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            self.fail(where, f"is {value!r:.40}, not a whole number >= {low}")
        return value


def parse(raw: bytes, offset: int) -> Description:
    """The description in ``raw`` (the JSON text), which started at byte ``offset``."""
    shape = _Shape(offset)
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise FormatError("VMDESCRIPTION: JSON nested deeper than any description",
                          offset) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"VMDESCRIPTION: not JSON ({exc})", offset) from None
    top = shape.obj(doc, "the whole")
    desc = Description(offset)
    if top.get("page_size") is not None:
        desc.page_size = shape.int(top["page_size"], "page_size", 1)
    for i, dev in enumerate(shape.list(top.get("devices", []), "devices")):
        dev = shape.obj(dev, f"devices[{i}]")
        shape.str(dev.get("name"), f"devices[{i}].name")
        shape.int(dev.get("instance_id", 0), f"devices[{i}].instance_id")
        desc.devices.append(dev)
    if top.get("qfram") is not None:
        desc.qfram = q = shape.obj(top["qfram"], "qfram")
        if q.get("compression") not in (None, "zlib", "lz4", "zstd"):
            shape.fail("qfram.compression", f"is {q.get('compression')!r:.40}")
        for key in ("created", "layout", "checksum"):
            if q.get(key) is not None:
                shape.str(q[key], f"qfram.{key}")
        for i, b in enumerate(shape.list(q.get("blocks", []), "qfram.blocks")):
            b = shape.obj(b, f"qfram.blocks[{i}]")
            name = shape.str(b.get("name"), f"qfram.blocks[{i}].name")
            digest = shape.str(b.get("xxh3_64"), f"qfram.blocks[{i}].xxh3_64")
            if not _HEX64.match(digest):
                shape.fail(f"qfram.blocks[{i}].xxh3_64", "is not 16 hex digits")
            desc.blocks[name] = BlockFacts(
                name, shape.int(b.get("used_length"), f"qfram.blocks[{i}].used_length"),
                digest, shape.int(b.get("pages", 0), f"qfram.blocks[{i}].pages"),
                shape.int(b.get("zero_pages", 0), f"qfram.blocks[{i}].zero_pages"))
        if q.get("chunk_hashes") is not None:
            hashes = shape.obj(q["chunk_hashes"], "qfram.chunk_hashes")
            for name, value in hashes.items():
                if not _B64.match(shape.str(value, f"qfram.chunk_hashes[{name!r:.40}]")):
                    shape.fail(f"qfram.chunk_hashes[{name!r:.40}]", "is not base64")
            desc.chunk_hashes = hashes
            desc.hash_chunk_pages = shape.int(q.get("hash_chunk_pages"),
                                              "qfram.hash_chunk_pages", 1)
    return desc


def find_tail(fd: int, size: int) -> Tuple[Optional[Description], int]:
    """The VMDESCRIPTION that ends a seekable stream, found without parsing what is
    before it (as QEMU's analyze-migration does), and where its 0x06 byte is; (None, -1)
    when the file does not end in one.

    Valid JSON holds no raw 0x06 byte, so the last 0x06 of the file is the type byte or
    one of the 4 length bytes after it: only those few places can start a description
    whose length field reaches exactly to the end.  Reading goes backwards to the last
    0x06 and no further: time and memory are bounded by the file's size, not by a
    constant (a valid description of any size is found)."""
    last = _last_byte(fd, size, SECTION_VMDESCRIPTION)
    if last < 0:
        return None, -1
    for start in range(max(0, last - 4), last + 1):
        head = os.pread(fd, 5, start)
        if len(head) == 5 and head[0] == SECTION_VMDESCRIPTION and \
                struct.unpack(">I", head[1:])[0] == size - start - 5:
            raw = os.pread(fd, size - start - 5, start + 5)
            if raw[:1] != b"{":
                continue
            return parse(raw, start), start
    return None, -1


def _last_byte(fd: int, size: int, value: int) -> int:
    needle = bytes([value])
    end = size
    while end > 0:
        start = max(0, end - SCAN_CHUNK)
        hit = os.pread(fd, end - start, start).rfind(needle)
        if hit >= 0:
            return start + hit
        end = start
    return -1


def encode(description: dict) -> bytes:
    """The bytes of a VMDESCRIPTION section for ``description`` (type, length, JSON)."""
    data = json.dumps(description, separators=(",", ":")).encode()
    return bytes([SECTION_VMDESCRIPTION]) + struct.pack(">I", len(data)) + data
