"""Dirty-only reset: a snapshot's RAM returned to the snapshot again and again by undoing
only the pages written since — what fuzzers and sandbox pools do by hand."""
from __future__ import annotations

import random
import subprocess
import sys
import threading

import pytest

from conftest import PAGE
from qfram import FormatError, snapshot
from qfram.lab.demo import fill_demo
from qfram.ram import RAMBlock, RAMList
from qfram.lazy.reset import Resettable

pytestmark = pytest.mark.skipif(
    not __import__("qfram._uffd", fromlist=["DirtyTracker"]).DirtyTracker.available(),
    reason="userfaultfd asynchronous write protection needs Linux 6.7+")


def saved(tmp_path, layout="mapped", size=8 << 20):
    ram = RAMList([RAMBlock.anonymous("pc.ram", size, huge=False),
                   RAMBlock.anonymous("vga.vram", 1 << 20, huge=False)])
    fill_demo(ram["pc.ram"].region, seed=3)
    fill_demo(ram["vga.vram"].region, seed=4)
    path = str(tmp_path / "snap")
    snapshot.save(ram, path, layout=layout)
    original = {b.name: bytes(b.region) for b in ram}
    ram.close()
    return path, original


def test_a_reset_undoes_exactly_the_pages_written(tmp_path):
    path, original = saved(tmp_path)
    with Resettable(path) as box:
        assert {b.name: bytes(b.region) for b in box.ram} == original
        rng = random.Random(1)
        for round_ in range(5):
            written = set()
            for _ in range(50 * (round_ + 1)):
                block = box.ram["pc.ram" if rng.random() < 0.8 else "vga.vram"]
                page = rng.randrange(block.npages)
                block.region[page * PAGE + rng.randrange(PAGE)] = 0x5A ^ round_
                written.add((block.name, page))
            stats = box.reset()
            # every written page, and (a page written twice being one page) nothing else
            assert stats.pages == len(written)
            assert {b.name: bytes(b.region) for b in box.ram} == original
            assert box.verify()


def test_a_reset_after_no_writes_does_nothing(tmp_path):
    path, original = saved(tmp_path)
    with Resettable(path) as box:
        box.ram["pc.ram"].region[0]          # reads are not writes
        assert box.reset().pages == 0
        assert bytes(box.ram["pc.ram"].region) == original["pc.ram"]


def test_the_snapshot_file_is_never_written(tmp_path):
    path, _ = saved(tmp_path)
    before = open(path, "rb").read()
    with Resettable(path) as box:
        box.ram["pc.ram"].region[:] = b"\xff" * len(box.ram["pc.ram"].region)
        box.reset()
    assert open(path, "rb").read() == before


def test_writers_and_readers_between_resets_never_see_a_torn_snapshot(tmp_path):
    # a sandbox: one thread writes stamps into random pages while another reads; at
    # every reset (the threads paused, as a pool does between runs) the RAM is the
    # snapshot again, checked against its checksums
    path, original = saved(tmp_path)
    snap = original["pc.ram"]
    with Resettable(path) as box:
        region = box.ram["pc.ram"].region
        npages = box.ram["pc.ram"].npages
        for round_ in range(8):
            stamp = (round_ + 1).to_bytes(8, "little") * 2
            stop = threading.Event()
            bad = []

            def writer():
                rng = random.Random(round_)
                while not stop.is_set():
                    off = rng.randrange(npages) * PAGE
                    region[off:off + 16] = stamp

            def reader():
                rng = random.Random(100 + round_)
                while not stop.is_set():
                    off = rng.randrange(npages) * PAGE
                    got = region[off:off + 16]
                    if got != snap[off:off + 16] and got != stamp:
                        bad.append(off)

            threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
            for t in threads:
                t.start()
            threading.Event().wait(0.05)
            stop.set()
            for t in threads:
                t.join()
            assert not bad, f"round {round_}: pages neither the snapshot's nor written: {bad[:5]}"
            assert box.reset().pages > 0
            assert box.verify()
            assert region[:] == snap


def test_only_the_mapped_layout_resets(tmp_path):
    path, _ = saved(tmp_path, layout="stream")
    with pytest.raises(FormatError, match="mapped layout"):
        Resettable(path)


@pytest.mark.parametrize("lazy", [[], ["--lazy"]])
def test_the_reset_loop_demo_reports_and_verifies(tmp_path, lazy):
    path, _ = saved(tmp_path)
    out = subprocess.run([sys.executable, "-m", "qfram", "load", path, "--reset-loop", "20",
                          "--dirty-pages", "100", "--json", *lazy],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json
    report = json.loads(out.stdout)
    assert report["resets"] == 20
    assert 90 <= report["pages_per_reset"] <= 100  # random pages, a few hit twice
    assert report["verified"] is True
    assert report["reset_us"]["p50"] > 0


# -- the same for anonymous memory a userfaultfd restore fills -------------------------------

@pytest.mark.parametrize("layout", ["mapped", "chunked"])
def test_a_lazy_restore_resets_to_the_snapshot(tmp_path, layout):
    from qfram.lazy.restore import LazyRestore
    path, original = saved(tmp_path, layout=layout)
    with LazyRestore(path, resettable=True, record=False, background=False) as lazy:
        pc = lazy.ram["pc.ram"].region
        pc[5 * PAGE] = 0x11                   # written before the restore is complete
        lazy.wait(verify=False)               # (so it is not the snapshot's now)
        rng = random.Random(2)
        for round_ in range(4):
            written = {5} if round_ == 0 else set()
            for _ in range(40):
                page = rng.randrange(len(pc) // PAGE)
                pc[page * PAGE] = (pc[page * PAGE] + 1) & 0xFF   # zero pages included
                written.add(page)
            stats = lazy.reset()
            assert stats.pages == len(written)
            assert bytes(pc) == original["pc.ram"]               # placed again on touch
            assert lazy.verify()
        assert lazy.reset().pages == 0                           # reads are not writes
        # resets in a row, the dropped pages not touched in between (holes then)
        for round_ in range(3):
            pc[(100 + round_) * PAGE] = 0x22
            assert lazy.reset().pages == 1
        assert bytes(pc) == original["pc.ram"]


def test_a_lazy_reset_is_refused_before_the_restore_is_complete(tmp_path):
    from qfram.lazy.restore import LazyRestore
    path, _ = saved(tmp_path)
    with LazyRestore(path, resettable=True, record=False) as lazy:
        with pytest.raises(ValueError, match="wait"):
            lazy.reset()
        lazy.wait()
    with LazyRestore(path, record=False) as lazy:
        lazy.wait()
        with pytest.raises(ValueError, match="resettable"):
            lazy.reset()


def test_a_page_the_bitmap_calls_zero_reads_zero_even_over_stale_bytes(tmp_path):
    # QEMU's mapped-ram clears a page's bit when the page turns zero, but leaves what an
    # earlier pass wrote in the file: the snapshot's page is zero, not those bytes
    path, original = saved(tmp_path)
    info = snapshot.inspect(path)
    pc = next(b for b in info.blocks if b.name == "pc.ram")
    zero_pages = [i for i in range(pc.npages)
                  if original["pc.ram"][i * PAGE:(i + 1) * PAGE] == bytes(PAGE)][:3]
    with open(path, "r+b") as f:
        f.truncate(info.eof_offset + 1)      # no qfram description: a file as QEMU's
        for i in zero_pages:
            f.seek(pc.pages_offset + i * PAGE)
            f.write(b"stale bytes " * (PAGE // 12))
    assert not snapshot.inspect(path).written_by_qfram
    with Resettable(path) as box:
        assert bytes(box.ram["pc.ram"].region) == original["pc.ram"]
        box.ram["pc.ram"].region[zero_pages[0] * PAGE] = 1          # a write there ...
        assert box.reset().pages == 1                              # ... is undone too
        assert bytes(box.ram["pc.ram"].region) == original["pc.ram"]
