"""The chunked layout: small snapshot files that stay random-access.

RAM is cut into fixed-size chunks (64 KiB by default), each compressed on its own (lz4
or zstd; kept raw when that does not shrink it; an all-zero chunk takes no bytes) and
hashed (xxh3-64).  An index gives every chunk's offset, stored length, kind and hash, so
any chunk can be read and decoded alone: an eager restore decodes on several threads,
a lazy one (qfram.lazy.restore) decodes the chunk a fault lands in, in C without the GIL.

QEMU cannot load this file (it is qfram's, not a migration stream); ``qfram rewrite
SNAP OUT --layout mapped`` gives QEMU one it can, device state included.

Layout (big-endian)::

    0     "QFRAMCHK" be32 version  be32 chunk_bytes
          be64 index offset, length   be64 description offset, length
          be64 devices offset, length
          be64 xxh3-64 of index + description + devices   be64 xxh3-64 of the above
    4096  the chunks' stored bytes, one after the other
          the index: per block (in the description's order), per chunk:
          be64 offset  be32 stored length  be32 kind (0 zero, 1 raw, 2 lz4, 3 zstd)
          be64 xxh3-64 of its uncompressed bytes
          the description: JSON (as a qfram VMDESCRIPTION: blocks, checksums, devices)
          the device sections, byte for byte as QEMU wrote them (may be empty)

Every offset, length and kind is checked against the file before a byte is decoded,
once, when the file is read: a block list with at least one block, each block covered by
exactly its chunks, the chunks' stored bytes one after the other, in order, filling the
data exactly (sorted, none overlapping, no gap); a bad file stops with an error naming
the byte offset.  Each chunk's hash is checked as it is decoded, and an eager restore
checks each block's checksum too (unless told not to verify).
"""
from __future__ import annotations

import concurrent.futures
import json
import mmap
import os
import struct
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import xxhash

from qfram import _chunks, wire
from qfram.errors import OptionError, FormatError, TooLarge
from qfram.format import savevm
from qfram.format import vmdesc as descriptions
from qfram.ram import RAMBlock, RAMList, memory_room
from qfram.results import LoadResult, SaveResult
from qfram.snapshot.common import Progress, SnapshotInfo, check_checksums, make_description
from qfram.wire import TARGET_PAGE_SIZE

MAGIC = b"QFRAMCHK"
VERSION = 1
DATA_START = 4096
DEFAULT_CHUNK = 64 << 10
CODECS = ("lz4", "zstd")
_HEAD = struct.Struct(">8sII QQ QQ QQ Q")
_ENTRY = struct.Struct(">QIIQ")
_NATIVE = struct.Struct("=QIIQ")     # qf_chunk, as the C loops read it
BATCH_BYTES = 4 << 20                # compressed per task by a worker
KIND_ZERO, KIND_RAW, KIND_LZ4, KIND_ZSTD = range(4)


def _valid_chunk(chunk_bytes: int) -> bool:
    """A power of two of 4 KiB to 16 MiB (whole pages; what the loops' buffers take)."""
    return 4096 <= chunk_bytes <= 16 << 20 and not chunk_bytes & (chunk_bytes - 1)


def is_chunked(fd: int) -> bool:
    return os.pread(fd, len(MAGIC), 0) == MAGIC


@dataclass
class ChunkedBlock:
    name: str
    used_length: int
    index: bytes                     # its qf_chunk entries, native (for the C loops)
    kinds: Dict[int, int]            # chunks by kind

    @property
    def nchunks(self) -> int:
        return len(self.index) // _NATIVE.size


@dataclass
class ChunkedFile:
    """A chunked snapshot's index and description, checked against the file."""

    size: int
    chunk_bytes: int
    blocks: List[ChunkedBlock]
    description: descriptions.Description
    machine: str
    devices: bytes
    ram_section_id: int

    @property
    def codec(self) -> Optional[str]:
        return self.description.qfram.get("compression")

    def describe(self) -> dict:
        """What ``qfram info`` adds for a chunked file: chunks by kind."""
        kinds = {"zero": 0, "raw": 0, "compressed": 0}
        for b in self.blocks:
            kinds["zero"] += b.kinds[KIND_ZERO]
            kinds["raw"] += b.kinds[KIND_RAW]
            kinds["compressed"] += b.kinds[KIND_LZ4] + b.kinds[KIND_ZSTD]
        return {"chunk_bytes": self.chunk_bytes, "codec": self.codec, "chunks": kinds}


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------

def save(blocks: List[RAMBlock], fd: int, *, codec: str = "lz4",
         chunk_bytes: int = DEFAULT_CHUNK, threads: int = 2, level: int = 3,
         machine: str = wire.DEFAULT_MACHINE,
         devices: Optional[savevm.DeviceState] = None,
         progress: Progress = None) -> SaveResult:
    """Write the chunked file to ``fd`` (new, empty); ``progress(done, total)`` is told
    the bytes of RAM written as they go."""
    if codec not in CODECS:
        raise OptionError(f"the chunked layout compresses with lz4 or zstd, not {codec!r}")
    if not _valid_chunk(chunk_bytes):
        raise OptionError("a chunk is a power of two of 4 KiB to 16 MiB")
    pos = DATA_START
    entries: List[bytes] = []
    sums: Dict[str, str] = {}
    counts: Dict[str, Tuple[int, int]] = {}
    told = _Told(progress, sum(b.used_length for b in blocks))
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        for block in blocks:
            pos, sums[block.name], zero_pages = _write_block(
                pool, max(1, threads), fd, pos, block, _chunks.CODECS[codec], level,
                chunk_bytes, entries, told)
            counts[block.name] = (block.npages - zero_pages, zero_pages)
    desc = make_description("chunked", blocks, sums, counts, codec, devices)
    desc["qfram"].update(chunk_bytes=chunk_bytes, machine=machine,
                         ram_section_id=devices.ram_section_id if devices
                         else wire.RAM_SECTION_ID)
    tail = [b"".join(entries), json.dumps(desc).encode(),
            devices.sections if devices else b""]
    offsets = []
    for part in tail:
        offsets += [pos, len(part)]
        _write_all(fd, part, pos)
        pos += len(part)
    head = _HEAD.pack(MAGIC, VERSION, chunk_bytes, *offsets,
                      xxhash.xxh3_64_intdigest(b"".join(tail)))
    _write_all(fd, head + struct.pack(">Q", xxhash.xxh3_64_intdigest(head)), 0)
    return SaveResult("", "chunked", sum(b.used_length for b in blocks), 0,
                      sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values()),
                      0, 0.0, 0, sums, codec)


class _Told:
    """Progress over all blocks: bytes of RAM written so far, of ``total``."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def add(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(self.done, self.total)


def _write_block(pool, threads: int, fd: int, pos: int, block: RAMBlock, codec: int,
                 level: int, chunk_bytes: int, entries: List[bytes],
                 told: _Told) -> Tuple[int, str, int]:
    """One block's chunks, encoded on the pool's threads a few MiB a task (a bounded
    number in flight) and written in order from ``pos``; their index entries appended
    to ``entries``.  Returns where the next block starts, its checksum, its zero pages."""
    from qfram import _chunks
    length = block.used_length
    per_task = max(chunk_bytes, BATCH_BYTES // chunk_bytes * chunk_bytes)
    starts = iter(range(0, length, per_task))
    tasks: List[concurrent.futures.Future] = []

    def submit() -> None:
        start = next(starts, None)
        if start is not None:
            tasks.append(pool.submit(_chunks.encode, block.region, start,
                                     min(per_task, length - start), chunk_bytes, codec,
                                     level))

    for _ in range(2 * threads):
        submit()
    hasher = xxhash.xxh3_64()
    zero_pages = done = 0
    while tasks:
        data, chunks, zeros = tasks.pop(0).result()
        submit()
        zero_pages += zeros
        _write_all(fd, data, pos)
        for kind, stored, digest in chunks:
            entries.append(_ENTRY.pack(pos if stored else 0, stored, kind, digest))
            pos += stored
        end = min(length, done + len(chunks) * chunk_bytes)
        hasher.update(memoryview(block.region)[done:end])
        told.add(end - done)
        done = end
    return pos, hasher.hexdigest(), zero_pages


def _write_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------

def read(fd: int, path: str) -> ChunkedFile:
    """The index and description of the chunked file on ``fd``, every entry checked."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, _HEAD.size + 8, 0)
    if len(head) < _HEAD.size + 8:
        raise FormatError(f"{path}: {size} bytes, shorter than a chunked header", size)
    if head[:8] != MAGIC:
        raise FormatError(f"{path}: not a qfram chunked snapshot", 0)
    if xxhash.xxh3_64_intdigest(head[:_HEAD.size]) != struct.unpack(">Q", head[-8:])[0]:
        raise FormatError(f"{path}: the header's checksum does not match", _HEAD.size)
    (_, version, chunk_bytes, index_at, index_len, desc_at, desc_len, dev_at, dev_len,
     tail_sum) = _HEAD.unpack(head[:_HEAD.size])
    if version != VERSION:
        raise FormatError(f"{path}: chunked layout version {version}, this qfram reads "
                          f"{VERSION}", 8)
    if not _valid_chunk(chunk_bytes):
        raise FormatError(f"{path}: chunk size {chunk_bytes} is not a power of two of "
                          f"4 KiB to 16 MiB", 12)
    at = max(DATA_START, index_at)     # the chunk data, then these three
    for what, start, length, field_at in (("index", index_at, index_len, 16),
                                          ("description", desc_at, desc_len, 32),
                                          ("device state", dev_at, dev_len, 48)):
        if start != at or start + length > size:
            raise FormatError(f"{path}: the {what} ({length} bytes at {start}) is not "
                              f"where the file has it", field_at)
        at = start + length
    if at != size:
        raise FormatError(f"{path}: {size - at} bytes after the device state (cut or "
                          f"damaged)", at)
    tail = os.pread(fd, size - index_at, index_at)
    if xxhash.xxh3_64_intdigest(tail) != tail_sum:
        raise FormatError(f"{path}: the index, description or device state is damaged "
                          f"(checksum mismatch)", index_at)
    desc = descriptions.parse(tail[index_len:index_len + desc_len], desc_at)
    q = desc.qfram
    machine = q.get("machine")
    sid = q.get("ram_section_id", wire.RAM_SECTION_ID)
    if q.get("layout") != "chunked" or q.get("chunk_bytes") != chunk_bytes \
            or not isinstance(machine, str) or type(sid) is not int:
        raise FormatError(f"{path}: the description is not a chunked snapshot's", desc_at)
    if not 0 <= sid <= 0xFFFFFFFF:
        raise FormatError(f"{path}: RAM section id {sid} does not fit QEMU's 32 bits",
                          desc_at)
    if not desc.blocks:
        raise FormatError(f"{path}: a snapshot without RAM (its description lists no "
                          f"blocks)", desc_at)
    blocks: List[ChunkedBlock] = []
    pos = 0
    stored_end = DATA_START            # where the next stored chunk must start
    for facts in desc.blocks.values():
        if not 0 < len(facts.name.encode()) <= 255:
            raise FormatError(f"{path}: a block name of {len(facts.name.encode())} bytes "
                              f"(QEMU's are 1 to 255)", desc_at)
        if facts.used_length == 0 or facts.used_length % TARGET_PAGE_SIZE:
            raise FormatError(f"{path}: block {facts.name!r} of {facts.used_length} bytes "
                              f"is not whole pages", desc_at)
        n = -(-facts.used_length // chunk_bytes)
        raw = tail[pos:pos + n * _ENTRY.size]
        if len(raw) < n * _ENTRY.size or pos + n * _ENTRY.size > index_len:
            raise FormatError(f"{path}: the index ends before block {facts.name!r}'s "
                              f"{n} chunks", index_at + pos)
        block, stored_end = _check_block(path, facts, raw, index_at + pos, chunk_bytes,
                                         index_at, stored_end)
        blocks.append(block)
        pos += len(raw)
    if pos != index_len:
        raise FormatError(f"{path}: {index_len - pos} index bytes belong to no block",
                          index_at + pos)
    if stored_end != index_at:
        raise FormatError(f"{path}: the chunks' bytes end at {stored_end}, the index starts "
                          f"at {index_at}: {index_at - stored_end} bytes belong to no chunk",
                          index_at)
    return ChunkedFile(size, chunk_bytes, blocks, desc, machine,
                       tail[index_len + desc_len:], sid)


def _check_block(path: str, facts, raw: bytes, at: int, chunk_bytes: int,
                 data_end: int, stored_end: int) -> Tuple[ChunkedBlock, int]:
    """One block's index entries, each checked: stored bytes inside the data region,
    right where the chunk before ends (``stored_end``: sorted, no overlap, no gap), a
    known kind, a length that kind allows.  Returns where the next chunk must start."""
    native = bytearray(len(raw))
    kinds = {k: 0 for k in range(4)}
    n = len(raw) // _ENTRY.size
    for i, (offset, stored, kind, digest) in enumerate(_ENTRY.iter_unpack(raw)):
        size = min(chunk_bytes, facts.used_length - i * chunk_bytes)
        bad = None
        if kind > KIND_ZSTD:
            bad = f"kind {kind} is none of zero, raw, lz4, zstd"
        elif (stored == 0) != (kind == KIND_ZERO) or (kind == KIND_RAW and stored != size):
            bad = f"{stored} stored bytes do not fit its kind ({kind})"
        elif not stored and offset:
            bad = f"a zero chunk has no bytes, yet an offset ({offset})"
        elif stored and not (DATA_START <= offset and offset + stored <= data_end):
            bad = f"its bytes ({stored} at {offset}) lie outside the chunk data"
        elif stored > size + size // 255 + 1024:
            bad = f"{stored} stored bytes, more than any {size}-byte chunk needs"
        elif stored and offset != stored_end:
            bad = (f"its bytes ({stored} at {offset}) are not where the chunk before it "
                   f"ends ({stored_end}): chunks overlap, or leave a gap")
        if bad:
            raise FormatError(f"{path}: block {facts.name!r} chunk {i}: {bad}",
                              at + i * _ENTRY.size)
        kinds[kind] += 1
        stored_end += stored
        _NATIVE.pack_into(native, i * _NATIVE.size, offset, stored, kind, digest)
    assert n == len(native) // _NATIVE.size
    return ChunkedBlock(facts.name, facts.used_length, bytes(native), kinds), stored_end


def load(fd: int, path: str, ram: Optional[RAMList], *, threads: int = 2,
         zeroed: bool = False, force: bool = False) -> Tuple[RAMList, ChunkedFile]:
    """Decode every chunk into ``ram`` (blocks matched by name and length) or new
    anonymous blocks, on ``threads`` threads; every chunk's hash is checked as it is
    decoded."""
    cf = read(fd, path)
    created = ram is None
    if created:
        room, where = memory_room()
        total = sum(b.used_length for b in cf.blocks)
        if not force and total > room:
            raise TooLarge(f"{path} declares {total / 2**30:.2f} GiB of RAM, more than "
                           f"{where}; --force to try anyway", 0)
        ram, zeroed = RAMList(), True
    try:
        for b in cf.blocks:
            if created:
                ram.add(RAMBlock.anonymous(b.name, b.used_length))
            elif b.name not in ram or ram[b.name].used_length != b.used_length:
                raise FormatError(f"{path}: block {b.name!r} ({b.used_length} bytes) is "
                                  f"not in the target RAM with that length", 0)
        with mmap.mmap(fd, cf.size, prot=mmap.PROT_READ) as source:
            for b in cf.blocks:
                _decode_block(source, b, ram[b.name], cf.chunk_bytes, threads, zeroed, path)
    except BaseException:
        if created:
            ram.close()
        raise
    return ram, cf


def _decode_block(source, b: ChunkedBlock, block: RAMBlock, chunk_bytes: int,
                  threads: int, zeroed: bool, path: str) -> None:
    per = max(1, -(-b.nchunks // max(1, threads)))
    ranges = [(first, min(per, b.nchunks - first)) for first in range(0, b.nchunks, per)]
    with concurrent.futures.ThreadPoolExecutor(len(ranges)) as pool:
        results = list(pool.map(lambda r: _chunks.decode(source, b.index, r[0], r[1],
                                                         block.region, chunk_bytes, zeroed),
                                ranges))
    for bad, rc in results:
        if bad >= 0:
            offset = _NATIVE.unpack_from(b.index, bad * _NATIVE.size)[0]
            raise FormatError(f"{path}: block {b.name!r} chunk {bad} "
                              + ("does not decode" if rc == -1 else
                                 "decodes to other bytes than were saved (hash mismatch)"),
                              offset)


def device_state(cf: ChunkedFile) -> savevm.DeviceState:
    return savevm.DeviceState(cf.machine, cf.ram_section_id, cf.devices,
                              cf.description.devices)


def block_infos(cf: ChunkedFile) -> List[savevm.BlockInfo]:
    """The blocks as ``qfram info`` shows every layout's."""
    out = []
    for b in cf.blocks:
        facts = cf.description.blocks[b.name]
        out.append(savevm.BlockInfo(b.name, b.used_length, facts.pages, facts.zero_pages,
                                    xxh3_64=facts.xxh3_64))
    return out


def inspect(path: str, cf: ChunkedFile) -> SnapshotInfo:
    """What ``qfram info`` shows of every layout, for a chunked file."""
    return SnapshotInfo(path, cf.size, "chunked", cf.machine, [], block_infos(cf), [], [],
                        [], -1, -1, True, cf.codec, cf.description.qfram.get("created"),
                        False, cf.description, cf)


def load_snapshot(fd: int, path: str, ram: Optional[RAMList], *, verify: bool = True,
                  threads: int = 2, zeroed: bool = False,
                  force: bool = False) -> Tuple[RAMList, LoadResult]:
    """qfram.snapshot.load of a chunked file: ``load`` with its result; with ``verify``
    each block's checksum is checked too (each chunk's hash always is)."""
    t0 = time.perf_counter()
    created = ram is None
    ram, cf = load(fd, path, ram, threads=threads, zeroed=zeroed, force=force)
    try:
        verified = check_checksums(ram, [(b.name, b.used_length) for b in cf.blocks],
                                   cf.description) if verify else False
    except BaseException:
        if created:
            ram.close()
        raise
    blocks = [b.as_dict() for b in block_infos(cf)]
    return ram, LoadResult(path, "chunked", sum(b["used_length"] for b in blocks),
                           sum(b["pages"] for b in blocks), sum(b["zero_pages"] for b in blocks),
                           time.perf_counter() - t0, verified, blocks)
