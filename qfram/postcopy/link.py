"""The connections of a postcopy migration: addresses, listening, TLS, and telling a real
source's channels from strays.

A destination listens once and may accept many connections: the source's main channel
(it opens with QEMU's ``QEVM`` header), its preempt channel (``QFRAMPRE``), and after a
dropped link a resumed main channel (a QFRAM_RESUME command).  Anything else — a port
scan, a silent squatter, a peer that fails the TLS handshake or the ``--tls-authz``
list — is dropped, and the destination keeps listening.  Each new connection is
classified on a thread of its own with a deadline for its handshake and first bytes,
so a squatter delays nobody.  At most ``MAX_PENDING`` wait to be identified at once, at
most ``MAX_PENDING_PER_PEER`` from one address (one process, on a unix socket): a
newcomer beyond either bound is not refused, the oldest idle connection (of that peer,
or of all) is dropped in its place — so unidentified connections, however many, never
keep an identified one out.
"""
from __future__ import annotations

import fcntl
import os
import select
import socket
import stat
import struct
import sys
import termios
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

from qfram import wire
from qfram.io import channel
from qfram import backend
from qfram.errors import LinkError

HELLO_BYTES = 8                # what tells the channels apart
HELLO_TIMEOUT = 10.0           # seconds a new connection has for its handshake + hello
MAX_PENDING = 16               # connections being classified at once (more: the oldest
MAX_PENDING_PER_PEER = 4       # idle one goes), and of them from one address or process
LISTEN_BACKLOG = 128           # connections the kernel holds until accepted
STALE_PROBES = 5               # refusals, 50 ms apart, that make a unix socket stale

MAIN, PREEMPT, RESUME = "main", "preempt", "resume"
_RESUME_HELLO = bytes([wire.SECTION_COMMAND]) + wire.CMD_QFRAM_RESUME.to_bytes(2, "big")



def parse_address(text: str) -> Tuple[int, object]:
    """'host:port' or '[v6]:port' -> (AF_INET/AF_INET6, (host, port)); anything with a
    '/' or without a ':' is a unix socket path."""
    if "/" in text or ":" not in text:
        if not text:
            raise LinkError("an empty address")
        return socket.AF_UNIX, text
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise LinkError(f"{text!r}: the port must be a number from 1 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), int(port))


def is_local(address: str) -> bool:
    """A unix socket, or a TCP address that only this machine can reach (loopback)."""
    import ipaddress
    family, addr = parse_address(address)
    if family == socket.AF_UNIX:
        return True
    host = addr[0]                                  # type: ignore[index]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(address: str) -> socket.socket:
    """A listening socket.  A unix path is replaced only when it is a stale socket:
    a regular file (or anything else) there is an error, and so is a live socket."""
    family, addr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            _clear_stale_socket(addr)               # type: ignore[arg-type]
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise LinkError(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}") \
            from None
    return sock


def _clear_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise LinkError(f"{path} exists and is not a socket: not replacing it")
    # A socket nobody listens on refuses; one just bound (not listening yet) does too
    # for an instant: only a refusal that lasts makes it stale.
    for attempt in range(STALE_PROBES):
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except FileNotFoundError:
            return
        except ConnectionRefusedError:
            time.sleep(0.05)
            continue
        except OSError:
            pass
        finally:
            probe.close()
        raise LinkError(f"{path}: another process listens there")
    os.unlink(path)                                 # left by a dead run


class Security:
    """TLS for every channel of a migration, from a QEMU tls-creds-x509 directory:
    mutual certificate verification against its CA; ``authz``: the peer subjects
    (RFC 2253, e.g. ``CN=qfram client of host,O=qfram``) allowed (empty: any the CA
    signed); ``hostname``: the name the server's certificate must carry (QEMU's
    tls-hostname; by default the host connected to)."""

    def __init__(self, creds: str, authz: Sequence[str] = (),
                 hostname: Optional[str] = None) -> None:
        from qfram import _tls
        self.creds = creds
        self.authz = list(authz)
        self.hostname = hostname
        self._contexts = {side: _tls.TLSContext(creds, side) for side in (True, False)}

    def wrap(self, sock: socket.socket, server: bool, host: Optional[str],
             timeout: float) -> "Link":
        """Run the handshake on ``sock``; the peer must pass, or LinkError says why."""
        from qfram import _tls
        conn = _tls.TLSConnection(self._contexts[server], sock,
                                  hostname=None if server else (self.hostname or host))
        try:
            conn.handshake(timeout)
        except OSError as exc:
            conn.close()
            raise LinkError(f"{exc.strerror or exc}") from None
        if self.authz and conn.peer_subject not in self.authz:
            subject = conn.peer_subject
            conn.close()
            raise LinkError(f"the peer {subject!r} is not in --tls-authz")
        return Link(sock, conn)


class TLSChannel:
    """A QEMUFile channel over a TLS connection: the core reads and writes it through
    ``c_transport`` (GIL released); the pure twin through readinto/writev."""

    fd = -1

    def __init__(self, conn, owned: bool = True) -> None:
        self.conn = conn
        self.owned = owned
        channel.grow_socket_buffers(conn.fileno(), channel.DEFAULT_SOCKET_BUFFER)

    @property
    def c_transport(self):
        return self.conn.c_transport

    def readinto(self, view) -> int:
        return self.conn.readinto(view)

    def writev(self, views) -> int:
        total = 0
        for view in views:
            done = 0
            while done < len(view):
                done += self.conn.write(view[done:])
            total += done
        return total

    def set_blocking(self, block: bool) -> None:
        pass                        # always non-blocking underneath; waits are polls

    def shutdown(self) -> bool:
        self.conn.shutdown()
        return True

    def return_path(self) -> "TLSChannel":
        return TLSChannel(self.conn, owned=False)

    def close(self) -> None:
        if self.owned:
            self.conn.close()

    def __repr__(self) -> str:
        return f"<TLSChannel fd={self.conn.fileno()}>"


class Link:
    """One connected channel of a migration: a socket, with TLS over it (``tls``) when
    the migration is secured.  ``kind``: what its first bytes said (destination)."""

    def __init__(self, sock: socket.socket, tls=None) -> None:
        self.sock = sock
        self.tls = tls
        self.kind: Optional[str] = None
        self.hello = b""
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def security(self) -> Optional[str]:
        """The TLS protocol and cipher, or None for a channel in the clear."""
        return None if self.tls is None else f"{self.tls.version} {self.tls.cipher}"

    def peek(self, n: int, timeout: float) -> bytes:
        """The first ``n`` bytes, left to be read again (fewer: the peer closed);
        TimeoutError when they do not come in time."""
        if self.tls is not None:
            return self.tls.peek(n, timeout)
        deadline = time.monotonic() + timeout
        self.sock.setblocking(False)
        while True:
            try:
                got = self.sock.recv(n, socket.MSG_PEEK)
            except BlockingIOError:
                got = None
            if got is not None and (len(got) >= n or got == b""):
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the peer sent {len(got or b'')} of {n} bytes within "
                                   f"{timeout:g} s")
            select.select([self.sock], [], [], left)
            if got:
                time.sleep(0.001)   # bytes trickle in: readiness stays set, do not spin

    def file(self, mode: str, timeout: Optional[float],
             buf_size: int = wire.DEFAULT_BUF_SIZE):
        """A QEMUFile over this channel (its return path: ``get_return_path()``);
        ``buf_size``: its staging buffer (reading: how much one read may bring)."""
        self.sock.setblocking(False)
        if self.tls is None:
            return channel.socket_file(self.sock, mode, timeout=timeout, buf_size=buf_size)
        return backend.QEMUFile(TLSChannel(self.tls), mode, timeout=timeout,
                                buf_size=buf_size)

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        if self.tls is not None:
            self.tls.close()
        self.sock.close()


def as_link(connection) -> Link:
    """A Link for a connected socket (a Link stays as it is)."""
    return connection if isinstance(connection, Link) else Link(connection)


def connect(address: str, security: Optional[Security] = None,
            timeout: float = 30.0) -> Link:
    """Connect to a destination (and run the TLS handshake when ``security``)."""
    family, addr = parse_address(address)
    try:
        if family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(timeout)
            sock.connect(addr)
        else:
            sock = socket.create_connection(addr, timeout=timeout)  # type: ignore[arg-type]
    except OSError as exc:
        raise LinkError(exc.errno, f"cannot connect to {address}: "
                                   f"{exc.strerror or exc}") from None
    sock.settimeout(None)
    if security is None:
        return Link(sock)
    host = "localhost" if family == socket.AF_UNIX else addr[0]  # type: ignore[index]
    try:
        return security.wrap(sock, False, host, timeout)
    except LinkError as exc:
        sock.close()
        raise LinkError(f"{address}: TLS: {exc}") from None


def kind_of(hello: bytes) -> Optional[str]:
    """Which channel a connection's first bytes open (None: not one of ours)."""
    if hello.startswith(wire.QEVM_MAGIC.to_bytes(4, "big")):
        return MAIN
    if hello == wire.PREEMPT_MAGIC:
        return PREEMPT
    if hello.startswith(_RESUME_HELLO):
        return RESUME
    return None


def _stderr_note(line: str) -> None:
    print(f"qfram: {line}", file=sys.stderr, flush=True)


class Acceptor:
    """Accepts a migration's channels on a listening socket; drops the rest (each drop
    is told to ``note``)."""

    def __init__(self, server: socket.socket, security: Optional[Security] = None,
                 hello_timeout: float = HELLO_TIMEOUT,
                 note: Callable[[str], None] = _stderr_note) -> None:
        self.server = server
        self.security = security
        self.hello_timeout = hello_timeout
        self.note = note
        self._ready: List[Link] = []
        self._pending: List[_Pending] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.dropped = 0
        server.setblocking(False)
        self._unix_path = None                      # removed on close, if still ours
        name = server.getsockname()
        if server.family == socket.AF_UNIX and isinstance(name, str) and name:
            self._unix_path = (name, os.stat(name).st_ino)

    def wait(self, kinds: Sequence[str], deadline: Optional[float],
             what: str = "the source") -> Link:
        """The next channel of one of ``kinds``; LinkError (ETIMEDOUT) at ``deadline``
        (time.monotonic(); None: wait for ever)."""
        while True:
            with self._lock:
                for link in self._ready:
                    if link.kind in kinds:
                        self._ready.remove(link)
                        return link
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                import errno
                raise LinkError(errno.ETIMEDOUT, f"{what} did not connect in time")
            readable, _, _ = select.select([self.server, self._wake_r], [], [], left)
            if self._wake_r in readable:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            if self.server in readable:
                self._accept()

    def _accept(self) -> None:
        """Every connection waiting in the kernel, each classified on a thread."""
        while True:
            try:
                sock, address = self.server.accept()
            except (BlockingIOError, InterruptedError):
                return
            entry = _Pending(sock, *_peer(sock, address))
            with self._lock:
                victim = self._make_room(entry.key)
                self._pending.append(entry)
            if victim is not None:
                victim.evict()
            threading.Thread(target=self._classify, args=(entry,), daemon=True,
                             name="qfram-hello").start()

    def _make_room(self, key: str) -> Optional["_Pending"]:
        """The connection to drop for a newcomer from ``key``, if one must go: the
        oldest idle one of that peer when it has MAX_PENDING_PER_PEER already, else
        of all when MAX_PENDING wait.  (Under the lock.)"""
        same = [p for p in self._pending if p.key == key]
        if len(same) >= MAX_PENDING_PER_PEER:
            victim = _oldest_idle(same)
        elif len(self._pending) >= MAX_PENDING:
            victim = _oldest_idle(self._pending)
        else:
            return None
        self._pending.remove(victim)
        victim.evicted = "peer" if len(same) >= MAX_PENDING_PER_PEER else "all"
        return victim

    def _classify(self, entry: "_Pending") -> None:
        sock, link = entry.sock, None
        try:
            if self.security is not None:
                link = self.security.wrap(sock, True, None, self.hello_timeout)
                entry.spoke = True          # a certificate our CA signed: not idle
            else:
                link = Link(sock)
            hello = link.peek(HELLO_BYTES, self.hello_timeout)
            link.kind = kind_of(hello)
            link.hello = hello
            if link.kind is None:
                raise LinkError("it did not open a migration channel" if hello else
                                "it closed without a word")
        except (OSError, ValueError) as exc:
            self.dropped += 1
            self.note(f"dropped a connection from {entry.name}: {entry.why(exc)}")
            if link is not None:
                link.close()
            else:
                sock.close()
            link = None
        with self._lock:
            if entry in self._pending:
                self._pending.remove(entry)
            if link is not None and entry.evicted:
                link.close()                # identified too late: it was given up on
                link = None
            if link is not None:
                self._ready.append(link)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        """Stop listening; channels accepted but not taken are closed."""
        self.server.close()
        if self._unix_path is not None:
            path, inode = self._unix_path
            try:
                if os.lstat(path).st_ino == inode:
                    os.unlink(path)
            except OSError:
                pass
        with self._lock:
            for link in self._ready:
                link.close()
            self._ready.clear()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


class _Pending:
    """A connection being identified: its socket, who it is from (``key``: an address,
    or a process on a unix socket; ``name``: as a note shows it) and since when."""

    def __init__(self, sock: socket.socket, key: str, name: str) -> None:
        self.sock, self.key, self.name = sock, key, name
        self.since = time.monotonic()
        self.evicted: Optional[str] = None
        self.spoke = False              # passed the TLS handshake

    def idle(self) -> bool:
        """It has not passed a TLS handshake, and nothing it sent waits to be read."""
        if self.spoke:
            return False
        try:
            raw = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0" * 4)
        except OSError:
            return True
        return struct.unpack("i", raw)[0] == 0

    def evict(self) -> None:
        """Drop it for a newcomer: its thread wakes, and notes why."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def why(self, exc: BaseException) -> str:
        if self.evicted == "peer":
            return (f"it was the oldest idle of {MAX_PENDING_PER_PEER} connections from "
                    f"one peer still unidentified, and another came")
        if self.evicted == "all":
            return (f"it was the oldest idle of {MAX_PENDING} connections still "
                    f"unidentified, and another came")
        return str(exc)


def _oldest_idle(candidates: List[_Pending]) -> _Pending:
    """The oldest that has said nothing yet to be read (else the oldest)."""
    idle = [p for p in candidates if p.idle()]
    return min(idle or candidates, key=lambda p: p.since)


def _peer(sock: socket.socket, address) -> Tuple[str, str]:
    """Who a connection is from: the key its bound counts under (the address; on a unix
    socket, the process) and its name in notes."""
    if isinstance(address, tuple) and address:
        return str(address[0]), f"{address[0]}:{address[1]}"
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
    except OSError:
        return "unix", "a unix socket peer"
    return f"pid {pid}", f"a unix socket peer (process {pid})"
