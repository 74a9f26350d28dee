"""Lazy restore never wedges a process: when pages can no longer come, it says why and
exits within about a second (or, asked to, hands the error to the caller); and no public
method of the fault server can crash the interpreter."""
from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time

import pytest

from qfram import snapshot
from qfram.lab.demo import fill_demo
from qfram.ram import RAMBlock, RAMList


def test_a_snapshot_cut_during_lazy_restore_ends_the_process_with_a_reason(tmp_path):
    block = RAMBlock.anonymous("pc.ram", 512 << 20, huge=False)
    fill_demo(block.region, seed=2)
    path = tmp_path / "snap"
    snapshot.save(RAMList([block]), str(path), layout="mapped")
    block.close()
    proc = subprocess.Popen([sys.executable, "-m", "qfram", "load", str(path), "--lazy",
                             "--touches", "100000000", "--touch-threads", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:             # once the snapshot is mapped, cut it
        with open(f"/proc/{proc.pid}/maps") as maps:
            if str(path) in maps.read():
                break
        time.sleep(0.002)
    os.truncate(path, 1 << 20)
    cut = time.time()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process hung after its snapshot was cut")
    waited = time.time() - cut
    err = proc.stderr.read()
    assert proc.returncode == 1, err
    assert "lazy restore failed" in err and "cut or replaced" in err, err
    assert waited < 2.0


def wait_mapped(proc: subprocess.Popen, path, timeout: float = 60) -> None:
    """Until ``proc`` has ``path`` mapped."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(f"/proc/{proc.pid}/maps") as maps:
            if str(path) in maps.read():
                return
        time.sleep(0.002)
    raise TimeoutError(f"{path} never mapped")


def ended_with_a_reason(proc: subprocess.Popen, since: float) -> str:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process hung after its snapshot was cut")
    err = proc.stderr.read()
    assert proc.returncode == 1, (proc.returncode, err)       # was -7 (SIGBUS), 135
    assert "is no longer in the snapshot file" in err and "cut or replaced" in err, err
    assert "Traceback" not in err
    assert time.time() - since < 3
    return err


def test_a_snapshot_cut_during_the_reset_loop_ends_it_with_a_reason(tmp_path):
    path = tmp_path / "snap"
    subprocess.run([sys.executable, "-m", "qfram", "save", "--demo", "64M", str(path),
                    "--layout", "mapped"], check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "qfram", "load", str(path),
                             "--reset-loop", "100000000", "--dirty-pages", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_mapped(proc, path)
    time.sleep(0.2)                           # resets going on
    os.truncate(path, 1 << 20)
    err = ended_with_a_reason(proc, time.time())
    assert f"of block pc.ram of {path}" in err


def test_a_snapshot_cut_before_a_resettable_is_touched_ends_with_a_reason(tmp_path):
    path = tmp_path / "snap"
    block = RAMBlock.anonymous("pc.ram", 16 << 20, huge=False)
    fill_demo(block.region, seed=4)
    snapshot.save(RAMList([block]), str(path), layout="mapped")
    block.close()
    code = ("import os, sys; from qfram.lazy import Resettable\n"
            "box = Resettable(sys.argv[1])\n"
            "os.truncate(sys.argv[1], 1 << 20)\n"
            "box.ram['pc.ram'].region[12 << 20]\n"
            "print('read past the end')\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err = ended_with_a_reason(proc, time.time())
    assert "page 3072 of block pc.ram" in err and proc.stdout.read() == ""


def test_a_snapshot_cut_before_the_reset_loop_is_refused(tmp_path):
    path = tmp_path / "snap"
    subprocess.run([sys.executable, "-m", "qfram", "save", "--demo", "16M", str(path),
                    "--layout", "mapped"], check=True, capture_output=True)
    os.truncate(path, 1 << 20)
    done = subprocess.run([sys.executable, "-m", "qfram", "load", str(path),
                           "--reset-loop", "10"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.startswith("qfram load: "), done.stderr
    assert "Traceback" not in done.stderr


def test_fault_server_methods_refuse_areas_of_the_other_kind():
    from qfram._uffd import FaultServer
    remote = FaultServer()
    region = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    remote.add_area(region, name="pc.ram")
    with pytest.raises(ValueError, match="local source"):
        remote.fill_background()            # it used to segfault
    remote.close()
    local = FaultServer()
    other = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    source = bytes(1 << 20)
    local.add_area(other, source, bytes(32))
    from qfram.io import channel
    r, w = os.pipe()
    with pytest.raises(ValueError, match="remote source"):
        local.receive(channel.fdopen(r, "rb"))
    os.close(w)
    local.close()


def test_with_on_failure_raise_the_error_reaches_the_caller(tmp_path):
    from qfram.lazy import LazyRestore
    block = RAMBlock.anonymous("pc.ram", 16 << 20, huge=False)
    fill_demo(block.region, seed=3)
    path = tmp_path / "snap"
    snapshot.save(RAMList([block]), str(path), layout="mapped")
    lazy = LazyRestore(str(path), background=False, on_failure="raise")
    os.truncate(path, 1 << 20)
    with pytest.raises(OSError, match="placing page .* of block pc.ram from the snapshot"):
        lazy.wait()
    lazy.close()
