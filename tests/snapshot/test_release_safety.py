"""`--release` never costs RAM: a page is given back only once its bytes are durable in the
file that becomes the snapshot, and any failure before the snapshot is committed puts
every released page back, so the RAM ends byte-identical to how it began.

Failures are real: a full filesystem (a small tmpfs the test mounts), and EIO at write,
sync and rename from a fault injector loaded with LD_PRELOAD (the other syscalls run)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAM = 96 << 20

SAVE_SCRIPT = r"""
import json, sys, xxhash
from qfram import snapshot
from qfram.io import durable
put_back = []                      # pages the failed save read back into the RAM
real_undo = durable.DurableRelease.undo
def counting_undo(self, *args, **kwargs):
    put_back.append(sum(e.count for e in self.done))
    return real_undo(self, *args, **kwargs)
durable.DurableRelease.undo = counting_undo
from qfram.lab.demo import fill_demo
from qfram.ram import RAMBlock, RAMList
kind, layout, path, direct, memfile, size = sys.argv[1:7]
size = int(size)
if kind == "anonymous":
    block = RAMBlock.anonymous("pc.ram", size, huge=False)
elif kind == "memfd":
    block = RAMBlock.memfd("pc.ram", size)
else:
    block = RAMBlock.map_file("pc.ram", memfile, size, create=True)
fill_demo(block.region, seed=3)
before = xxhash.xxh3_64_hexdigest(block.region)
try:
    result = snapshot.save(RAMList([block]), path, layout=layout, release=True,
                           direct=direct == "1")
    error, released = None, result.released_bytes
except Exception as exc:
    error, released = f"{type(exc).__name__}: {exc}", None
print(json.dumps({"before": before, "after": xxhash.xxh3_64_hexdigest(block.region),
                  "error": error, "released": released, "put_back": sum(put_back)}))
"""


@pytest.fixture(scope="module")
def injector(tmp_path_factory):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler for the fault injector")
    lib = tmp_path_factory.mktemp("fi") / "faultinject.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(lib),
                    os.path.join(HERE, "helpers", "faultinject.c"), "-ldl"], check=True)
    return str(lib)


@pytest.fixture
def small_fs(tmp_path):
    """A real filesystem that fills up: a 48 MiB tmpfs (root only), full in the third
    32 MiB window of the demo RAM."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {out.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def save_in_child(kind, layout, out_dir, env=None, direct=False, size=RAM):
    memfile = f"/dev/shm/qfram-test-{os.getpid()}-{kind}-{layout}"
    try:
        proc = subprocess.run([sys.executable, "-c", SAVE_SCRIPT, kind, layout,
                               str(out_dir / "snap"), "1" if direct else "0", memfile,
                               str(size)], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, **(env or {})))
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    finally:
        if os.path.exists(memfile):
            os.unlink(memfile)


def old_snapshot(out_dir):
    """The snapshot a failed save must leave as it was."""
    from qfram import snapshot
    from qfram.ram import RAMBlock, RAMList
    snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", bytearray(b"old!" * 1024))]),
                  str(out_dir / "snap"))
    return (out_dir / "snap").read_bytes()


KINDS = ["anonymous", "memfd", "file"]
LAYOUTS = ["stream", "mapped"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_full_filesystem_costs_no_ram(small_fs, kind, layout):
    old = old_snapshot(small_fs)
    r = save_in_child(kind, layout, small_fs)
    assert r["error"] and "No space left" in r["error"], r
    assert r["put_back"] > 0, r            # pages were released, then put back
    assert r["after"] == r["before"]
    assert (small_fs / "snap").read_bytes() == old
    assert sorted(os.listdir(small_fs)) == ["snap"]


FAULTS = {
    # EIO at write after 60 MiB, in the third window: the first was released when the
    # second was written
    "write": "write:{dir}:62914560",
    # syncs: writeback of windows 0 and 1, fdatasync of 0 (released), writeback of 2,
    # then the fdatasync of window 1 fails
    "sync": "sync:{dir}:4",
    "rename": "rename:{dir}:0",           # everything written and synced, then EIO
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_an_io_error_costs_no_ram(tmp_path, injector, kind, layout, fault):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    old = old_snapshot(out_dir)
    env = {"LD_PRELOAD": injector, "QFRAM_FAULT": FAULTS[fault].format(dir=out_dir)}
    r = save_in_child(kind, layout, out_dir, env)
    assert r["error"] and "Input/output error" in r["error"], r
    assert r["put_back"] > 0, r            # pages were released, then put back
    assert r["after"] == r["before"], r
    assert (out_dir / "snap").read_bytes() == old
    assert sorted(os.listdir(out_dir)) == ["snap"]


@pytest.mark.parametrize("fault", ["write", "sync"])
def test_direct_io_saves_cost_no_ram_either(tmp_path, injector, fault):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    probe = save_in_child("anonymous", "mapped", out_dir, direct=True, size=4 << 20)
    if probe["error"] and "Invalid argument" in probe["error"]:
        pytest.skip(f"{out_dir} refuses O_DIRECT")
    os.unlink(out_dir / "snap")
    env = {"LD_PRELOAD": injector, "QFRAM_FAULT": FAULTS[fault].format(dir=out_dir)}
    r = save_in_child("memfd", "mapped", out_dir, env, direct=True)
    assert r["error"] and r["after"] == r["before"], r
    assert os.listdir(out_dir) == []


def test_when_pages_cannot_be_put_back_the_temporary_file_is_kept_and_named(tmp_path,
                                                                            injector):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {"LD_PRELOAD": injector, "QFRAM_FAULT": f"writeread:{out_dir}:62914560"}
    r = save_in_child("file", "mapped", out_dir, env)
    kept = [n for n in os.listdir(out_dir) if n != "snap"]
    assert len(kept) == 1 and kept[0] in r["error"], r
    assert "could not be put back" in r["error"]


def test_a_successful_release_save_still_frees_memory_as_it_goes(tmp_path):
    r = save_in_child("memfd", "stream", tmp_path)
    assert r["error"] is None and r["released"] == RAM


def test_the_cli_reports_a_full_disk_and_leaves_the_memory_file_whole(small_fs, tmp_path):
    import xxhash
    from qfram.lab.demo import fill_demo
    mem = f"/dev/shm/qfram-cli-{os.getpid()}"
    try:
        with open(mem, "wb") as f:
            f.truncate(RAM)
        import mmap
        with open(mem, "r+b") as f, mmap.mmap(f.fileno(), RAM) as m:
            fill_demo(m, seed=4)
            before = xxhash.xxh3_64_hexdigest(m)
        out = subprocess.run([sys.executable, "-m", "qfram", "save", mem,
                              str(small_fs / "snap"), "--release"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 1 and "No space left" in out.stderr
        assert "Traceback" not in out.stderr
        with open(mem, "rb") as f:
            assert xxhash.xxh3_64_hexdigest(f.read()) == before
    finally:
        os.unlink(mem)


STREAM_SCRIPT = r"""
import json, mmap, os, sys, xxhash
from qfram.cli import main
mem, out = sys.argv[1:3]
with open(mem, "rb") as f:
    before = xxhash.xxh3_64_hexdigest(f.read())
code = main(["stream", mem, out, "--release", "--json"])
with open(mem, "rb") as f:
    after = xxhash.xxh3_64_hexdigest(f.read())
print(json.dumps({"code": code, "before": before, "after": after}))
"""


@pytest.mark.parametrize("fault", [None, "write", "sync"])
def test_stream_release_into_a_file_waits_for_durable_bytes(tmp_path, injector, fault):
    import mmap
    from qfram.lab.demo import fill_demo
    mem = f"/dev/shm/qfram-stream-{os.getpid()}"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    try:
        with open(mem, "wb") as f:
            f.truncate(RAM)
        with open(mem, "r+b") as f, mmap.mmap(f.fileno(), RAM) as m:
            fill_demo(m, seed=5)
        env = dict(os.environ)
        if fault:
            env.update(LD_PRELOAD=injector, QFRAM_FAULT=FAULTS[fault].format(dir=out_dir))
        proc = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, mem,
                               str(out_dir / "records")], capture_output=True, text=True,
                              timeout=300, env=env)
        r = json.loads(proc.stdout.splitlines()[-1])
        if fault is None:
            assert r["code"] == 0 and r["after"] != r["before"]      # released: holes now
            assert os.path.getsize(out_dir / "records") > RAM // 2
        else:
            assert r["code"] == 1 and "Input/output error" in proc.stderr
            assert r["after"] == r["before"]
            assert os.listdir(out_dir) == []
    finally:
        os.unlink(mem)


# -- postcopy release-ram: only what the destination confirmed ------------------------------

DESTINATION_SCRIPT = r"""
import sys
from qfram import postcopy
from qfram.postcopy import Workload
ram, stats = postcopy.receive(sys.argv[1], confirm=sys.argv[2] == "1", timeout=5,
                              workload=lambda ram: Workload(ram, kinds=("read",)))
print("received", stats.verified)
"""


@pytest.mark.parametrize("confirming", [False, True])
def test_postcopy_release_frees_only_confirmed_pages(tmp_path, confirming):
    import signal
    import threading
    import time
    import xxhash
    from qfram import postcopy
    from qfram.lab.demo import fill_demo
    from qfram.ram import RAMBlock, RAMList
    block = RAMBlock.memfd("pc.ram", 256 << 20)
    fill_demo(block.region, seed=6)
    original = bytes(block.region)
    before = xxhash.xxh3_64_hexdigest(original)
    address = str(tmp_path / "m.sock")
    dest = subprocess.Popen([sys.executable, "-c", DESTINATION_SCRIPT, address,
                             "1" if confirming else "0"])
    try:
        while not os.path.exists(address):
            time.sleep(0.01)
        source = postcopy.Source(RAMList([block]), postcopy.link.connect(address),
                                 preempt=postcopy.link.connect(address), release=True,
                                 max_rounds=0, timeout=2)
        outcome = {}

        def run():
            try:
                outcome["stats"] = source.run()
            except BaseException as exc:
                outcome["error"] = exc

        t = threading.Thread(target=run)
        t.start()
        while source.stats.downtime_source_ms is None and t.is_alive():
            time.sleep(0.0005)
        deadline = time.time() + 10
        while confirming and not source.releases.released_bytes and time.time() < deadline:
            time.sleep(0.0005)                    # it confirmed pages: some are freed
        dest.send_signal(signal.SIGSTOP)          # the destination stops mid-postcopy...
        time.sleep(0.3)
        dest.kill()                               # ...and dies
        t.join(60)
        assert "error" in outcome, "the migration finished before the destination died"
        released = source.releases.released_bytes
        if confirming:
            # what it confirmed is freed (reads as zero now), everything else is intact
            assert 0 < released < 256 << 20
            region = memoryview(block.region)
            gone = [i for i in range(0, len(original), 4096)
                    if region[i:i + 4096] != original[i:i + 4096]]
            assert all(region[i:i + 4096] == bytes(4096) for i in gone)
            region.release()
            assert len(gone) * 4096 <= released
        else:
            assert released == 0
            assert xxhash.xxh3_64_hexdigest(block.region) == before
    finally:
        dest.kill()
        dest.wait()
        block.close()
