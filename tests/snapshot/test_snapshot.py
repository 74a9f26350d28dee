"""Snapshots: save and restore guest RAM in both layouts, for every kind of memory, and
refuse hostile files without writing outside a block."""
from __future__ import annotations

import json
import mmap
import os
import stat
import struct
import subprocess
import sys
import time

import pytest

from conftest import PAGE, resident_pages
from qfram import FormatError, QFramError, snapshot
from qfram.lazy import LazyRestore
from qfram.lab.demo import fill_demo
from qfram.ram import RAMBlock, RAMList

LAYOUTS = ["stream", "mapped"]


def demo_block(kind: str, name: str, size: int, tmp_path, seed: int = 0) -> RAMBlock:
    if kind == "anonymous":
        block = RAMBlock.anonymous(name, size, huge=False)
    elif kind == "memfd":
        block = RAMBlock.memfd(name, size)
    elif kind == "file":
        block = RAMBlock.map_file(name, str(tmp_path / f"mem-{name}"), size, create=True)
    else:
        block = RAMBlock.from_buffer(name, bytearray(size))
    fill_demo(block.region, seed=seed)
    return block


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["anonymous", "memfd", "file", "buffer"])
def test_every_backing_round_trips(tmp_path, layout, kind):
    ram = RAMList([demo_block(kind, "pc.ram", 4 << 20, tmp_path, seed=1),
                   demo_block(kind, "vga.vram", 1 << 20, tmp_path, seed=2)])
    path = str(tmp_path / "snap")
    saved = snapshot.save(ram, path, layout=layout)
    assert saved.pages + saved.zero_pages == (5 << 20) // PAGE
    restored, result = snapshot.load(path)
    assert result.verified and result.layout == layout
    for block in ram:
        assert restored[block.name].region[:] == block.region[:]
    # and into existing memory of the same kind, matched by name and length
    target = RAMList([demo_block(kind, "pc.ram", 4 << 20, tmp_path, seed=9),
                      demo_block(kind, "vga.vram", 1 << 20, tmp_path, seed=9)])
    snapshot.load(path, target)
    for block in ram:
        assert target[block.name].region[:] == block.region[:]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_target_must_have_the_blocks_of_the_snapshot(tmp_path, layout):
    ram = RAMList([demo_block("anonymous", "pc.ram", 1 << 20, tmp_path)])
    path = str(tmp_path / "snap")
    snapshot.save(ram, path, layout=layout)
    with pytest.raises(FormatError, match="no such block"):
        snapshot.load(path, RAMList([RAMBlock.anonymous("other", 1 << 20)]))
    with pytest.raises(FormatError, match="bytes in the stream"):
        snapshot.load(path, RAMList([RAMBlock.anonymous("pc.ram", 2 << 20)]))


def test_the_stream_layout_is_byte_exact(tmp_path):
    # written by hand from the format facts in DESIGN.md
    region = bytearray(3 * PAGE)
    region[:PAGE] = b"A" * PAGE
    region[2 * PAGE:] = b"C" * PAGE
    ram = RAMList([RAMBlock.from_buffer("pc.ram", region)])
    path = tmp_path / "snap"
    snapshot.save(ram, str(path), machine="pc-i440fx-7.2")
    data = path.read_bytes()
    be32 = lambda v: struct.pack(">I", v)  # noqa: E731
    be64 = lambda v: struct.pack(">Q", v)  # noqa: E731
    sid = be32(2)
    expected = (
        b"QEVM" + be32(3)
        + b"\x07" + be32(13) + b"pc-i440fx-7.2"                      # configuration
        + b"\x01" + sid + b"\x03ram" + be32(0) + be32(4)               # START ram v4
        + be64(3 * PAGE | 0x04) + b"\x06pc.ram" + be64(3 * PAGE)       # MEM_SIZE
        + be64(0x10) + b"\x7e" + sid                                   # EOS, footer
        + b"\x02" + sid                                                # PART
        + be64(0 | 0x08) + b"\x06pc.ram" + b"A" * PAGE                 # PAGE, named
        + be64(PAGE | 0x20 | 0x02) + b"\x00"                           # CONTINUE|ZERO
        + be64(2 * PAGE | 0x20 | 0x08) + b"C" * PAGE                   # CONTINUE|PAGE
        + be64(0x10) + b"\x7e" + sid                                   # EOS, footer
        + b"\x03" + sid + be64(0x10) + b"\x7e" + sid                   # END
        + b"\x00"                                                      # EOF
    )
    assert data[:len(expected)] == expected
    assert data[len(expected)] == 0x06                                 # VMDESCRIPTION
    length = struct.unpack(">I", data[len(expected) + 1:len(expected) + 5])[0]
    desc = json.loads(data[len(expected) + 5:])
    assert len(data) == len(expected) + 5 + length
    assert desc["page_size"] == PAGE and desc["devices"] == []
    block = desc["qfram"]["blocks"][0]
    assert block["name"] == "pc.ram" and block["pages"] == 2 and block["zero_pages"] == 1


def test_the_mapped_layout_is_qemus_mapped_ram(tmp_path):
    ram = RAMList([demo_block("anonymous", "pc.ram", 4 << 20, tmp_path)])
    path = tmp_path / "snap"
    snapshot.save(ram, str(path), layout="mapped")
    info = snapshot.inspect(str(path))
    block = info.blocks[0]
    data = path.read_bytes()
    # the mapped-ram header follows the block's MEM_SIZE entry: be32 version, be64 page
    # size, be64 bitmap offset (right after the header), be64 pages offset (1 MiB)
    entry = data.index(b"\x06pc.ram") + 7 + 8
    version, page_size, bitmap_offset, pages_offset = struct.unpack(
        ">IQQQ", data[entry:entry + 28])
    assert (version, page_size) == (1, PAGE)
    assert bitmap_offset == entry + 28 == block.bitmap_offset
    assert pages_offset % (1 << 20) == 0 and pages_offset == block.pages_offset
    bitmap = data[bitmap_offset:bitmap_offset + (4 << 20) // PAGE // 8]
    region = ram["pc.ram"].region
    for i in range((4 << 20) // PAGE):
        page = region[i * PAGE:(i + 1) * PAGE]
        present = bool(bitmap[i >> 3] >> (i & 7) & 1)
        assert present == (page != bytes(PAGE))
        if present:
            assert data[pages_offset + i * PAGE:pages_offset + (i + 1) * PAGE] == page
    # zero pages are holes: the file allocates less than its pages span
    st = os.stat(path)
    assert st.st_blocks * 512 < st.st_size - block.zero_pages * PAGE // 2


@pytest.mark.parametrize("codec", ["zlib", "lz4"])
def test_compressed_snapshots_round_trip(tmp_path, codec):
    ram = RAMList([demo_block("anonymous", "pc.ram", 2 << 20, tmp_path)])
    path = str(tmp_path / "snap")
    plain = snapshot.save(ram, str(tmp_path / "plain"))
    saved = snapshot.save(ram, path, compress=codec)
    assert saved.file_bytes < plain.file_bytes
    assert snapshot.inspect(path).compression == codec
    restored, result = snapshot.load(path)
    assert result.verified and restored["pc.ram"].region[:] == ram["pc.ram"].region[:]


def test_zlib_pages_are_qemus_compress_page_records(tmp_path):
    region = bytearray(b"x" * PAGE)
    path = tmp_path / "snap"
    snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", region)]), str(path),
                  compress="zlib")
    data = path.read_bytes()
    record = data.index(struct.pack(">Q", 0x100)) + 8      # offset 0 | COMPRESS_PAGE
    assert data[record:record + 7] == b"\x06pc.ram"
    length = struct.unpack(">I", data[record + 7:record + 11])[0]
    import zlib
    assert zlib.decompress(data[record + 11:record + 11 + length]) == region


def test_release_gives_memory_back_while_saving(tmp_path):
    for layout in LAYOUTS:
        block = demo_block("anonymous", "pc.ram", 8 << 20, tmp_path)
        ram = RAMList([block])
        before = bytes(block.region)
        assert all(resident_pages(block.region))
        result = snapshot.save(ram, str(tmp_path / f"snap-{layout}"), layout=layout,
                               release=True)
        assert not any(resident_pages(block.region)), layout
        assert result.released_bytes == 8 << 20
        restored, _ = snapshot.load(str(tmp_path / f"snap-{layout}"))
        assert restored["pc.ram"].region[:] == before


def test_incremental_saves_write_only_changed_pages(tmp_path):
    block = demo_block("anonymous", "pc.ram", 4 << 20, tmp_path)
    ram = RAMList([block])
    path = str(tmp_path / "snap")
    snapshot.save(ram, path, layout="mapped")
    block.region[5 * PAGE] = 1                  # changed
    block.region[7 * PAGE:8 * PAGE] = bytes(PAGE)   # became zero: a hole now
    block.region[9 * PAGE] = 2                  # changed
    result = snapshot.save(ram, path, layout="mapped", incremental=True)
    assert result.pages == 2
    restored, loaded = snapshot.load(path)
    assert loaded.verified and restored["pc.ram"].region[:] == block.region[:]


def test_an_interrupted_incremental_save_is_not_taken_for_a_snapshot(tmp_path):
    ram = RAMList([demo_block("anonymous", "pc.ram", 1 << 20, tmp_path)])
    path = tmp_path / "snap"
    snapshot.save(ram, str(path), layout="mapped")
    with open(path, "r+b") as f:               # what a crash mid-update leaves
        f.write(snapshot.common.LEGACY_INCOMPLETE_MAGIC)
    with pytest.raises(FormatError, match="interrupted"):
        snapshot.load(str(path))


def test_direct_io_mapped_save(tmp_path):
    ram = RAMList([demo_block("anonymous", "pc.ram", 4 << 20, tmp_path)])
    path = str(tmp_path / "snap")
    try:
        snapshot.save(ram, path, layout="mapped", direct=True)
    except OSError as exc:
        pytest.skip(f"{tmp_path} refuses O_DIRECT: {exc}")
    restored, result = snapshot.load(path)
    assert result.verified and restored["pc.ram"].region[:] == ram["pc.ram"].region[:]


def bytes_being_written(pid: int, directory) -> int:
    """How much the process has written to a file in ``directory`` (named or not)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            if target.startswith(f"{directory}/") and stat.S_ISREG(st.st_mode):
                return st.st_size
        except OSError:
            pass
    return 0


def test_a_killed_save_leaves_the_old_snapshot_and_nothing_else(tmp_path):
    path = tmp_path / "snap"
    old = RAMList([demo_block("anonymous", "pc.ram", 1 << 20, tmp_path, seed=5)])
    snapshot.save(old, str(path))
    before = path.read_bytes()
    code = (f"from qfram.cli import main; main(['save', '--demo', '2G', {str(path)!r}])")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while time.time() < deadline:               # kill it mid-write, once writing began
        if bytes_being_written(proc.pid, tmp_path) > (16 << 20):
            break
        time.sleep(0.01)
    else:
        pytest.fail("the save never started writing")
    proc.kill()
    proc.wait()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["snap"]        # no temporary left behind
    restored, result = snapshot.load(str(path))
    assert result.verified and restored["pc.ram"].region[:] == old["pc.ram"].region[:]


# -- lazy restore -----------------------------------------------------------------------------


def test_lazy_restore_serves_the_right_bytes_to_concurrent_touches(tmp_path):
    import random
    import threading
    block = demo_block("anonymous", "pc.ram", 16 << 20, tmp_path)
    original = bytes(block.region)
    path = str(tmp_path / "snap")
    snapshot.save(RAMList([block]), path, layout="mapped")
    wrong = []
    with LazyRestore(path, background=False) as lazy:
        region = lazy.ram["pc.ram"].region

        def toucher(seed):
            rng = random.Random(seed)
            for _ in range(300):
                i = rng.randrange(len(original) // PAGE)
                if region[i * PAGE:(i + 1) * PAGE] != original[i * PAGE:(i + 1) * PAGE]:
                    wrong.append(i)

        threads = [threading.Thread(target=toucher, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert lazy.server.counters["faults"] > 0 and not lazy.complete
        stats = lazy.wait()
        assert region[:] == original
    assert not wrong
    assert stats.verified and stats.eexist == 0
    assert stats.fault_pages + stats.background_pages == len(original) // PAGE
    assert stats.handler_latency.count == stats.faults


def test_lazy_restore_needs_a_random_access_layout(tmp_path):
    ram = RAMList([demo_block("anonymous", "pc.ram", 1 << 20, tmp_path)])
    snapshot.save(ram, str(tmp_path / "snap"))
    with pytest.raises(FormatError, match="mapped or chunked layout"):
        LazyRestore(str(tmp_path / "snap"))


# -- hostile files ------------------------------------------------------------------------------


def guarded_ram(size: int):
    """A block inside a larger mapping, with canaries on both sides."""
    outer = mmap.mmap(-1, size + 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    outer[:PAGE] = b"\xa5" * PAGE
    outer[PAGE + size:] = b"\x5a" * PAGE
    inner = memoryview(outer)[PAGE:PAGE + size]
    return outer, RAMList([RAMBlock.from_buffer("pc.ram", inner)])


def canaries_intact(outer, size: int) -> bool:
    return outer[:PAGE] == b"\xa5" * PAGE and outer[PAGE + size:] == b"\x5a" * PAGE


def small_snapshot(tmp_path, layout):
    region = bytearray(8 * PAGE)
    for i in (0, 3, 5):
        region[i * PAGE:(i + 1) * PAGE] = bytes([i + 1]) * PAGE
    path = tmp_path / f"small-{layout}"
    snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", region)]), str(path), layout=layout)
    return path, bytes(region)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncated_files_stop_with_a_clear_error(tmp_path, layout):
    path, original = small_snapshot(tmp_path, layout)
    data = path.read_bytes()
    eof = snapshot.inspect(str(path)).eof_offset
    cut = tmp_path / "cut"
    lengths = set(range(0, len(data), max(1, len(data) // 97))) | {eof, eof + 1, eof + 3}
    for length in sorted(lengths):
        cut.write_bytes(data[:length])
        outer, ram = guarded_ram(8 * PAGE)
        if length == eof + 1:
            # ends right after EOF: a stream without a description (as postcopy's) is
            # whole, just unverifiable
            _, result = snapshot.load(str(cut), ram)
            assert not result.verified and bytes(outer[PAGE:PAGE + 8 * PAGE]) == original
        else:
            with pytest.raises(QFramError):
                snapshot.load(str(cut), ram)
        assert canaries_intact(outer, 8 * PAGE)


def test_named_hostile_streams(tmp_path):
    path, _ = small_snapshot(tmp_path, "stream")
    data = path.read_bytes()
    page_record = data.index(b"\x02\x00\x00\x00\x02") + 5    # first record of the PART
    cases = {
        "bad magic": b"QEVX" + data[4:],
        "unknown flags": data[:page_record] + struct.pack(">Q", 0x408) + data[page_record + 8:],
        "offset past the block": data[:page_record] + struct.pack(">Q", (64 * PAGE) | 0x08)
        + data[page_record + 8:],
        "unknown block": data.replace(b"\x06pc.ram\x00", b"\x06pc.rom\x00", 2)
        .replace(b"\x06pc.ram", b"\x06pc.ram", 1),
        "lying total": data.replace(struct.pack(">Q", 8 * PAGE | 0x04),
                                    struct.pack(">Q", 9 * PAGE | 0x04)),
    }
    for what, bad in cases.items():
        (tmp_path / "bad").write_bytes(bad)
        outer, ram = guarded_ram(8 * PAGE)
        with pytest.raises(FormatError) as info:
            snapshot.load(str(tmp_path / "bad"), ram)
        assert info.value.offset >= 0, what
        assert canaries_intact(outer, 8 * PAGE), what


def test_fuzzed_snapshots_never_crash_or_write_outside_a_block(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    files = {layout: small_snapshot(tmp_path, layout) for layout in LAYOUTS}

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(layout=st.sampled_from(LAYOUTS),
           edits=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)),
                          min_size=1, max_size=8),
           cut=st.integers(0, 1 << 30) | st.none())
    def fuzz(layout, edits, cut):
        path, original = files[layout]
        data = bytearray(path.read_bytes())
        # aim most edits at the framing (the first KiB), some anywhere
        for where, value in edits:
            pos = where % 1024 if where & 1 else where % len(data)
            data[pos % len(data)] = value
        if cut is not None:
            del data[cut % len(data):]
        bad = tmp_path / "fuzzed"
        bad.write_bytes(bytes(data))
        outer, ram = guarded_ram(8 * PAGE)
        try:
            _, result = snapshot.load(str(bad), ram)
        except QFramError:
            pass
        else:
            if result.verified:
                assert bytes(outer[PAGE:PAGE + 8 * PAGE]) == original
        assert canaries_intact(outer, 8 * PAGE)

    fuzz()


# -- the command line ---------------------------------------------------------------------------


def run_cli(*argv) -> dict:
    out = subprocess.run([sys.executable, "-m", "qfram", *argv, "--json"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_cli_save_info_load_eager_and_lazy(tmp_path):
    snap = str(tmp_path / "snap")
    saved = run_cli("save", "--demo", "32M", snap, "--layout", "mapped", "--release")
    assert saved["released_bytes"] == 32 << 20
    assert saved["rss_after"] < saved["rss_before"]
    info = run_cli("info", snap)
    assert info["layout"] == "mapped" and info["blocks"][0]["xxh3_64"]
    loaded = run_cli("load", snap, str(tmp_path / "ram"))
    assert loaded["verified"] and os.path.getsize(tmp_path / "ram") == 32 << 20
    lazy = run_cli("load", snap, "--lazy", "--touches", "500")
    assert lazy["verified"] and lazy["faults"] > 0
    assert lazy["handler_latency"]["count"] == lazy["faults"]


def test_cli_saves_a_memory_file_another_process_owns(tmp_path):
    mem = tmp_path / "guest-ram"
    with open(mem, "wb") as f:
        f.write(os.urandom(1 << 20) + bytes(1 << 20))
    snap = str(tmp_path / "snap")
    run_cli("save", str(mem), snap)
    run_cli("load", snap, str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == mem.read_bytes()


def test_cli_reports_errors_without_a_traceback(tmp_path):
    (tmp_path / "junk").write_bytes(b"not a snapshot at all")
    out = subprocess.run([sys.executable, "-m", "qfram", "load", str(tmp_path / "junk")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "not a QEMU migration stream" in out.stderr and "Traceback" not in out.stderr
