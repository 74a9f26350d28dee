"""Working-set record and prefetch: a lazy restore remembers the pages a program touched
first (SNAP.ws), and the next restore places them before the program asks."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import xxhash

from qfram import snapshot
from qfram.lazy import LazyRestore
from qfram.lab import workloads
from qfram.format import workingset
from qfram.lab.demo import fill_demo
from qfram.ram import RAMBlock, RAMList

HOT = 512


@pytest.fixture
def snap(tmp_path):
    ram = RAMList([RAMBlock.anonymous("pc.ram", 16 << 20, huge=False),
                   RAMBlock.anonymous("vga.vram", 2 << 20, huge=False)])
    fill_demo(ram["pc.ram"].region, seed=5)
    fill_demo(ram["vga.vram"].region, seed=6)
    path = str(tmp_path / "snap")
    snapshot.save(ram, path, layout="mapped")
    ram.close()
    return path


def restore(path, **kw):
    """A lazy restore that places only what is touched (no background fill), the hot
    set workload, then completion: the faults the workload caused, and the stats."""
    with LazyRestore(path, background=False, **kw) as lazy:
        workloads.hot_set_workload(lazy.ram, HOT, threads=2)
        during = lazy.server.counters["faults"]
        stats = lazy.wait()
    assert stats.verified
    return during, stats


def test_the_second_restore_places_the_working_set_before_it_is_touched(snap):
    faults_first, stats = restore(snap, window_pages=1)
    assert faults_first >= HOT * 0.9          # every hot page faulted (threads may double up)
    assert "recorded" in stats.working_set
    ws, _ = workingset.load(snap, os.open(snap, os.O_RDONLY), snapshot.inspect(snap))
    assert ws is not None and ws.pages == HOT

    faults_second, stats = restore(snap, window_pages=16)
    assert stats.prefetch_pages == HOT
    assert faults_second == 0                 # nothing left for the program to wait for
    # and with prefetch off it faults as before
    faults_off, stats = restore(snap, prefetch=False, record=False)
    assert faults_off > 0 and stats.prefetch_pages == 0


def test_new_first_touches_are_added_to_the_working_set(snap):
    restore(snap, window_pages=1)
    with LazyRestore(snap, background=False) as lazy:
        workloads.hot_set_workload(lazy.ram, HOT, threads=2)
        lazy.ram["vga.vram"].region[4096 * 7]           # a page the first run did not read
        lazy.wait()
    ws, _ = workingset.load(snap, os.open(snap, os.O_RDONLY), snapshot.inspect(snap))
    assert ws.touches[-1] == (1, 7) and ws.pages == HOT + 1


def test_a_stale_working_set_is_ignored(snap):
    restore(snap, window_pages=1)
    os.utime(snap, ns=(1, 1))                 # as any rewrite of the snapshot would
    during, stats = restore(snap, record=False)
    assert stats.prefetch_pages == 0 and during > 0
    assert "stale" in stats.working_set


def forge(snap, touches, count=None, window=1):
    """A sidecar with a good checksum and hostile contents."""
    fd = os.open(snap, os.O_RDONLY)
    info = snapshot.inspect(snap)
    ws = workingset.WorkingSet(touches, window, 0)
    workingset.save(snap, fd, info, ws)
    data = bytearray(open(workingset.sidecar_of(snap), "rb").read()[:-8])
    if count is not None:
        at = len(data) - 12 * len(touches) - 8      # the count, just before the touches
        data[at:at + 8] = struct.pack(">Q", count)
    data += struct.pack(">Q", xxhash.xxh3_64_intdigest(bytes(data)))
    os.unlink(workingset.sidecar_of(snap))
    open(workingset.sidecar_of(snap), "wb").write(data)
    os.close(fd)


@pytest.mark.parametrize("hostile, reason", [
    (dict(touches=[(0, 1), (0, 4096)]), "lies outside the snapshot"),     # past pc.ram
    (dict(touches=[(2, 0)]), "lies outside the snapshot"),                # no block 2
    (dict(touches=[(0, 1)], count=1 << 40), "touches declared at byte offset"),
    (dict(touches=[(0, 1)], window=0), "a window of 0 pages at byte offset 12"),
    (dict(touches=[(0, 1)], window=1 << 31), "a window of 2147483648 pages"),
])
def test_a_hostile_working_set_is_ignored_and_names_the_offset(snap, hostile, reason):
    forge(snap, **hostile)
    during, stats = restore(snap, record=False)
    assert stats.prefetch_pages == 0 and reason in stats.working_set


def test_a_damaged_working_set_is_ignored(snap):
    restore(snap, window_pages=1)
    path = workingset.sidecar_of(snap)
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0xFF
    open(path, "wb").write(data)
    _, stats = restore(snap, record=False)
    assert stats.prefetch_pages == 0 and "checksum mismatch" in stats.working_set


def test_a_symlink_in_place_of_the_working_set_is_neither_read_nor_followed(snap, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.symlink(victim, workingset.sidecar_of(snap))
    _, stats = restore(snap, window_pages=1)
    assert stats.prefetch_pages == 0
    assert victim.read_bytes() == b"keep me"  # the new sidecar replaced the link
    assert not os.path.islink(workingset.sidecar_of(snap))


def test_info_shows_the_working_set(snap):
    run = lambda: subprocess.run([sys.executable, "-m", "qfram", "info", snap, "--json"],  # noqa: E731
                                 capture_output=True, text=True, timeout=60)
    assert json.loads(run().stdout)["working_set"] == {"note": "no working set recorded"}
    restore(snap, window_pages=1)
    shown = json.loads(run().stdout)["working_set"]
    assert shown["pages"] == HOT and shown["window_pages"] == 1 and shown["recorded"]


def test_a_working_set_cut_short_with_a_good_checksum_is_ignored(snap):
    restore(snap, window_pages=1)
    path = workingset.sidecar_of(snap)
    data = open(path, "rb").read()
    head = data[:workingset._HEAD.size] + struct.pack(">I", 5) + b"\x07pc."   # cut there
    open(path, "wb").write(head + struct.pack(">Q", xxhash.xxh3_64_intdigest(head)))
    _, stats = restore(snap, record=False)
    assert stats.prefetch_pages == 0 and "ignored" in stats.working_set


def test_a_working_set_that_cannot_be_written_is_reported_not_raised(tmp_path):
    ram = RAMList([RAMBlock.anonymous("pc.ram", 1 << 20, huge=False)])
    note = workingset.record_migration(str(tmp_path / "no-such-dir" / "ram.ws"), ram,
                                       [(0, 1), (0, 7)], 16)
    assert note.startswith("not recorded") and "No such file" in note
    assert workingset.record_migration(str(tmp_path / "ram.ws"), ram, [(0, 1)], 16) \
        == f"1 first touches recorded in {tmp_path / 'ram.ws'}"
    ram.close()
