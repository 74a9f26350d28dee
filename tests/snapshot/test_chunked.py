"""The chunked layout: compressed chunks with an index, restored eagerly on several
threads or lazily a chunk per fault — and hostile files refused with the byte offset."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qfram import FormatError, snapshot
from qfram.lazy import LazyRestore
from qfram.lab import workloads
from qfram.snapshot import chunked
from qfram.lab.demo import fill_demo
from qfram.ram import RAMBlock, RAMList

CHUNK = 64 << 10


def demo_ram():
    # a block that is not a whole number of chunks, and one with a zero stretch
    ram = RAMList([RAMBlock.anonymous("pc.ram", (8 << 20) + 3 * 4096, huge=False),
                   RAMBlock.anonymous("vga.vram", 1 << 20, huge=False)])
    fill_demo(ram["pc.ram"].region, seed=7)
    memoryview(ram["pc.ram"].region)[1 << 20:2 << 20] = bytes(1 << 20)
    fill_demo(ram["vga.vram"].region, seed=8)
    return ram


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ram = demo_ram()
    original = {b.name: bytes(b.region) for b in ram}
    paths = {}
    for codec in chunked.CODECS:
        paths[codec] = str(tmp_path_factory.mktemp(codec) / "snap")
        snapshot.save(ram, paths[codec], layout="chunked", compress=codec)
    mapped = str(tmp_path_factory.mktemp("mapped") / "snap")
    snapshot.save(ram, mapped, layout="mapped")
    ram.close()
    return paths, mapped, original


@pytest.mark.parametrize("codec", chunked.CODECS)
def test_every_byte_comes_back_eagerly(saved, codec):
    paths, _, original = saved
    ram, result = snapshot.load(paths[codec], threads=3)
    assert result.layout == "chunked" and result.verified
    assert {b.name: bytes(b.region) for b in ram} == original
    # and into the caller's RAM, which held something else
    target = demo_ram()
    memoryview(target["pc.ram"].region)[:4096] = b"x" * 4096
    snapshot.load(paths[codec], target)
    assert {b.name: bytes(b.region) for b in target} == original


@pytest.mark.parametrize("codec", chunked.CODECS)
def test_every_byte_comes_back_lazily(saved, codec):
    paths, _, original = saved
    # no background fill until the workload is done: its touches are served as faults,
    # then wait() fills the rest
    with LazyRestore(paths[codec], record=False, background=False) as lazy:
        workloads.touch_workload(lazy.ram, 400, threads=2)
        stats = lazy.wait()
        assert {b.name: bytes(b.region) for b in lazy.ram} == original
    assert stats.verified and stats.faults > 0


def test_it_is_smaller_than_the_mapped_file_and_says_what_it_holds(saved):
    paths, mapped, _ = saved
    on_disk = lambda p: os.stat(p).st_blocks * 512  # noqa: E731
    assert on_disk(paths["lz4"]) < 0.75 * on_disk(mapped)
    info = snapshot.inspect(paths["zstd"])
    assert info.layout == "chunked" and info.compression == "zstd"
    facts = info.as_dict()
    assert facts["chunks"]["zero"] == (1 << 20) // CHUNK      # the zero stretch: holes
    assert facts["format"] == "qfram-chunked"


def test_the_working_set_is_prefetched_from_chunks_too(saved, tmp_path):
    paths, _, original = saved
    path = str(tmp_path / "snap")
    os.link(paths["lz4"], path)
    for run in range(2):
        with LazyRestore(path, background=False) as lazy:
            workloads.hot_set_workload(lazy.ram, 64, threads=2)
            during = lazy.server.counters["faults"]
            stats = lazy.wait()
    assert stats.prefetch_pages >= 64 and during == 0


# -- hostile files -------------------------------------------------------------------------

def parts(path):
    data = open(path, "rb").read()
    head = chunked._HEAD.unpack(data[:chunked._HEAD.size])
    index_at, index_len, desc_at, desc_len, dev_at, dev_len = head[3:9]
    return (data[:index_at], data[index_at:index_at + index_len],
            json.loads(data[desc_at:desc_at + desc_len]), data[dev_at:dev_at + dev_len],
            head[2])


def forge(path, out, *, index=None, desc=None, body=None):
    """Rebuild a chunked file with other parts and every checksum made good again: what
    a hostile file looks like once the easy checks pass."""
    b, i, d, dev, chunk = parts(path)
    body = b if body is None else body
    i = i if index is None else index
    d = json.dumps(d if desc is None else desc).encode()
    at = len(body)
    head = chunked._HEAD.pack(chunked.MAGIC, 1, chunk, at, len(i), at + len(i), len(d),
                              at + len(i) + len(d), len(dev),
                              xxhash.xxh3_64_intdigest(i + d + dev))
    head += struct.pack(">Q", xxhash.xxh3_64_intdigest(head))
    data = head + body[len(head):] + i + d + dev
    open(out, "wb").write(data)
    return out


def entry(index, k, **change):
    fields = dict(zip(("offset", "length", "kind", "hash"),
                      chunked._ENTRY.unpack_from(index, k * chunked._ENTRY.size)))
    fields.update(change)
    at = k * chunked._ENTRY.size
    return index[:at] + chunked._ENTRY.pack(*fields.values()) + index[at + chunked._ENTRY.size:]


def hostile_cases(path, tmp_path):
    body, index, desc, _, _ = parts(path)
    first = chunked._ENTRY.unpack_from(index, 0)
    cases = {
        "past the data": (forge(path, tmp_path / "a", index=entry(index, 0, offset=len(body))),
                          "lie outside the chunk data", 64),
        "unknown kind": (forge(path, tmp_path / "b", index=entry(index, 3, kind=9)),
                         "kind 9", 64 + 3 * 24),
        "raw of the wrong size": (forge(path, tmp_path / "c", index=entry(index, 5, kind=1)),
                                  "do not fit its kind", 64 + 5 * 24),
    }
    long_name = json.loads(json.dumps(desc))
    long_name["qfram"]["blocks"][0]["name"] = "x" * 300
    cases["a block name past 255 bytes"] = (forge(path, tmp_path / "f", desc=long_name),
                                           "a block name of 300 bytes", 64)
    huge = json.loads(json.dumps(desc))
    huge["qfram"]["blocks"][0]["used_length"] = 1 << 40           # a terabyte declared
    cases["a terabyte declared"] = (forge(path, tmp_path / "d", desc=huge),
                                    "the index ends before", 64)
    flipped = bytearray(body)
    flipped[first[0] + first[1] // 2] ^= 0x55                      # inside chunk 0's bytes
    cases["a damaged chunk"] = (forge(path, tmp_path / "e", body=bytes(flipped)),
                                "chunk 0", first[0])
    return cases


@pytest.mark.parametrize("case", ["past the data", "unknown kind", "raw of the wrong size",
                                  "a terabyte declared", "a damaged chunk",
                                  "a block name past 255 bytes"])
def test_a_hostile_file_is_refused_with_the_byte_offset(saved, tmp_path, case):
    path, message, offset = hostile_cases(saved[0]["lz4"], tmp_path)[case]
    with pytest.raises(FormatError, match=message) as err:
        snapshot.load(str(path))
    if case in ("past the data", "unknown kind", "raw of the wrong size"):
        body_len = len(parts(saved[0]["lz4"])[0])
        assert err.value.offset == body_len + offset - 64
    elif case == "a damaged chunk":
        assert err.value.offset == offset
    out = subprocess.run([sys.executable, "-m", "qfram", "load", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "byte" in out.stderr


def test_a_damaged_chunk_ends_a_lazy_restore_with_a_reason(saved, tmp_path):
    path, _, _ = hostile_cases(saved[0]["lz4"], tmp_path)["a damaged chunk"]
    out = subprocess.run([sys.executable, "-m", "qfram", "load", str(path), "--lazy",
                          "--no-record"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "damaged" in out.stderr


def qfram(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qfram", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def refused(out, *words) -> None:
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and all(w in out.stderr for w in words), out.stderr


def test_a_chunked_file_without_ram_is_refused_eagerly_and_lazily(saved, tmp_path):
    _, _, desc, _, _ = parts(saved[0]["lz4"])
    desc["qfram"]["blocks"] = []
    path = forge(saved[0]["lz4"], tmp_path / "empty", index=b"", desc=desc)
    for args in (["load", path], ["load", path, "--lazy"], ["extract", path, tmp_path / "x"],
                 ["rewrite", path, tmp_path / "y", "--layout", "mapped"]):
        refused(qfram(*args), "a snapshot without RAM")     # was: restored 0 B, exit 0
    with pytest.raises(FormatError, match="without RAM"):
        LazyRestore(str(path))


def test_a_ram_section_id_past_32_bits_is_refused(saved, tmp_path):
    _, _, desc, _, _ = parts(saved[0]["lz4"])
    desc["qfram"]["ram_section_id"] = 1 << 40
    path = forge(saved[0]["lz4"], tmp_path / "sid", desc=desc)
    refused(qfram("rewrite", path, tmp_path / "out"), "does not fit QEMU's 32 bits")


def test_an_index_whose_chunks_overlap_is_refused(saved, tmp_path):
    """Chunk 1 pointing at chunk 0's bytes, with chunk 0's hash: every chunk decodes
    and matches its hash, and the block would hold the wrong bytes."""
    _, index, _, _, _ = parts(saved[0]["lz4"])
    offset, length, kind, digest = chunked._ENTRY.unpack_from(index, 0)
    path = forge(saved[0]["lz4"], tmp_path / "overlap",
                 index=entry(index, 1, offset=offset, length=length, kind=kind, hash=digest))
    with pytest.raises(FormatError, match="chunks overlap, or leave a gap") as err:
        snapshot.load(str(path))
    assert err.value.offset == len(parts(saved[0]["lz4"])[0]) + chunked._ENTRY.size
    for args in (["load", path], ["load", path, "--no-verify"], ["load", path, "--lazy"],
                 ["rewrite", path, tmp_path / "out"]):
        refused(qfram(*args), "chunks overlap")


def test_eager_load_and_rewrite_check_block_checksums_and_say_what_they_checked(saved,
                                                                              tmp_path):
    _, _, desc, _, _ = parts(saved[0]["lz4"])
    desc["qfram"]["blocks"][1]["xxh3_64"] = "0123456789abcdef"       # chunks all good
    path = forge(saved[0]["lz4"], tmp_path / "lying", desc=desc)
    for args in (["load", path], ["rewrite", path, tmp_path / "out"]):
        refused(qfram(*args), "block 'vga.vram'", "the snapshot recorded 0123456789abcdef")
    unchecked = qfram("load", path, "--no-verify")
    assert unchecked.returncode == 0, unchecked.stderr
    assert unchecked.stdout.rstrip().endswith(
        "block checksums not verified (--no-verify); every chunk's hash checked")
    good = qfram("load", saved[0]["lz4"])
    assert good.stdout.rstrip().endswith(
        "checksums verified (every chunk's hash, every block's checksum)"), good.stdout
    rewritten = qfram("rewrite", saved[0]["lz4"], tmp_path / "good", "--layout", "mapped")
    assert rewritten.stdout.rstrip().endswith("input checksums verified (every chunk's "
                                              "hash, every block's checksum)")


def test_extract_writes_a_chunked_snapshots_blocks(saved, tmp_path):
    paths, _, original = saved
    out = qfram("extract", paths["zstd"], tmp_path / "x", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["verified"] is True
    for name, data in original.items():
        assert (tmp_path / "x" / name).read_bytes() == data
    zero = (tmp_path / "x" / "pc.ram").stat()
    assert zero.st_blocks * 512 < zero.st_size              # the zero stretch: a hole


def test_a_chunked_save_shows_progress_on_a_terminal(tmp_path):
    import pty
    controller, terminal = pty.openpty()
    run = subprocess.Popen([sys.executable, "-m", "qfram", "save", "--demo", "32M",
                            str(tmp_path / "snap"), "--layout", "chunked"],
                           stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(controller, 1 << 16)
        except OSError:                     # EIO: the other end is closed
            break
        if not data:
            break
        shown += data
    os.close(controller)
    assert run.wait(60) == 0
    assert b"save [" in shown and b"100.0% 32.00 MiB / 32.00 MiB" in shown, shown


class Saved:
    """The lz4 file and the RAM it holds, shown briefly (hypothesis prints its
    arguments)."""

    def __init__(self, saved) -> None:
        self.path, self.original = saved[0]["lz4"], saved[2]

    def __repr__(self) -> str:
        return f"<Saved {self.path}>"


@pytest.fixture
def lz4(saved) -> Saved:
    return Saved(saved)


@settings(max_examples=120, deadline=2000, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                        min_size=1, max_size=6),
       desc_change=st.sampled_from([None, ("ram_section_id", -1), ("chunk_bytes", 4096),
                                    ("machine", 7), ("blocks", []), ("ram_section_id", 2.5),
                                    ("used_length", 4096), ("used_length", 1 << 50)]))
def test_the_chunked_index_parser_refuses_any_damage_with_a_reason(lz4, tmp_path, changes,
                                                                   desc_change):
    """Random bytes of the index changed (every checksum made good again), and the
    description's numbers: reading and loading say FormatError, or give every byte
    back as saved."""
    body, index, desc, _, _ = parts(lz4.path)
    damaged = bytearray(index)
    for at, value in changes:
        damaged[at % len(damaged)] = value
    if desc_change is not None:
        key, value = desc_change
        if key == "used_length":
            desc["qfram"]["blocks"][0][key] = value
        else:
            desc["qfram"][key] = value
    path = forge(lz4.path, tmp_path / "fuzz", index=bytes(damaged), desc=desc)
    try:
        ram, result = snapshot.load(str(path), force=True)
    except FormatError:
        return
    try:
        assert result.verified
        assert {b.name: bytes(b.region) for b in ram} == lz4.original
    finally:
        ram.close()


@pytest.mark.parametrize("cut", [10, 100, -1])
def test_a_cut_file_is_refused(saved, tmp_path, cut):
    data = open(saved[0]["lz4"], "rb").read()
    path = tmp_path / "cut"
    path.write_bytes(data[:cut] if cut > 0 else data[:len(data) // 2])
    with pytest.raises(FormatError):
        snapshot.load(str(path))


def test_the_chunked_layout_refuses_what_it_cannot_do(tmp_path):
    ram = RAMList([RAMBlock.anonymous("pc.ram", 1 << 20, huge=False)])
    for bad in (dict(release=True), dict(compress="zlib"), dict(chunk_bytes=3000)):
        with pytest.raises(ValueError):
            snapshot.save(ram, str(tmp_path / "x"), layout="chunked", **bad)


@pytest.mark.parametrize("layout", ["mapped", "stream", "chunked"])
def test_rewrite_converts_to_every_layout_and_back(saved, tmp_path, layout):
    paths, _, original = saved
    there, back = str(tmp_path / "there"), str(tmp_path / "back")
    for source, target, to in ((paths["zstd"], there, layout), (there, back, "chunked")):
        codec = [] if to == "mapped" else ["--codec", "lz4"]     # a stream takes lz4 too
        out = subprocess.run([sys.executable, "-m", "qfram", "rewrite", source, target,
                              "--layout", to, *codec], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
    assert snapshot.inspect(there).layout == layout
    for path in (there, back):
        ram, result = snapshot.load(path)
        assert result.verified and {b.name: bytes(b.region) for b in ram} == original
        ram.close()


# -- failures ------------------------------------------------------------------------------

def test_a_chunked_file_cut_during_a_lazy_restore_is_an_error_not_a_crash(saved, tmp_path):
    # chunks are read with pread: a file cut under the restore fails the read (EIO)
    # where a mapping would SIGBUS
    path = tmp_path / "snap"
    path.write_bytes(open(saved[0]["lz4"], "rb").read())
    lazy = LazyRestore(str(path), background=False, on_failure="raise",
                              record=False, prefetch=False)
    os.truncate(path, 8192)
    with pytest.raises(OSError, match="Input/output error"):
        lazy.wait()
    lazy.close()


@pytest.fixture(scope="module")
def injector(tmp_path_factory):
    import shutil
    if shutil.which("cc") is None:
        pytest.skip("no C compiler for the fault injector")
    lib = tmp_path_factory.mktemp("fi") / "faultinject.so"
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(lib),
                    os.path.join(here, "helpers", "faultinject.c"), "-ldl"], check=True)
    return str(lib)


@pytest.mark.parametrize("fault, message", [
    ("write:{dir}:4194304", "Input/output error"),       # the disk dies 4 MiB in
    ("full:{dir}:4194304", "No space left"),
    ("sync:{dir}:0", "Input/output error"),              # the data never reaches it
    ("rename:{dir}:0", "Input/output error"),            # all written, then the rename
])
def test_a_failed_chunked_save_leaves_the_old_snapshot_and_nothing_else(tmp_path, injector,
                                                                        fault, message):
    out = tmp_path / "out"
    out.mkdir()
    snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", bytearray(b"old!" * 1024))]),
                  str(out / "snap"))
    old = (out / "snap").read_bytes()
    env = dict(os.environ, LD_PRELOAD=injector, QFRAM_FAULT=fault.format(dir=out))
    run = subprocess.run([sys.executable, "-m", "qfram", "save", "--demo", "32M",
                          str(out / "snap"), "--layout", "chunked"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 1 and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert (out / "snap").read_bytes() == old
    assert os.listdir(out) == ["snap"]


def test_a_chunked_save_killed_midway_leaves_the_old_snapshot(tmp_path):
    import signal
    import time
    out = tmp_path / "out"
    out.mkdir()
    snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", bytearray(b"old!" * 1024))]),
                  str(out / "snap"))
    old = (out / "snap").read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "qfram", "save", "--demo", "512M",
                             str(out / "snap"), "--layout", "chunked", "--codec", "zstd"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    writing = False
    while not writing and time.time() < deadline and proc.poll() is None:
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):     # its new file is open: kill it
            try:
                target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(out)) and target != str(out / "snap"):
                writing = True
        time.sleep(0.001)
    assert writing, "the save never opened its new file"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "snap").read_bytes() == old
    assert os.listdir(out) == ["snap"]
