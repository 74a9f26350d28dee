"""A lazy restore's pages from a host page server (qfram.server): the handshake, and
the RAM it gives — copy-on-write mappings of the server's cache, so that every page no
clone writes is one page of memory however many clones there are.

The server is a peer like any other: its WELCOME is parsed by qfram.format.pageserver
against the memfd it really handed over, every wait has a per-read timeout and an
overall deadline, and a server that lies about a chunk is caught by the fault thread
(qfram/_shared.pxi).
"""
from __future__ import annotations

import array
import ctypes
import mmap
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional

from qfram.errors import FormatError, QFramError
from qfram.format import pageserver as proto
from qfram.format import savevm
from qfram.format.vmdesc import parse as parse_description
from qfram.ram import RAMBlock, RAMList
from qfram.snapshot.common import SnapshotInfo


def snapshot_name(path: str) -> str:
    """How a client names the snapshot it expects: a URL as it is, a file resolved."""
    return path if "://" in path else os.path.realpath(path)


@dataclass
class Served:
    """A connected client: the socket (its frames are the fault thread's from now on),
    the cache memfd (read-only), what the server said, and the snapshot as ``inspect``
    would show it."""

    sock: socket.socket
    cache_fd: int
    welcome: proto.Welcome
    info: SnapshotInfo

    def map_blocks(self) -> RAMList:
        """Each block, a copy-on-write mapping of the cache at its offset."""
        ram = RAMList()
        try:
            for b in self.welcome.blocks:
                region = mmap.mmap(self.cache_fd, b.used_length, flags=mmap.MAP_PRIVATE,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=b.offset)
                ram.add(RAMBlock(b.name, region, kind="served"))
        except BaseException:
            ram.close()
            raise
        return ram

    def close(self) -> None:
        self.sock.close()
        if self.cache_fd >= 0:
            os.close(self.cache_fd)
            self.cache_fd = -1


def connect(server: str, snapshot: str, timeout: float = 30.0,
            deadline: Optional[float] = None) -> Served:
    """Connect to the page server listening on ``server``, name ``snapshot``, and take
    its WELCOME and cache.  ``timeout`` bounds each read, ``deadline`` (default: the
    timeout) the whole handshake."""
    name = snapshot_name(snapshot)
    end = time.monotonic() + (deadline if deadline is not None else timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    fds: List[int] = []
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(server)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot reach the page server at {server}: "
                                     f"{exc.strerror}") from None
        try:
            sock.sendall(proto.hello(name))
        except (BrokenPipeError, ConnectionResetError):
            pass                # refused before it read a byte: its reason waits below
        try:
            head = _read(sock, 4, end, timeout, fds, "the WELCOME's length")
            n = struct.unpack(">I", head)[0]
            if n > proto.MAX_WELCOME:
                raise FormatError(f"the page server announces a WELCOME of {n} bytes")
            raw = _read(sock, n, end, timeout, fds, "its WELCOME")
        except OSError as exc:
            if isinstance(exc, QFramError):
                raise
            raise OSError(exc.errno, f"the page server at {server} broke off the "
                                     f"handshake: {exc.strerror}") from None
        if b'"refused"' in raw[:200] or not fds:
            proto.parse_welcome(raw, -1)           # raises the server's reason
            raise FormatError("the page server sent no cache with its WELCOME")
        cache_fd = fds.pop(0)
        st = os.fstat(cache_fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(cache_fd)
            raise FormatError("the page server's cache is not a memory file")
        try:
            welcome = proto.parse_welcome(raw, st.st_size)
            if welcome.snapshot != name:
                raise FormatError(f"the page server serves {welcome.snapshot}, not {name}")
            info = _info(snapshot, welcome)
        except BaseException:
            os.close(cache_fd)
            raise
        return Served(sock, cache_fd, welcome, info)
    except BaseException:
        sock.close()
        raise
    finally:
        for fd in fds:                      # more than the one asked for: not kept
            os.close(fd)


def _read(sock: socket.socket, n: int, end: float, timeout: float, fds: List[int],
          what: str) -> bytes:
    """n bytes (and any fds that come with them), each read bounded by ``timeout``, all
    of them by ``end``."""
    out = bytearray()
    while len(out) < n:
        left = end - time.monotonic()
        if left <= 0:
            raise QFramError(f"the page server did not send {what} in time")
        sock.settimeout(min(timeout, left))
        try:
            data, anc, _, _ = sock.recvmsg(min(n - len(out), 1 << 20),
                                           socket.CMSG_SPACE(4 * 4))
        except socket.timeout:
            raise QFramError(f"the page server was silent for {min(timeout, left):g} s "
                             f"before {what}") from None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % 4])
                fds.extend(got)
        if not data:
            raise QFramError(f"the page server closed the connection before {what}")
        out += data
    return bytes(out)


def _info(path: str, welcome: proto.Welcome) -> SnapshotInfo:
    """The served snapshot as ``qfram info`` shows one: blocks, checksums, devices."""
    description = parse_description(welcome.description.encode(), 0)
    facts = description.blocks
    blocks = []
    for b in welcome.blocks:
        f = facts.get(b.name)
        blocks.append(savevm.BlockInfo(b.name, b.used_length,
                                       f.pages if f else 0, f.zero_pages if f else 0,
                                       xxh3_64=f.xxh3_64 if f else None))
    q = description.qfram
    return SnapshotInfo(path, 0, "served", welcome.machine, [], blocks, [], [], [], -1, -1,
                        bool(q), q.get("compression"), q.get("created"), False, description)


def device_state(welcome: proto.Welcome) -> savevm.DeviceState:
    """What QEMU needs besides RAM, as the server sent it."""
    description = parse_description(welcome.description.encode(), 0)
    return savevm.DeviceState(welcome.machine, welcome.ram_section_id, welcome.devices,
                              description.devices)


class PrivateServer:
    """A page server of one's own, for a snapshot in a store: ``qfram serve --private``
    in a process of its own, on a socket in a private directory; it stops when its one
    client leaves, when this process dies, or when no client came within the timeout."""

    def __init__(self, url: str, timeout: float = 30.0, *, endpoint=None,
                 cache: Optional[str] = None, cache_limit: Optional[int] = None) -> None:
        self.directory = tempfile.mkdtemp(prefix="qfram-pages-")
        self.socket = os.path.join(self.directory, "pages.sock")
        cmd = [sys.executable, "-m", "qfram", "serve", url, "--socket", self.socket,
               "--private", "--idle-exit", f"{timeout:g}"]
        env = dict(os.environ)
        if endpoint is not None:
            resolved = endpoint.resolved()
            if resolved.url:
                cmd += ["--endpoint", resolved.url]
            cmd += ["--store-timeout", f"{resolved.timeout:g}", "--store-deadline",
                    f"{resolved.deadline:g}"]
            # keys go by the environment, as every S3 tool takes them (never in argv,
            # which anyone on the host can read)
            for name, value in (("AWS_ACCESS_KEY_ID", resolved.access_key),
                                ("AWS_SECRET_ACCESS_KEY", resolved.secret_key),
                                ("AWS_REGION", resolved.region)):
                if value:
                    env[name] = value
        if cache:
            cmd += ["--cache", cache]
        if cache_limit:
            cmd += ["--cache-limit", str(cache_limit)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, preexec_fn=_die_with_parent,
                                     env=env)
        end = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                why = self.proc.stderr.read().decode(errors="replace").strip()
                self.close()
                raise QFramError(why.splitlines()[-1] if why else
                                 f"the page server for {url} ended at once")
            if time.monotonic() > end:
                self.close()
                raise QFramError(f"the page server for {url} did not start within "
                                 f"{timeout:g} s")
            time.sleep(0.005)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(5)             # it stops when its client has left
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the parent goes (prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)
