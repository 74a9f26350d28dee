"""Files that are well formed and lie: every command stops with a clear error naming the
byte offset (exit 1, never a traceback), and what a file declares costs nothing until
real bytes back it — memory and time stay bounded by the file's own size."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

import pytest

from qfram import snapshot
from qfram.ram import RAMBlock, RAMList

PAGE = 4096
be32 = struct.Struct(">I").pack
be64 = struct.Struct(">Q").pack


def qfram(*argv, timeout=60):
    return subprocess.run([sys.executable, "-m", "qfram", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout)


def refused(out, *words):
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    for w in words:
        assert w in out.stderr, out.stderr
    return out.stderr


@pytest.fixture
def stream_snap(tmp_path):
    region = bytearray(8 * PAGE)
    region[PAGE:2 * PAGE] = b"\x11" * PAGE
    path = tmp_path / "snap"
    snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", region)]), str(path))
    return path


@pytest.fixture
def mapped_snap(tmp_path):
    region = bytearray(8 * PAGE)
    region[PAGE:2 * PAGE] = b"\x22" * PAGE
    path = tmp_path / "mapped"
    snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", region)]), str(path),
                  layout="mapped")
    return path


def with_description(path, raw_json: bytes, out):
    eof = snapshot.inspect(str(path)).eof_offset
    data = path.read_bytes()[:eof + 1]
    out.write_bytes(data + b"\x06" + be32(len(raw_json)) + raw_json)
    return out


LYING_DESCRIPTIONS = {
    "nested 200k deep": b"{\"a\":" + b"[" * 200000 + b"]" * 200000 + b"}",
    "qfram is a list": b'{"qfram": [1]}',
    "blocks is a number": b'{"qfram": {"blocks": 5}}',
    "devices is a number": b'{"devices": 7}',
    "a device name is a list": b'{"devices": [{"name": ["x"], "instance_id": 0}]}',
    "a checksum is a number": b'{"qfram": {"blocks": [{"name": "pc.ram", '
                              b'"used_length": 32768, "xxh3_64": 12345}]}}',
    "a checksum is an escape": b'{"qfram": {"blocks": [{"name": "pc.ram", '
                               b'"used_length": 32768, "xxh3_64": "\\u001b[2Jff"}]}}',
    "a giant number": b'{"page_size": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("case", sorted(LYING_DESCRIPTIONS))
def test_a_lying_vmdescription_is_a_clear_error_everywhere(stream_snap, tmp_path, case):
    bad = with_description(stream_snap, LYING_DESCRIPTIONS[case], tmp_path / "bad")
    # (extract reads only the RAM section: it never looks at the description)
    for argv in (("info", bad), ("load", bad), ("rewrite", bad, tmp_path / "re")):
        err = refused(qfram(*argv), "VMDESCRIPTION", "at byte")
        assert "\x1b" not in err


def test_a_large_valid_vmdescription_is_read(stream_snap, tmp_path):
    info = snapshot.inspect(str(stream_snap))
    raw = stream_snap.read_bytes()[info.eof_offset + 6:]
    desc = json.loads(raw)
    desc["devices"] = [{"name": f"dev{i}", "instance_id": i, "vmsd_name": "x" * 200}
                       for i in range(80000)]                     # ~20 MiB of JSON
    big = with_description(stream_snap, json.dumps(desc).encode(), tmp_path / "big")
    assert big.stat().st_size > 16 << 20
    out = qfram("load", big, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["verified"] is True


def mapped_header_at(path) -> int:
    data = path.read_bytes()
    return data.index(b"\x06pc.ram") + 7 + 8        # after the name and used_length


@pytest.mark.parametrize("pages_offset", [0x7FFFFFFFFFF00000, (1 << 64) - (1 << 20)])
def test_mapped_pages_far_past_the_file_are_refused(mapped_snap, tmp_path, pages_offset):
    data = bytearray(mapped_snap.read_bytes())
    at = mapped_header_at(mapped_snap)
    data[at + 20:at + 28] = be64(pages_offset)
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    for argv in (("info", bad), ("load", bad), ("extract", bad, tmp_path / "x"),
                 ("load", bad, "--lazy")):
        refused(qfram(*argv), "run past the end of the file", f"at byte {at}")


def test_bitmap_bits_past_the_last_page_are_refused(mapped_snap, tmp_path):
    data = bytearray(mapped_snap.read_bytes())
    at = mapped_header_at(mapped_snap)
    (bitmap_offset,) = struct.unpack(">Q", data[at + 12:at + 20])
    data[bitmap_offset] |= 0x80                       # page 7: still inside the block
    data[bitmap_offset + 1] = 0xFF                    # pages 8..15: there are 8 pages
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    for argv in (("info", bad), ("load", bad)):
        refused(qfram(*argv), "past the block's last page", f"at byte {bitmap_offset}")


def declaring(total: int, pages=((0, b"\x33"),)) -> bytes:
    """A well-formed stream of one block declaring ``total`` bytes, holding ``pages``."""
    name = b"\x06pc.ram"
    out = b"QEVM" + be32(3) + b"\x07" + be32(13) + b"pc-i440fx-7.2"
    out += b"\x01" + be32(2) + b"\x03ram" + be32(0) + be32(4)
    out += be64(total | 0x04) + name + be64(total) + be64(0x10) + b"\x7e" + be32(2)
    out += b"\x02" + be32(2)
    for i, (offset, fill) in enumerate(pages):
        out += be64(offset | 0x08 | (0x20 if i else 0)) + (b"" if i else name) + fill * PAGE
    out += be64(0x10) + b"\x7e" + be32(2)
    out += b"\x03" + be32(2) + be64(0x10) + b"\x7e" + be32(2) + b"\x00"
    return out


@pytest.mark.parametrize("total", [512 << 30, 256 << 40])
def test_a_small_file_declaring_huge_ram_is_refused_at_once(tmp_path, total):
    bad = tmp_path / "huge"
    bad.write_bytes(declaring(total))
    assert bad.stat().st_size < 8192
    for argv in (("load", bad), ("extract", bad, tmp_path / "x"), ("load", bad, tmp_path / "t")):
        t0 = time.perf_counter()
        refused(qfram(*argv), "declares", "--force")
        assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "x").exists() and not (tmp_path / "t").exists()


def peak_rss_of(*argv) -> int:
    """The peak RSS (bytes) of a qfram run in a fresh child process."""
    code = ("import resource, subprocess, sys; "
            "p = subprocess.run(sys.argv[1:], capture_output=True); "
            "assert p.returncode == 0, p.stderr; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "qfram",
                          *map(str, argv)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout) * 1024


def test_scattered_pages_cost_memory_by_the_file_not_by_the_declared_ram(tmp_path):
    # 32 pages 128 MiB apart in a 4 GiB block: a 130 KiB file
    pages = [(i * (128 << 20), bytes([i + 1])) for i in range(32)]
    sparse = tmp_path / "sparse"
    sparse.write_bytes(declaring(4 << 30, pages))
    assert sparse.stat().st_size < 160 << 10
    baseline = peak_rss_of("info", sparse)
    for argv in (("load", sparse, "--no-verify"), ("extract", sparse, tmp_path / "x")):
        grown = peak_rss_of(*argv) - baseline
        assert grown < 16 << 20, (argv, grown)        # huge pages would take 64 MiB
    assert (tmp_path / "x" / "pc.ram").stat().st_size == 4 << 30
    assert (tmp_path / "x" / "pc.ram").stat().st_blocks * 512 < 1 << 20

