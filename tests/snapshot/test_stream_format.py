"""Format pieces that need no QEMU: measuring device sections, safe extraction paths."""
from __future__ import annotations

import json
import struct

import pytest

from qfram import FormatError, snapshot
from qfram.qemu import streams
from qfram.ram import RAMBlock, RAMList


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def device_section(sid: int, name: str, payload: bytes) -> bytes:
    return (b"\x04" + be32(sid) + bytes([len(name)]) + name.encode() + be32(0) + be32(1)
            + payload + b"\x7e" + be32(sid))


def stream_with_devices(tmp_path, payloads, description=True):
    """A qfram stream, then device sections (one payload holding a decoy footer)."""
    ram = RAMList([RAMBlock.from_buffer("pc.ram", bytearray(b"\x01" * 8192))])
    snapshot.save(ram, str(tmp_path / "plain"))
    data = (tmp_path / "plain").read_bytes()
    eof = snapshot.inspect(str(tmp_path / "plain")).eof_offset
    devices = b"".join(device_section(10 + i, name, p) for i, (name, p) in enumerate(payloads))
    desc = {"page_size": 4096, "devices": [{"name": n, "instance_id": 0, "vmsd_name": n}
                                           for n, _ in payloads]}
    body = data[:eof] + devices + b"\x00"
    if description:
        blob = json.dumps(desc).encode()
        body += b"\x06" + be32(len(blob)) + blob
    (tmp_path / "devs").write_bytes(body)
    return tmp_path / "devs", eof


def test_device_sections_are_measured_by_their_footers(tmp_path):
    # the first payload contains the footer bytes of its own section, followed by junk
    decoy = b"\x7e" + be32(10) + b"\x99garbage"
    path, eof = stream_with_devices(tmp_path, [("timer", b"abc" + decoy + b"xyz"),
                                               ("cpu", b"\x00" * 40)])
    info = snapshot.inspect(str(path))
    timer, cpu = info.devices
    assert (timer.name, cpu.name) == ("timer", "cpu")
    assert timer.offset == eof and timer.end == cpu.offset
    assert timer.end - timer.offset == len(device_section(10, "timer",
                                                          b"abc" + decoy + b"xyz"))
    state = streams.device_state(str(path))
    assert state.sections == (path.read_bytes()[eof:cpu.end])


def test_a_device_section_without_a_footer_is_a_format_error(tmp_path):
    path, eof = stream_with_devices(tmp_path, [("timer", b"abc")])
    data = bytearray(path.read_bytes())
    data[eof + 20:eof + 25] = b"XXXXX"          # break the footer
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="footer"):
        snapshot.inspect(str(path))


def test_block_names_become_paths_inside_the_output_directory():
    from qfram.io.outputs import block_components
    assert block_components("/rom@etc/acpi/tables") == ("rom@etc", "acpi", "tables")
    assert block_components("0000:00:02.0/vga.vram") == ("0000:00:02.0", "vga.vram")
    for bad in ("../etc/passwd", "a/../../b", "/", "", "./.", "a\nb", "a\x00b"):
        with pytest.raises(FormatError):
            block_components(bad)


def test_load_skips_device_sections(tmp_path):
    path, _ = stream_with_devices(tmp_path, [("timer", b"abc"), ("cpu", b"def")])
    ram, result = snapshot.load(str(path))
    assert ram["pc.ram"].region[:] == b"\x01" * 8192
