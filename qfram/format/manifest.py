"""The fleet store's formats: a snapshot's manifest, and the chunk objects it names.

In a bucket, the snapshot ``NAME`` is the object ``NAME`` itself — its manifest, JSON,
self-describing: the blocks with their lengths, each block's chunks by the SHA-256 of
their uncompressed bytes (a zero chunk is named by no hash: it is never stored), the
chunk size and codec, the description (each block's xxh3-64, the devices QEMU
describes), the device state, and the working set an earlier restore recorded.  The
chunks live under one reserved prefix, ``.qfram/chunks/<sha256 hex>``: a chunk any
snapshot stored already is never uploaded again.

A chunk object: ``"QFCK"``, ``u8`` version 1, ``u8`` kind (1 raw, 2 lz4, 3 zstd — the
local chunked layout's kinds), ``u16`` 0, ``be32`` uncompressed length, then the bytes.
Its name is the hash of what it decodes to; a store is a hostile peer, so a chunk is
decoded into a buffer of the length the manifest expects and hashed before a byte of it
is used.

Everything here parses what a store returned: types, sizes and ranges are checked, and
memory stays bounded by the object's real size.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from qfram.errors import FormatError
from qfram.format import jsonshape

VERSION = 1
PREFIX = ".qfram/"                    # reserved: no snapshot is named inside it
CHUNK_PREFIX = PREFIX + "chunks/"
LOCK_PREFIX = PREFIX + "locks/"
HASH = "sha256"
DIGEST_HEX = 64
ZERO = "0" * DIGEST_HEX               # a zero chunk: not stored
CHUNK_MAGIC = b"QFCK"
CHUNK_HEAD = struct.Struct(">4sBBHI")
KIND_RAW, KIND_LZ4, KIND_ZSTD = 1, 2, 3
CODECS = {"lz4": KIND_LZ4, "zstd": KIND_ZSTD}
MIN_CHUNK, MAX_CHUNK = 64 << 10, 16 << 20
MAX_MANIFEST = 512 << 20
MAX_BLOCKS = 64
_HEX = re.compile(r"[0-9a-f]*\Z")


def check_name(name: str) -> str:
    """A snapshot's name in a bucket: a key outside the reserved prefix."""
    if not name or len(name.encode()) > 1024:
        raise FormatError(f"a snapshot name of 1 to 1024 bytes, not {len(name.encode())}")
    if name.startswith(PREFIX) or name == PREFIX.rstrip("/"):
        raise FormatError(f"{name!r} lies inside {PREFIX}, which qfram keeps for chunks")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise FormatError(f"a snapshot name with control characters: {name!r}")
    return name


def chunk_key(digest: str) -> str:
    return CHUNK_PREFIX + digest


def digest_of_key(key: str) -> Optional[str]:
    """The hash a chunk object's key names, or None for a key that is not a chunk's."""
    digest = key[len(CHUNK_PREFIX):] if key.startswith(CHUNK_PREFIX) else ""
    return digest if len(digest) == DIGEST_HEX and _HEX.match(digest) and \
        digest != ZERO else None


def chunk_object(kind: int, raw_length: int, stored: bytes) -> bytes:
    return CHUNK_HEAD.pack(CHUNK_MAGIC, VERSION, kind, 0, raw_length) + stored


def parse_chunk_object(data: bytes, expected_length: int, what: str) -> Tuple[int, memoryview]:
    """(kind, the stored bytes) of a chunk object, its header checked against the length
    the manifest expects."""
    if len(data) < CHUNK_HEAD.size:
        raise FormatError(f"{what}: {len(data)} bytes, shorter than a chunk's header")
    magic, version, kind, zero, length = CHUNK_HEAD.unpack_from(data)
    if magic != CHUNK_MAGIC or version != VERSION or zero:
        raise FormatError(f"{what}: not a qfram chunk (version {VERSION})")
    if kind not in (KIND_RAW, KIND_LZ4, KIND_ZSTD):
        raise FormatError(f"{what}: unknown chunk kind {kind}")
    if length != expected_length:
        raise FormatError(f"{what}: {length} bytes uncompressed, the manifest says "
                          f"{expected_length}")
    stored = memoryview(data)[CHUNK_HEAD.size:]
    if kind == KIND_RAW and len(stored) != length:
        raise FormatError(f"{what}: a raw chunk of {len(stored)} bytes, not {length}")
    if len(stored) > 2 * expected_length + 1024:
        raise FormatError(f"{what}: {len(stored)} stored bytes for a {length}-byte chunk")
    return kind, stored


@dataclass
class ManifestBlock:
    name: str
    used_length: int
    chunks: List[str]                 # a hex SHA-256 per chunk, ZERO for a zero chunk


@dataclass
class Manifest:
    """A snapshot in a store."""

    name: str
    chunk_bytes: int
    codec: str
    blocks: List[ManifestBlock]
    description: Dict[str, Any]       # a description (qfram.format.vmdesc) as JSON
    machine: str = ""
    ram_section_id: int = 0
    devices: bytes = b""
    working_set: Optional[Dict[str, Any]] = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime()))

    @property
    def ram_bytes(self) -> int:
        return sum(b.used_length for b in self.blocks)

    def digests(self) -> set:
        """Every chunk it names (zero chunks are not stored)."""
        return {d for b in self.blocks for d in b.chunks if d != ZERO}

    def chunk_length(self, block: int, chunk: int) -> int:
        return min(self.chunk_bytes, self.blocks[block].used_length - chunk * self.chunk_bytes)

    def encode(self) -> bytes:
        return json.dumps({
            "qfram_store_manifest": VERSION, "name": self.name, "created": self.created,
            "chunk_bytes": self.chunk_bytes, "hash": HASH, "codec": self.codec,
            "machine": self.machine, "ram_section_id": self.ram_section_id,
            "devices": base64.b64encode(self.devices).decode(),
            "description": self.description, "working_set": self.working_set,
            "blocks": [{"name": b.name, "used_length": b.used_length,
                        "chunks": "".join(b.chunks)} for b in self.blocks],
        }, separators=(",", ":")).encode()


def looks_like_manifest(head: bytes) -> bool:
    return b'"qfram_store_manifest"' in head[:64]


def parse(data: bytes, where: str) -> Manifest:
    """A manifest read from a store (``where`` names it in errors), every field checked."""
    top = jsonshape.json_object(data, f"{where}: not a qfram manifest:", MAX_MANIFEST)
    if top.get("qfram_store_manifest") != VERSION:
        raise FormatError(f"{where}: not a qfram manifest (version {VERSION})")

    def get(key: str, kind, default: Any = ...) -> Any:
        return jsonshape.field(top, key, kind, f"{where}: the manifest", default)

    if get("hash", str) != HASH:
        raise FormatError(f"{where}: chunks hashed with {top['hash']!r}, not {HASH}")
    chunk = get("chunk_bytes", int)
    if not MIN_CHUNK <= chunk <= MAX_CHUNK or chunk & (chunk - 1):
        raise FormatError(f"{where}: a chunk of {chunk} bytes")
    codec = get("codec", str)
    if codec not in CODECS:
        raise FormatError(f"{where}: codec {codec!r}")
    raw_blocks = get("blocks", list)
    if not 0 < len(raw_blocks) <= MAX_BLOCKS:
        raise FormatError(f"{where}: {len(raw_blocks)} blocks (1 to {MAX_BLOCKS}): a "
                          f"snapshot without RAM is no snapshot")
    blocks = []
    for i, b in enumerate(raw_blocks):
        if not isinstance(b, dict) or not isinstance(b.get("name"), str) \
                or not isinstance(b.get("used_length"), int) \
                or isinstance(b.get("used_length"), bool) \
                or not isinstance(b.get("chunks"), str):
            raise FormatError(f"{where}: block {i} is not a name, a length and chunks")
        name, length, hexes = b["name"], b["used_length"], b["chunks"]
        if not 0 < len(name.encode()) <= 255:
            raise FormatError(f"{where}: block {i}: a name of 1 to 255 bytes")
        if length <= 0 or length % 4096 or length > 1 << 44:
            raise FormatError(f"{where}: block {name!r}: {length} bytes")
        n = -(-length // chunk)
        if len(hexes) != n * DIGEST_HEX or not _HEX.match(hexes):
            raise FormatError(f"{where}: block {name!r}: {len(hexes)} hex digits for "
                              f"{n} chunks")
        blocks.append(ManifestBlock(name, length, [hexes[k:k + DIGEST_HEX]
                                                   for k in range(0, len(hexes), DIGEST_HEX)]))
    if len({b.name for b in blocks}) != len(blocks):
        raise FormatError(f"{where}: two blocks of one name")
    try:
        devices = base64.b64decode(get("devices", str, ""), validate=True)
    except (ValueError, binascii.Error):
        raise FormatError(f"{where}: devices is not base64") from None
    ws = get("working_set", (dict, type(None)), None)
    section = get("ram_section_id", int, 0)
    if not 0 <= section < 1 << 32:
        raise FormatError(f"{where}: a RAM section id of {section}")
    return Manifest(get("name", str), chunk, codec, blocks, get("description", dict),
                    get("machine", str, ""), section, devices, ws, get("created", str, ""))
