"""Outputs appear whole or not at all: a failed load or extract leaves the old target as
it was and nothing half-written; a killed save leaves no temporary behind; a killed
incremental save leaves the old snapshot or the new one, never neither."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from qfram import snapshot
from qfram.io import outputs
from qfram.ram import RAMBlock, RAMList

PAGE = 4096


def qfram(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "qfram", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout)


def good_and_bad_snapshots(tmp_path, names=("pc.ram",)):
    """A good snapshot and one whose pages are all there but whose checksum lies, so a
    load fails only at the very end, after every byte was written."""
    ram = RAMList([RAMBlock.from_buffer(n, bytearray(os.urandom(8 * PAGE))) for n in names])
    good = tmp_path / "good"
    snapshot.save(ram, str(good))
    info = snapshot.inspect(str(good))
    data = good.read_bytes()
    digest = info.blocks[0].xxh3_64
    bad = tmp_path / "bad"
    bad.write_bytes(data.replace(digest.encode(), b"0" * len(digest)))
    return good, bad, ram


def listing(path):
    return sorted(os.listdir(path))


def test_a_failed_load_leaves_the_old_target_file_untouched(tmp_path):
    good, bad, _ = good_and_bad_snapshots(tmp_path)
    target = tmp_path / "out" / "ram"
    target.parent.mkdir()
    target.write_bytes(b"the previous contents")
    out = qfram("load", bad, target)
    assert out.returncode == 1 and "hash" in out.stderr, out.stderr
    assert target.read_bytes() == b"the previous contents"
    assert listing(target.parent) == ["ram"]
    assert qfram("load", good, target).returncode == 0
    assert os.path.getsize(target) == 8 * PAGE


@pytest.mark.parametrize("cmd", ["load", "extract"])
def test_a_failed_restore_into_a_directory_keeps_the_earlier_output(tmp_path, cmd):
    good, bad, ram = good_and_bad_snapshots(tmp_path, ("pc.ram", "dev/vga.ram"))
    out_dir = tmp_path / "out"
    assert qfram(cmd, good, out_dir).returncode == 0
    before = {p: (out_dir / p).read_bytes() for p in ("pc.ram", "dev/vga.ram")}
    # a stream cut in its second block: the first was already written when it fails
    cut = tmp_path / "cut"
    data = good.read_bytes()
    cut.write_bytes(data[:data.index(b"dev/vga.ram", 200) + 2 * PAGE])
    for broken in (cut, bad) if cmd == "load" else (cut,):
        out = qfram(cmd, broken, out_dir)
        assert out.returncode == 1, out.stdout
        assert "Traceback" not in out.stderr
        for p, content in before.items():
            assert (out_dir / p).read_bytes() == content
        assert listing(out_dir) == ["dev", "pc.ram"] and listing(out_dir / "dev") == ["vga.ram"]


def test_a_failed_extract_into_a_new_directory_leaves_nothing(tmp_path):
    good, _, _ = good_and_bad_snapshots(tmp_path, ("pc.ram", "a/b/vga.ram"))
    cut = tmp_path / "cut"
    data = good.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    out = qfram("extract", cut, tmp_path / "out")
    assert out.returncode == 1
    assert not (tmp_path / "out").exists() or listing(tmp_path / "out") == []


def test_a_temporary_left_by_a_crash_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "snap"
    ram = RAMList([RAMBlock.from_buffer("pc.ram", bytearray(os.urandom(4 * PAGE)))])
    # what an older crash may have left under a temporary name, unlocked
    stale = tmp_path / f".snap{outputs.TEMP_MARK}deadbeef0000"
    stale.write_bytes(b"left by a crash")
    snapshot.save(ram, str(path))
    assert listing(tmp_path) == ["snap"]


def test_a_locked_temporary_is_left_to_its_writer(tmp_path):
    directory = outputs.Directory(str(tmp_path))
    first = outputs.NewFile(directory, "snap", named=True)
    second = outputs.NewFile(directory, "snap", named=True)    # must not remove `first`
    os.write(first.fd, b"one")
    first.commit()
    second.abort()
    assert (tmp_path / "snap").read_bytes() == b"one" and listing(tmp_path) == ["snap"]
    directory.close()


# -- incremental saves: old or new, whatever the moment of death ---------------------------

INCREMENTAL_SCRIPT = r"""
import os, sys
from qfram import snapshot
from qfram.ram import RAMBlock, RAMList
path, seed = sys.argv[1], int(sys.argv[2])
region = bytearray(open(sys.argv[3], "rb").read())
rng = __import__("random").Random(seed)
for _ in range(3000):                       # change pages all over the block
    i = rng.randrange(len(region) // 4096)
    region[i * 4096:(i + 1) * 4096] = rng.randbytes(4096) if rng.random() < 0.8 else bytes(4096)
open(sys.argv[4], "wb").write(region)
print("ready", flush=True)
snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", region)]), path, layout="mapped",
              incremental=True)
print("done", flush=True)
"""


def test_a_killed_incremental_save_leaves_the_old_or_the_new_snapshot(tmp_path):
    size = 32 << 20
    base = bytearray(os.urandom(size))
    base[: size // 4] = bytes(size // 4)
    (tmp_path / "base.ram").write_bytes(base)
    path = tmp_path / "snap"
    snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", base)]), str(path), layout="mapped")
    rng = random.Random(7)
    outcomes = {"old": 0, "new": 0}
    for attempt in range(20):
        base_file = tmp_path / ("base.ram" if attempt == 0 else "current.ram")
        proc = subprocess.Popen([sys.executable, "-c", INCREMENTAL_SCRIPT, str(path),
                                 str(attempt), str(base_file), str(tmp_path / "next.ram")],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 0.25))
        proc.kill()
        proc.wait()
        restored, result = snapshot.load(str(path))          # recovers, then loads
        assert result.verified
        got = bytes(restored["pc.ram"].region)
        restored.close()
        new = (tmp_path / "next.ram").read_bytes()
        current = base_file.read_bytes()
        assert got in (current, new), attempt
        outcomes["new" if got == new and got != current else "old"] += 1
        (tmp_path / "current.ram").write_bytes(got)
    final = tmp_path / "current.ram"
    region = bytearray(final.read_bytes())
    region[:PAGE] = b"z" * PAGE
    snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", region)]), str(path),
                  layout="mapped", incremental=True)
    restored, result = snapshot.load(str(path))
    assert result.verified and bytes(restored["pc.ram"].region) == region
    assert listing(tmp_path) == sorted(["snap", "base.ram", "current.ram", "next.ram"])
    print(outcomes)


def incremental_pair(tmp_path):
    """A mapped snapshot of `old`, and `new` differing in some pages (some now zero)."""
    old = bytearray(os.urandom(64 * PAGE))
    new = bytearray(old)
    new[3 * PAGE:5 * PAGE] = os.urandom(2 * PAGE)
    new[10 * PAGE:11 * PAGE] = bytes(PAGE)
    new[20 * PAGE:21 * PAGE] = os.urandom(PAGE)
    path = tmp_path / "snap"
    snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", old)]), str(path), layout="mapped")
    return path, old, new


def loaded(path):
    ram, result = snapshot.load(str(path))
    assert result.verified
    data = bytes(ram["pc.ram"].region)
    ram.close()
    return data


def test_an_incremental_save_that_dies_while_applying_is_finished_by_the_next_open(
        tmp_path, monkeypatch):
    from qfram.snapshot import journal
    path, old, new = incremental_pair(tmp_path)
    real = journal._copy_range
    calls = []

    def dies_after_one_copy(*args):
        if calls:
            raise OSError(5, "the disk went away")
        calls.append(args)
        real(*args)

    monkeypatch.setattr(journal, "_copy_range", dies_after_one_copy)
    with pytest.raises(OSError, match="went away"):
        snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", new)]), str(path),
                      layout="mapped", incremental=True)
    monkeypatch.setattr(journal, "_copy_range", real)
    assert os.path.exists(journal.journal_path(str(path)))     # committed, half applied
    assert loaded(path) == bytes(new)
    assert not os.path.exists(journal.journal_path(str(path)))


def journal_left_by_a_crash(tmp_path, monkeypatch):
    """An incremental save killed after its journal was written, before it was applied:
    the snapshot (old), the bytes of its journal, and the RAM it was saving (new)."""
    from qfram.snapshot import journal
    path, old, new = incremental_pair(tmp_path)
    monkeypatch.setattr(journal, "_replay", lambda *a: (_ for _ in ()).throw(
        OSError(5, "killed before applying")))
    with pytest.raises(OSError):
        snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", new)]), str(path),
                      layout="mapped", incremental=True)
    monkeypatch.undo()
    jpath = journal.journal_path(str(path))
    return path, old, jpath, open(jpath, "rb").read()


def test_an_uncommitted_journal_is_dropped_and_the_old_snapshot_stands(tmp_path,
                                                                       monkeypatch):
    path, old, jpath, data = journal_left_by_a_crash(tmp_path, monkeypatch)
    open(jpath, "wb").write(data[:-12])                 # its commit record never made it
    assert loaded(path) == bytes(old)
    assert not os.path.exists(jpath)


def test_a_journal_left_beside_a_replaced_snapshot_is_never_applied(tmp_path, monkeypatch):
    path, _, jpath, kept = journal_left_by_a_crash(tmp_path, monkeypatch)
    other = bytearray(os.urandom(64 * PAGE))
    snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", other)]), str(path), layout="mapped")
    open(jpath, "wb").write(kept)                        # as a crash would have left it
    assert loaded(path) == bytes(other)
