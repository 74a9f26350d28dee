"""A block name is data, never a path: whatever names a snapshot carries, load and extract
write only inside the directory they were given, and refuse what they cannot place."""
from __future__ import annotations

import os
import subprocess
import sys

from qfram import snapshot
from qfram.ram import RAMBlock, RAMList

PAGE = 4096


def snap_with_blocks(path, names, fill=b"Q"):
    ram = RAMList([RAMBlock.from_buffer(n, bytearray(fill * (2 * PAGE))) for n in names])
    snapshot.save(ram, str(path))
    return path


def qfram(*argv):
    return subprocess.run([sys.executable, "-m", "qfram", *map(str, argv)],
                          capture_output=True, text=True, timeout=120)


def everything_under(root):
    found = set()
    for base, dirs, files in os.walk(root):
        for n in dirs + files:
            found.add(os.path.relpath(os.path.join(base, n), root))
    return found


def test_a_name_with_dotdot_writes_nothing_outside_the_directory(tmp_path):
    snap = snap_with_blocks(tmp_path / "snap", ["pc.ram", "../escaped"])
    (tmp_path / "out").mkdir()
    for cmd in ("load", "extract"):
        out = qfram(cmd, snap, tmp_path / "out")
        assert out.returncode == 1, (cmd, out.stderr)
        assert "climbs out" in out.stderr and "Traceback" not in out.stderr
        assert not (tmp_path / "escaped").exists()
        assert everything_under(tmp_path / "out") == set()       # nothing half-written


def test_an_absolute_name_stays_inside(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    snap = snap_with_blocks(tmp_path / "snap", ["pc.ram", str(victim)])
    for cmd in ("load", "extract"):
        out_dir = tmp_path / f"out-{cmd}"
        out = qfram(cmd, snap, out_dir)
        assert out.returncode == 0, out.stderr
        assert victim.read_bytes() == b"precious"
        inside = out_dir / str(victim).lstrip("/")
        assert inside.read_bytes() == b"Q" * (2 * PAGE)


def test_names_that_land_on_one_file_are_refused(tmp_path):
    for names in (["a/b", "a//b"], ["a/b", "./a/b"], ["a", "a/b"], ["a/b", "a"]):
        snap = snap_with_blocks(tmp_path / "snap", names)
        out_dir = tmp_path / "out"
        for cmd in ("load", "extract"):
            out = qfram(cmd, snap, out_dir)
            assert out.returncode == 1, (names, cmd, out.stdout)
            assert "Traceback" not in out.stderr
            assert not out_dir.exists() or everything_under(out_dir) == set(), names


def test_a_planted_symlink_to_a_folder_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    os.symlink(victim, out_dir / "sub")
    snap = snap_with_blocks(tmp_path / "snap", ["pc.ram", "sub/file"])
    for cmd in ("load", "extract"):
        out = qfram(cmd, snap, out_dir)
        assert out.returncode == 1, out.stdout
        assert "symlink" in out.stderr and "Traceback" not in out.stderr
        assert list(victim.iterdir()) == []


def test_a_dangling_symlink_in_place_of_a_file_is_replaced_not_followed(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = tmp_path / "would-be-created"
    os.symlink(target, out_dir / "pc.ram")
    snap = snap_with_blocks(tmp_path / "snap", ["pc.ram", "vga.ram"])
    out = qfram("load", snap, out_dir)
    assert out.returncode == 0, out.stderr
    assert not target.exists()
    assert not os.path.islink(out_dir / "pc.ram")
    assert (out_dir / "pc.ram").read_bytes() == b"Q" * (2 * PAGE)


def test_control_characters_are_refused_as_paths_and_escaped_when_shown(tmp_path):
    evil = "ram\x1b]0;owned\x07\x1b[2J"
    snap = snap_with_blocks(tmp_path / "snap", ["pc.ram", evil])
    out = qfram("load", snap, tmp_path / "out")
    assert out.returncode == 1 and "control characters" in out.stderr
    assert "\x1b" not in out.stderr
    info = qfram("info", snap)
    assert info.returncode == 0, info.stderr
    assert "\x1b" not in info.stdout and "\\x1b" in info.stdout


def test_a_block_name_of_255_bytes_is_extracted_and_loaded(tmp_path):
    """A name as long as QEMU allows is a file name as long as Linux allows: the
    temporaries it is written under must fit too (was: ENAMETOOLONG)."""
    names = ["x" * 255, "é" * 127, "pc.ram"]
    snap = snap_with_blocks(tmp_path / "snap", names, fill=b"L")
    for cmd in ("extract", "load"):
        out = qfram(cmd, snap, tmp_path / cmd)
        assert out.returncode == 0, (cmd, out.stderr)
        assert everything_under(tmp_path / cmd) == set(names)
        for name in names:
            assert (tmp_path / cmd / name).read_bytes() == b"L" * (2 * PAGE)


def test_named_temporaries_of_a_long_name_fit_and_are_cleaned_up(tmp_path):
    from qfram.io import outputs
    name = "y" * 255
    stale = tmp_path / (outputs.hidden_name(name, outputs.TEMP_MARK) + "deadbeef0000")
    stale.write_bytes(b"left by a crash")                  # unlocked: removed
    with outputs.new_file(str(tmp_path / name), named=True) as out:
        os.write(out.fd, b"whole")
        assert len(os.path.basename(out.where).encode()) <= 255
    assert everything_under(tmp_path) == {name}
    assert (tmp_path / name).read_bytes() == b"whole"
