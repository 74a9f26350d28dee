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

from qfram import channel, core, outputs, snapshot, stream
from qfram.errors import FormatError
from qfram.ram import RAMBlock, RAMList, bitmap_bytes

def _memory_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def extract(path: str, outdir: str) -> dict:
    """Write each RAM block of a stream as a raw (sparse) file under ``outdir`` (block
    names with '/' become folders, always inside ``outdir``: see qfram.outputs).  Only
    the RAM section is read (no VMDESCRIPTION needed); reading stops at the first device
    section after it.  The files appear together once the whole RAM section was read,
    or not at all: earlier files of the same names stay as they were on failure.

    While RAM fits comfortably in free memory, pages are placed in anonymous huge-page
    memory and each block is written out with one pwrite per run of non-zero pages
    (zero pages become holes): faulting a 4 KiB page of a shared file mapping costs ~4 us,
    a huge page ~0.5 us per 4 KiB.  Otherwise pages go straight into mapped files."""
    fd = os.open(path, os.O_RDONLY)
    ram = RAMList()
    fresh: Dict[str, bytearray] = {}
    in_memory = os.fstat(fd).st_size < _memory_available() // 2
    files = outputs.BlockFiles(outdir, single=False)
    try:
        def resolve(name: str, length: int, pos: int) -> RAMBlock:
            out = files.new(name, pos)
            fresh[name] = bytearray(b"\xff" * bitmap_bytes(length // 4096))
            if in_memory and length < _memory_available() // 2:
                return ram.add(RAMBlock.anonymous(name, length, huge=True))
            return ram.add(RAMBlock.map_fd(name, out.fd, length, path=out.path))

        def mapped_block(block: stream.BlockInfo, pos: int) -> None:
            present = os.pread(fd, bitmap_bytes(block.npages), block.bitmap_offset)
            block.pages, block.zero_pages = snapshot.read_blocks(
                fd, ram[block.name], block.pages_offset, present, fresh.get(block.name), 2)

        f = channel.fdopen(fd, "rb", owned=False)
        info = stream.StreamInfo()
        stream.StreamReader(f, info, on_section=lambda section, f: stream.STOP,
                            resolve=resolve, fresh=fresh, mapped_block=mapped_block).read()
        f.close()
        if not info.blocks:
            raise FormatError(f"{path}: no RAM section", 0)
        for block in ram:
            if block.kind == "anonymous":
                _write_sparse(block, files.files[block.name].fd)
        ram.close()
        files.commit()
    except BaseException:
        ram.close()
        files.abort()
        raise
    finally:
        os.close(fd)
    return {"path": path, "outdir": outdir, "machine": info.machine,
            "blocks": [dict(b.as_dict(), file=files.path_of(b.name))
                       for b in info.blocks.values()]}


def _write_sparse(block: RAMBlock, out: int) -> None:
    os.ftruncate(out, block.used_length)
    core.impl.write_pages_at(out, block.region, 0, bytearray(bitmap_bytes(block.npages)))


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
