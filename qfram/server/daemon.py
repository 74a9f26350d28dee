"""The page server's loop: one thread with a selector over the listening socket, the
clients and a wake-up pipe; the decoding on a pool of worker threads (in C, GIL
released).

A client is checked before it is read at all (SO_PEERCRED: this user, root, or a member
of ``--group``), must say HELLO within ``hello_timeout`` and name the snapshot served, and
is then an identified client: unidentified connections are capped and the oldest is
dropped to make room, so squatters never keep a clone waiting.  Each client has a cap on
the chunks it may have asked for and not been answered: past it the server stops reading
from it (a flooding client slows itself, nobody else).  Every chunk is decoded once, by
whoever asked first; everyone asking meanwhile waits for the same decode (single
flight).  Whatever a client sends that is not a REQ for chunks that exist ends that
client, with a FAIL that says why.
"""
from __future__ import annotations

import errno
import grp
import itertools
import json
import os
import queue
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from typing import Dict, List, Optional, Set, Tuple

from qfram.errors import FormatError, OptionError, QFramError
from qfram.format import pageserver as proto
from qfram.results import ServeStats
from qfram.server.cache import EMPTY, FILLING, READY, Cache
from qfram.server.sources import ChunkSource

MAX_UNIDENTIFIED = 16            # connections that have not said HELLO yet
MAX_OUTSTANDING = 256            # chunks a client may have asked for, not answered
MAX_OUTBOX = 8 << 20             # bytes waiting to go to one client
MAX_REQ_CHUNKS = 4096            # chunks one REQ may name
_CRED = struct.Struct("3i")      # struct ucred: pid, uid, gid


class _Client:
    def __init__(self, sock: socket.socket, peer: Tuple[int, int, int]) -> None:
        self.sock = sock
        self.pid, self.uid, self.gid = peer
        self.accepted = time.monotonic()
        self.identified = False
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.fds: List[int] = []             # to go with the outbox's first byte
        self.outstanding = 0
        self.closing = False

    def name(self) -> str:
        return f"pid {self.pid} (uid {self.uid})"


class PageServer:
    """Serve ``source`` on the unix socket ``path`` until stopped."""

    def __init__(self, source: ChunkSource, path: str, *, memory_limit: int = 0,
                 threads: int = 2, idle_exit: Optional[float] = None,
                 group: Optional[str] = None, hello_timeout: float = 10.0,
                 private: bool = False, log=None) -> None:
        self.source = source
        self.path = path
        self.cache = Cache(source, memory_limit)
        self.idle_exit = idle_exit
        self.private = private          # one client, then stop
        self.hello_timeout = hello_timeout
        self.log = log or (lambda line: print(f"qfram serve: {line}", file=sys.stderr,
                                              flush=True))
        self.gid = None
        if group is not None:
            try:
                self.gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise OptionError(f"no group named {group!r}") from None
        self.stats = ServeStats(snapshot=source.name, socket=path)
        self.welcome = self._welcome()
        # decoding: urgent chunks (a thread waits) before the background's, each chunk
        # decoded by one worker even when it was queued twice (background, then urgent)
        self.work: "queue.PriorityQueue[tuple]" = queue.PriorityQueue()
        self.taken: Set[Tuple[int, int]] = set()
        self.taken_lock = threading.Lock()
        self._order = itertools.count()
        self.workers = [threading.Thread(target=self._worker, daemon=True,
                                         name=f"qfram-decode-{i}")
                        for i in range(max(1, threads))]
        for worker in self.workers:
            worker.start()
        self.queued_low: Set[Tuple[int, int]] = set()
        self.waiters: Dict[Tuple[int, int], List[_Client]] = {}
        self.done: List[Tuple[int, int, Optional[BaseException]]] = []
        self.done_lock = threading.Lock()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel = selectors.DefaultSelector()
        self.clients: Set[_Client] = set()
        self.stop_reason: Optional[str] = None
        self.report_now = False
        self.listener = self._listen()

    def _welcome(self) -> bytes:
        blocks = [proto.CacheBlock(name, length, self.cache.offsets[i], self.cache.zero[i])
                  for i, (name, length) in enumerate(self.source.blocks)]
        return proto.Welcome(self.source.name, self.cache.chunk_bytes, self.cache.size,
                             bool(self.cache.memory_limit), blocks,
                             self.source.description, self.source.machine,
                             self.source.ram_section_id, self.source.devices,
                             self.source.working_set()).encode()

    def _listen(self) -> socket.socket:
        """Bound under a temporary name, listening, then renamed into place: the path
        appears only once a client can connect to it (0600 from the first moment)."""
        if os.path.lexists(self.path) and _stale_socket(self.path):
            os.unlink(self.path)
        temporary = os.path.join(os.path.dirname(os.path.abspath(self.path)),
                                 f".{os.path.basename(self.path)}.{os.getpid()}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(temporary)
            if self.gid is not None:
                os.chown(temporary, -1, self.gid)
                os.chmod(temporary, 0o660)
            sock.listen(128)
            os.rename(temporary, self.path)
        except OSError as exc:
            sock.close()
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise OSError(exc.errno, f"cannot listen on {self.path}: {exc.strerror}") \
                from None
        finally:
            os.umask(old)
        sock.setblocking(False)
        return sock

    # -- the loop ------------------------------------------------------------------------

    def serve(self) -> ServeStats:
        t0 = time.monotonic()
        idle_since = t0
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        old = {sig: signal.signal(sig, self._signal)
               for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        old_wakeup = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        try:
            while self.stop_reason is None:
                events = self.sel.select(timeout=0.5)
                for key, mask in events:
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        _drain(self.wake_r)
                    else:
                        self._io(key.data, mask)
                self._finish_fills()
                if self.report_now:
                    self.report_now = False
                    self._report()
                now = time.monotonic()
                self._expire_hellos(now)
                if self.clients:
                    idle_since = now
                elif self.idle_exit is not None and now - idle_since >= self.idle_exit:
                    self.stop_reason = f"idle for {self.idle_exit:g} s"
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self._shut_down()
        self.stats.seconds = round(time.monotonic() - t0, 3)
        return self._snapshot_stats()

    def _signal(self, signum, frame) -> None:
        if signum == signal.SIGUSR1:
            self.report_now = True
        else:
            self.stop_reason = f"the page server was stopped ({signal.Signals(signum).name})"

    def _report(self) -> None:
        print(json.dumps(self._snapshot_stats().as_dict()), flush=True)

    def _snapshot_stats(self) -> ServeStats:
        self.stats.clients_now = sum(1 for c in self.clients if c.identified)
        self.stats.chunks_cached = sum(st.count(READY) for st in self.cache.state)
        self.stats.cache_bytes = self.cache.resident
        self.stats.chunks_decoded = self.cache.decoded
        self.stats.evictions = self.cache.evicted
        return self.stats

    def _shut_down(self) -> None:
        reason = self.stop_reason or "the page server stopped"
        for client in list(self.clients):
            if client.identified:
                _send_now(client.sock, proto.frame(proto.OP_BYE, text=reason))
            self._drop(client, None)
        for _ in self.workers:
            self.work.put((-1, next(self._order), None, None))
        for worker in self.workers:
            worker.join()
        self.sel.close()
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        self.cache.close()
        self.source.close()

    # -- clients -------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # EMFILE and the like: try again later
                self.log(f"accept: {exc.strerror}")
                return
            sock.setblocking(False)
            peer = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                _CRED.size))
            if not self._admitted(peer):
                self.stats.refused += 1
                _send_now(sock, proto.refusal(f"uid {peer[1]} may not use this page "
                                              f"server"))
                self.log(f"refused pid {peer[0]}: uid {peer[1]}, gid {peer[2]}")
                sock.close()
                continue
            waiting = sorted((c for c in self.clients if not c.identified),
                             key=lambda c: c.accepted)
            if len(waiting) >= MAX_UNIDENTIFIED:     # make room: the oldest goes
                self._drop(waiting[0], "no HELLO in time")
            client = _Client(sock, peer)
            self.clients.add(client)
            self.sel.register(sock, selectors.EVENT_READ, client)

    def _admitted(self, peer: Tuple[int, int, int]) -> bool:
        _, uid, gid = peer
        if uid in (0, os.getuid()):
            return True
        if self.gid is None:
            return False
        if gid == self.gid:
            return True
        try:
            import pwd
            return pwd.getpwuid(uid).pw_name in grp.getgrgid(self.gid).gr_mem
        except KeyError:
            return False

    def _expire_hellos(self, now: float) -> None:
        for client in [c for c in self.clients if not c.identified]:
            if now - client.accepted > self.hello_timeout:
                self._drop(client, f"no HELLO within {self.hello_timeout:g} s")

    def _drop(self, client: _Client, why: Optional[str]) -> None:
        if client not in self.clients:
            return
        self.clients.discard(client)
        if why and client.identified and not self.private:
            self.log(f"client {client.name()} dropped: {why}")
        if self.private and client.identified:
            self.stop_reason = "its one client is done"
        try:
            self.sel.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        for waiting in self.waiters.values():
            while client in waiting:
                waiting.remove(client)

    def _fail(self, client: _Client, why: str) -> None:
        """Tell the client why, then end it."""
        _send_now(client.sock, proto.frame(proto.OP_FAIL, text=why))
        self._drop(client, why)

    def _io(self, client: _Client, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(client)
        if mask & selectors.EVENT_READ and client in self.clients:
            try:
                data = client.sock.recv(64 << 10)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop(client, "it went away" if client.identified else None)
                return
            client.inbox += data
            try:
                self._take(client)
            except FormatError as exc:
                self._fail(client, str(exc))

    def _take(self, client: _Client) -> None:
        if not client.identified:
            if len(client.inbox) < 4:
                return
            n = struct.unpack(">I", client.inbox[:4])[0]
            if n > proto.MAX_HELLO:
                raise FormatError(f"a HELLO of {n} bytes")
            if len(client.inbox) < 4 + n:
                return
            name = proto.parse_hello(bytes(client.inbox[4:4 + n]))
            del client.inbox[:4 + n]
            if name != self.source.name:
                self.stats.refused += 1
                _send_now(client.sock, proto.refusal(
                    f"this server serves {self.source.name}, not {name}"))
                self._drop(client, None)
                return
            client.identified = True
            self.stats.clients += 1
            client.outbox += self.welcome
            client.fds = [self.cache.client_fd]
            self._flush(client)
        while client in self.clients and len(client.inbox) >= proto.FRAME.size:
            if client.outstanding >= MAX_OUTSTANDING:
                self._update_events(client)          # read no more until answered
                return
            _, block, _, first, count, flags = proto.parse_frame(
                bytes(client.inbox[:proto.FRAME.size]), (proto.OP_REQ,))
            del client.inbox[:proto.FRAME.size]
            self._request(client, block, first, count, bool(flags & proto.URGENT))

    def _request(self, client: _Client, block: int, first: int, count: int,
                 urgent: bool) -> None:
        if block >= len(self.source.blocks) or count == 0 or count > MAX_REQ_CHUNKS \
                or first + count > self.cache.nchunks[block]:
            raise FormatError(f"a REQ for chunks {first}+{count} of block {block}, which "
                              f"do not exist")
        self.stats.requests += 1
        ready: List[int] = []
        for chunk in range(first, first + count):
            if self.cache.is_zero(block, chunk):
                ready.append(chunk)                  # nothing to do: it is zero
                continue
            state = self.cache.state[block][chunk]
            if state == READY:
                self.stats.hits += 1
                self.cache.touch(block, chunk)
                ready.append(chunk)
                continue
            client.outstanding += 1
            self.waiters.setdefault((block, chunk), []).append(client)
            if state == EMPTY:
                self.stats.misses += 1
                self.cache.state[block][chunk] = FILLING
                self._queue(block, chunk, urgent)
            else:
                self.stats.joined += 1              # one decode, however many ask
                if urgent and (block, chunk) in self.queued_low:
                    self._queue(block, chunk, True)  # queued behind the background: jump
        self._answer(client, block, ready)

    def _queue(self, block: int, chunk: int, urgent: bool) -> None:
        if urgent:
            self.queued_low.discard((block, chunk))
        else:
            self.queued_low.add((block, chunk))
        self.work.put((0 if urgent else 1, next(self._order), block, chunk))

    def _worker(self) -> None:
        while True:
            _, _, block, chunk = self.work.get()
            if block is None:
                return
            with self.taken_lock:
                if (block, chunk) in self.taken:
                    continue                # queued twice: decoded by the first taker
                self.taken.add((block, chunk))
            self._fill(block, chunk)

    def _fill(self, block: int, chunk: int) -> None:
        error: Optional[BaseException] = None
        try:
            self.cache.fill(block, chunk)
        except BaseException as exc:      # handed to the loop, which tells the waiters
            error = exc
        with self.done_lock:
            self.done.append((block, chunk, error))
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass

    def _finish_fills(self) -> None:
        with self.done_lock:
            done, self.done = self.done, []
        for block, chunk, error in done:
            with self.taken_lock:
                self.taken.discard((block, chunk))
            self.queued_low.discard((block, chunk))
            waiting = self.waiters.pop((block, chunk), [])
            if error is not None:
                self.cache.state[block][chunk] = EMPTY
                why = f"chunk {chunk} of block {self.source.blocks[block][0]!r}: {error}"
                self.log(why)
                self.stats.failures += 1
                for client in set(waiting):
                    self._fail(client, why)
                continue
            self.cache.evict(keep=self.cache.length(block, chunk))
            self.cache.mark_ready(block, chunk)
            for client in waiting:
                client.outstanding -= 1
                self._answer(client, block, [chunk])
            for client in set(waiting):             # frames it sent past its cap
                if client in self.clients and client.inbox:
                    try:
                        self._take(client)
                    except FormatError as exc:
                        self._fail(client, str(exc))
                self._update_events(client)

    def _answer(self, client: _Client, block: int, chunks: List[int]) -> None:
        """READY for the chunks, a frame per run of adjacent ones."""
        if not chunks or client not in self.clients:
            return
        start = prev = chunks[0]
        for chunk in chunks[1:] + [None]:           # type: ignore[operator]
            if chunk is not None and chunk == prev + 1:
                prev = chunk
                continue
            client.outbox += proto.frame(proto.OP_READY, block, start, prev - start + 1)
            self.stats.bytes_served += sum(self.cache.length(block, c)
                                           for c in range(start, prev + 1))
            if chunk is not None:
                start = prev = chunk
        if len(client.outbox) > MAX_OUTBOX:
            self._drop(client, "it does not read its answers")
            return
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        while client.outbox and client in self.clients:
            try:
                if client.fds:
                    n = client.sock.sendmsg([client.outbox], [(
                        socket.SOL_SOCKET, socket.SCM_RIGHTS,
                        struct.pack(f"{len(client.fds)}i", *client.fds))])
                    client.fds = []
                else:
                    n = client.sock.send(client.outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(client, "its socket failed")
                return
            del client.outbox[:n]
        self._update_events(client)

    def _update_events(self, client: _Client) -> None:
        if client not in self.clients:
            return
        events = selectors.EVENT_WRITE if client.outbox else 0
        if client.outstanding < MAX_OUTSTANDING:
            events |= selectors.EVENT_READ
        try:
            if events:
                self.sel.modify(client.sock, events, client)
            else:
                self.sel.unregister(client.sock)
        except KeyError:
            if events:
                self.sel.register(client.sock, events, client)


def _send_now(sock: socket.socket, data: bytes) -> None:
    """A last word, best effort: never waits."""
    try:
        sock.send(data, socket.MSG_DONTWAIT)
    except OSError:
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _stale_socket(path: str) -> bool:
    """A socket file nobody listens on any more (a server that was killed): safe to
    replace.  Anything else at the path is refused."""
    import stat
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise QFramError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        return exc.errno in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    raise QFramError(f"a page server already listens on {path}")
