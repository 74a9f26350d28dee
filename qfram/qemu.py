"""Real QEMU migration streams: extract their RAM, carry their device state.

``snapshot.inspect`` describes any QEMU stream (device sections measured by
``stream.FooterScanner``).  Here: ``extract`` writes each RAM block as a raw file — the
RAM section is parseable by itself, so it works on streams without a VMDESCRIPTION
(postcopy's) and stops when the RAM ends — and ``device_state`` takes a stream's device
sections, byte for byte, to put them into a stream qfram writes (``snapshot.save(...,
devices=...)``), which a real QEMU then loads with ``-incoming``.
"""
from __future__ import annotations

import os
from typing import Dict

from qfram import channel, core, snapshot, stream
from qfram.errors import FormatError
from qfram.ram import RAMBlock, RAMList, bitmap_bytes

def block_path(outdir: str, name: str) -> str:
    """Where a block's raw file goes: '/' in names become folders (as QEMU's
    analyze-migration does); a leading '/' is dropped and '..' is refused, so every
    file stays inside ``outdir``."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise FormatError(f"block name {name!r} cannot be a file name", -1)
    return os.path.join(outdir, *parts)


def _memory_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def extract(path: str, outdir: str) -> dict:
    """Write each RAM block of a stream as a raw (sparse) file under ``outdir``.  Only
    the RAM section is read (no VMDESCRIPTION needed); reading stops at the first device
    section after it.

    While RAM fits comfortably in free memory, pages are placed in anonymous huge-page
    memory and each block is written out with one pwrite per run of non-zero pages
    (zero pages become holes): faulting a 4 KiB page of a shared file mapping costs ~4 us,
    a huge page ~0.5 us per 4 KiB.  Otherwise pages go straight into mapped files."""
    fd = os.open(path, os.O_RDONLY)
    ram = RAMList()
    fresh: Dict[str, bytearray] = {}
    in_memory = os.fstat(fd).st_size < _memory_available() // 2
    try:
        def resolve(name: str, length: int, pos: int) -> RAMBlock:
            target = block_path(outdir, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):
                os.unlink(target)
            fresh[name] = bytearray(b"\xff" * bitmap_bytes(length // 4096))
            if in_memory and length < _memory_available() // 2:
                return ram.add(RAMBlock.anonymous(name, length, huge=True))
            return ram.add(RAMBlock.map_file(name, target, length, create=True))

        def mapped_block(block: stream.BlockInfo, pos: int) -> None:
            present = os.pread(fd, bitmap_bytes(block.npages), block.bitmap_offset)
            block.pages, block.zero_pages = snapshot.read_blocks(
                fd, ram[block.name], block.pages_offset, present, fresh.get(block.name), 2)

        class RamDone(Exception):
            pass

        def stop_at_devices(section: stream.Section, f) -> bool:
            raise RamDone()

        f = channel.fdopen(fd, "rb", owned=False)
        info = stream.StreamInfo()
        try:
            stream.StreamReader(f, info, on_section=stop_at_devices, resolve=resolve,
                                fresh=fresh, mapped_block=mapped_block).read()
        except RamDone:
            pass
        f.close()
        if not info.blocks:
            raise FormatError(f"{path}: no RAM section", 0)
        for block in ram:
            if block.kind == "anonymous":
                _write_sparse(block, block_path(outdir, block.name))
        return {"path": path, "outdir": outdir, "machine": info.machine,
                "blocks": [dict(b.as_dict(), file=block_path(outdir, b.name))
                           for b in info.blocks.values()]}
    finally:
        ram.close()
        os.close(fd)


def _write_sparse(block: RAMBlock, target: str) -> None:
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(out, block.used_length)
        core.impl.write_pages_at(out, block.region, 0, bytearray(bitmap_bytes(block.npages)))
    finally:
        os.close(out)


def device_state(path: str) -> stream.DeviceState:
    """The device sections of a QEMU stream, to carry into a stream qfram writes."""
    info = snapshot.inspect(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        state = snapshot.devices_of(fd, info)
        description, _ = stream.read_vmdescription_tail(fd, info["file_bytes"])
    finally:
        os.close(fd)
    state.description = [d for d in (description or {}).get("devices", [])
                         if isinstance(d, dict)]
    return state
