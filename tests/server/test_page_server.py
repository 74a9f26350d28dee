"""One snapshot, many restores: `qfram serve` keeps one verified copy, clones restore
from it — each verified, unwritten pages shared — and every bad client or bad end
finishes with a reason, never a hang."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from qfram import snapshot
from qfram.format import pageserver as proto
from qfram.lab.demo import fill_demo
from qfram.ram import RAMBlock, RAMList

PY = sys.executable
MiB = 1 << 20


def qfram(*args) -> list:
    return [PY, "-m", "qfram", *args]


@pytest.fixture(scope="module")
def chunked_snapshot(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("served") / "snap.chk")
    ram = RAMList([RAMBlock.anonymous("pc.ram", 48 * MiB, huge=False),
                   RAMBlock.anonymous("vga.vram", 4 * MiB, huge=False)])
    fill_demo(ram["pc.ram"].region, seed=3)
    fill_demo(ram["vga.vram"].region, seed=4)
    snapshot.save(ram, path, layout="chunked", chunk_bytes=64 << 10)
    ram.close()
    return path


class Server:
    """`qfram serve` in a process of its own, listening once this returns."""

    def __init__(self, snap: str, sock: str, *args: str) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(qfram("serve", snap, "--socket", sock, "--json", *args),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        end = time.monotonic() + 30
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"serve did not start: {self.proc.stderr.read()}")
            time.sleep(0.01)

    def stop(self, sig=signal.SIGTERM) -> dict:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


@pytest.fixture
def server(chunked_snapshot, tmp_path):
    servers = []

    def start(*args: str, snap: str = chunked_snapshot) -> Server:
        s = Server(snap, str(tmp_path / f"pages{len(servers)}.sock"), *args)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.kill()


def clone(snap: str, sock: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(qfram("load", snap, "--lazy", "--server", sock, "--json",
                                  "--touches", "300", *args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen, timeout: float = 60) -> tuple:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_clones_restore_from_one_server_each_verified_each_chunk_decoded_once(
        server, chunked_snapshot):
    s = server()
    clones = [clone(chunked_snapshot, s.sock) for _ in range(4)]
    for proc in clones:
        rc, out, err = finished(proc)
        assert rc == 0, err
        assert json.loads(out)["verified"] is True
    stats = s.stop()
    assert stats["clients"] == 4 and stats["failures"] == 0
    # each chunk decoded once, whoever asked first: the rest were hits
    assert stats["chunks_decoded"] == stats["chunks_cached"]
    assert stats["chunks_decoded"] <= (52 * MiB) // (64 << 10)
    assert stats["misses"] == stats["chunks_decoded"]
    assert stats["hits"] + stats["joined"] >= 3 * stats["chunks_decoded"]


SHARING = r"""
import json, sys
from qfram.lazy import LazyRestore
snap, sock = sys.argv[1:3]

def anonymous_kib(region):
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        start = int(line.split("-")[0], 16) if "-" in line.split()[0] else None
        if start == addr:
            for field in lines[i + 1:i + 30]:
                if field.startswith("Anonymous:"):
                    return int(field.split()[1])
    raise SystemExit("mapping not found")

with LazyRestore(snap, server=sock) as lazy:
    stats = lazy.wait()
    region = lazy.ram["pc.ram"].region
    before = anonymous_kib(region)
    for page in range(0, 40 * 4096, 4096):
        region[page] = 0xAB
    after = anonymous_kib(region)
    print(json.dumps({"verified": stats.verified, "before": before, "after": after}))
"""


def test_a_clone_pays_only_for_the_pages_it_writes(server, chunked_snapshot, tmp_path):
    s = server()
    script = tmp_path / "share.py"
    script.write_text(SHARING)
    out = subprocess.run([PY, str(script), chunked_snapshot, s.sock], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["verified"]
    # every page read and checked, none of them this clone's own memory (the zero
    # chunks map the zero page) ...
    assert facts["before"] <= 64
    # ... until it writes: 40 pages, 160 KiB
    assert 150 <= facts["after"] - facts["before"] <= 200


def test_a_client_naming_another_snapshot_is_refused(server, chunked_snapshot, tmp_path):
    s = server()
    other = tmp_path / "other.chk"
    other.write_bytes(b"")
    rc, _, err = finished(clone(str(other), s.sock))
    assert rc == 1
    assert "refused" in err and "serves" in err and "Traceback" not in err


def test_the_socket_admits_only_its_user(chunked_snapshot):
    import tempfile
    where = tempfile.mkdtemp(prefix="qfram-served-")
    os.chmod(where, 0o755)                   # another user can reach the socket file
    s = Server(chunked_snapshot, os.path.join(where, "pages.sock"))
    assert os.stat(s.sock).st_mode & 0o777 == 0o600
    os.chmod(s.sock, 0o666)                  # even then: SO_PEERCRED says who it is
    nobody = 65534
    name = os.path.realpath(chunked_snapshot)
    pid = os.fork()
    if pid == 0:                             # another user's client, in a child
        code = 2
        try:
            os.setgid(nobody)
            os.setuid(nobody)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(10)
            c.connect(s.sock)
            try:
                c.sendall(proto.hello(name))
            except BrokenPipeError:
                pass                         # refused at once: the reason waits to be read
            reply = c.recv(4096)
            code = 0 if b"may not use this page server" in reply else 1
        except BaseException as exc:
            os.write(2, f"the other user's client: {exc!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    try:
        assert os.waitstatus_to_exitcode(status) == 0
        assert s.stop()["refused"] == 1
    finally:
        s.kill()
        shutil.rmtree(where)


def raw_client(sock_path: str, name: str) -> socket.socket:
    """HELLO, and the WELCOME read (its memfd closed): a client that speaks frames."""
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(10)
    c.connect(sock_path)
    c.sendall(proto.hello(name))
    head = c.recv(4, socket.MSG_WAITALL)
    n = struct.unpack(">I", head)[0]
    got, fds, _, _ = socket.recv_fds(c, n, 4, socket.MSG_WAITALL)
    for fd in fds:
        os.close(fd)
    assert b"refused" not in got[:100]
    return c


def test_a_client_that_vanishes_mid_request_harms_nobody(server, chunked_snapshot):
    s = server()
    name = os.path.realpath(chunked_snapshot)
    for _ in range(5):
        c = raw_client(s.sock, name)
        c.sendall(proto.frame(proto.OP_REQ, 0, 0, 64, flags=proto.URGENT))
        c.close()                            # gone before the answer
    rc, out, err = finished(clone(chunked_snapshot, s.sock))
    assert rc == 0 and json.loads(out)["verified"], err
    assert s.proc.poll() is None             # still serving


def test_a_flooding_client_slows_only_itself(server, chunked_snapshot):
    s = server()
    flood = raw_client(s.sock, os.path.realpath(chunked_snapshot))
    frames = b"".join(proto.frame(proto.OP_REQ, 0, c % 768, 1) for c in range(50000))
    flood.setblocking(False)
    try:
        flood.send(frames)                   # as much as the socket takes; never read
    except BlockingIOError:
        pass
    t0 = time.monotonic()
    rc, out, err = finished(clone(chunked_snapshot, s.sock))
    assert rc == 0 and json.loads(out)["verified"], err
    assert time.monotonic() - t0 < 60
    flood.close()


def test_a_malformed_request_ends_that_client_with_a_reason(server, chunked_snapshot):
    s = server()
    c = raw_client(s.sock, os.path.realpath(chunked_snapshot))
    c.sendall(proto.frame(proto.OP_REQ, 9, 0, 1))          # no block 9
    head = c.recv(16, socket.MSG_WAITALL)
    op, _, n, *_ = proto.FRAME.unpack(head)
    assert op == proto.OP_FAIL
    assert b"do not exist" in c.recv(n, socket.MSG_WAITALL)
    assert c.recv(1) == b""
    rc, _, err = finished(clone(chunked_snapshot, s.sock))
    assert rc == 0, err


def test_clones_end_with_a_reason_when_the_server_is_killed(server, chunked_snapshot):
    s = server("--threads", "1")
    clones = [clone(chunked_snapshot, s.sock, "--touches", "20000", "--no-background")
              for _ in range(8)]
    time.sleep(1.0)
    s.proc.kill()
    for proc in clones:
        rc, out, err = finished(proc, timeout=60)        # none hangs
        if rc == 0:
            continue                                      # it was done before the kill
        assert rc == 1
        assert "page server" in err and "Traceback" not in err


def test_clones_are_told_why_the_server_stopped(server, chunked_snapshot):
    s = server("--threads", "1")
    clones = [clone(chunked_snapshot, s.sock, "--touches", "20000", "--no-background")
              for _ in range(3)]
    time.sleep(1.0)
    s.proc.send_signal(signal.SIGTERM)
    for proc in clones:
        rc, _, err = finished(proc, timeout=60)
        assert rc in (0, 1)
        if rc == 1:
            assert "SIGTERM" in err or "page server" in err


def test_a_snapshot_cut_under_the_server_ends_its_clients_with_a_reason(server, tmp_path):
    path = tmp_path / "cut.chk"
    ram = RAMList([RAMBlock.anonymous("pc.ram", 32 * MiB, huge=False)])
    fill_demo(ram["pc.ram"].region, seed=9, zero_percent=0)
    snapshot.save(ram, str(path), layout="chunked")
    ram.close()
    s = server(snap=str(path))
    with open(path, "r+b") as f:
        f.truncate(4096 * 2)                     # the chunks are gone
    rc, _, err = finished(clone(str(path), s.sock))
    assert rc == 1
    assert "cut" in err and "Traceback" not in err
    assert s.proc.poll() is None                 # the server goes on (and says why)


def test_an_evicting_server_serves_more_than_it_holds(server, chunked_snapshot):
    s = server("--memory-limit", "4M")
    rc, out, err = finished(clone(chunked_snapshot, s.sock))
    assert rc == 0 and json.loads(out)["verified"], err
    stats = s.stop()
    assert stats["evictions"] > 0 and stats["cache_bytes"] <= 4 * MiB


def test_sigusr1_reports_the_figures_so_far(server, chunked_snapshot):
    s = server()
    rc, _, err = finished(clone(chunked_snapshot, s.sock))
    assert rc == 0, err
    s.proc.send_signal(signal.SIGUSR1)
    line = s.proc.stdout.readline()
    report = json.loads(line)
    assert report["clients"] == 1 and report["bytes_served"] > 0
    s.stop()


def test_a_mapped_snapshot_is_served_too(server, tmp_path):
    path = tmp_path / "mapped.snap"
    ram = RAMList([RAMBlock.anonymous("pc.ram", 16 * MiB, huge=False)])
    fill_demo(ram["pc.ram"].region, seed=5)
    snapshot.save(ram, str(path), layout="mapped")
    ram.close()
    s = server(snap=str(path))
    rc, out, err = finished(clone(str(path), s.sock))
    assert rc == 0 and json.loads(out)["verified"], err


def test_idle_exit_ends_the_server(chunked_snapshot, tmp_path):
    s = Server(chunked_snapshot, str(tmp_path / "idle.sock"), "--idle-exit", "0.5")
    out, err = s.proc.communicate(timeout=30)
    assert s.proc.returncode == 0, err
    assert not os.path.exists(s.sock)
