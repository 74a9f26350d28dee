"""The receiving side of a postcopy migration.

Precopy pages are placed straight into new memory.  At LISTEN the pages the source
still calls dirty are discarded, every block is registered with userfaultfd (missing
mode) and, at RUN, the program's workload starts at once: its first touch of a missing
page becomes a page request on the return path (the core's fault server), and the page
is placed with UFFDIO_COPY when it arrives on the main stream (``FaultServer.receive``,
in C: neither loop needs the GIL that a faulting Python thread holds).
"""
from __future__ import annotations

import base64
import os
import socket
import sys
import threading
import time
from array import array
from typing import Callable, Optional

import xxhash

from qfram import channel, sched, stream, wire
from qfram.errors import FormatError
from qfram.latency import percentiles
from qfram.postcopy import messages as msg
from qfram.postcopy.stats import DestinationStats
from qfram.description import Description
from qfram.description import parse as parse_description
from qfram.ram import RAMList, set_bits
from qfram.targets import RestoreTarget
from qfram.wire import TARGET_PAGE_SIZE

MAX_TRAILER = 1 << 20          # a postcopy VMDESCRIPTION: this, plus a byte per page
CONFIRM_INTERVAL = 0.005       # seconds between QFRAM_RECEIVED messages


class MigrationFailed(RuntimeError):
    pass


class Destination:
    """Receive a migration on ``sock`` (connected) into new memory, or into ``ram``
    (blocks matched by name and length; they must be fresh, zeroed memory).

    ``workload(ram)`` makes the program's workload (an object with ``start()`` and
    ``stop()``), started at RUN.  ``on_failure``: "exit" ends the process with status 1
    when the migration breaks after RUN (threads faulting on pages that will never
    arrive cannot be woken safely); "raise" raises instead (only safe when nothing
    else touches the memory)."""

    def __init__(self, sock: socket.socket, *, preempt: Optional[socket.socket] = None,
                 ram: Optional[RAMList] = None,
                 workload: Optional[Callable[[RAMList], object]] = None,
                 window_pages: int = 16, spin_us: float = 50.0, verify: bool = True,
                 timeout: float = 30.0, on_failure: str = "exit",
                 confirm: bool = True) -> None:
        if on_failure not in ("exit", "raise"):
            raise ValueError("on_failure is 'exit' or 'raise'")
        self.sock = sock
        self.preempt = preempt
        # blocks the source announces: the caller's (fresh, zeroed memory) or new 4 KiB
        # anonymous memory (userfaultfd places pages one by one: huge pages would not help)
        self.target = RestoreTarget(ram, fresh=True, track_received=True)
        self.ram = self.target.ram
        self.workload_factory = workload
        self.workload = None
        self.window_pages = window_pages
        self.spin_us = spin_us
        self.verify = verify
        self.timeout = timeout
        self.on_failure = on_failure
        self.stats = DestinationStats()
        self.confirm = False           # the source releases only what we confirm
        self.send_confirmations = confirm

    # -- the run ------------------------------------------------------------------------

    def run(self) -> DestinationStats:
        t0 = self._t0 = time.perf_counter()
        self.sock.setblocking(False)
        f = channel.socket_file(self.sock, "rb", timeout=self.timeout)
        rp = f.get_return_path()
        server = None
        try:
            switched = self._precopy(f, rp)
            if switched:
                server = self._listen_and_run(f, rp)
                self._receive_postcopy(f, server)
            description = self._trailer(f)
            self.stats.seconds = round(time.perf_counter() - t0, 3)
            if server is not None:
                if server.placed_pages < server.total_pages:
                    raise MigrationFailed(f"the stream ended with "
                                          f"{server.total_pages - server.placed_pages} "
                                          f"pages missing")
                # Every page is in place or known to be zero: unregister first (a thread
                # faulting on a zero page is then served by the kernel), then stop.
                server.unregister()
                server.stop()
                self._fault_thread.join()
            if self.workload is not None:
                self.workload.stop()
                if getattr(self.workload, "error", None):
                    raise self.workload.error
            self.stats.verified = self._verify(description) if self.verify else False
            msg.put_return_message(rp, wire.MIG_RP_MSG_SHUT, msg.shut_payload(0))
        except BaseException as exc:
            self._fail(exc, rp, server)
            raise
        finally:
            if server is not None:
                self._collect(server)
                server.close()
        for closer in (f.close, rp.close):
            try:
                closer()
            except OSError:
                pass
        return self.stats

    def _fail(self, exc: BaseException, rp, server) -> None:
        try:
            msg.put_return_message(rp, wire.MIG_RP_MSG_SHUT, msg.shut_payload(1))
        except BaseException:
            pass
        if server is not None and self.on_failure == "exit":
            # Threads may be faulting on pages that will never come: end the process.
            print(f"qfram receive: migration failed after the switch: {exc}",
                  file=sys.stderr, flush=True)
            os._exit(1)

    # -- precopy ------------------------------------------------------------------------

    def _precopy(self, f, rp) -> bool:
        """The stream up to LISTEN (True) or EOF (a precopy-only migration: False): the
        stream walker places the RAM, commands are answered on the return path."""
        reader = stream.StreamReader(
            f, on_command=lambda cmd, data, pos: self._command(cmd, data, pos, rp, f),
            **self.target.reader_options)
        reader.read()
        return reader.stopped

    def _command(self, cmd: int, data: bytes, pos: int, rp, f) -> Optional[str]:
        """One command of the precopy phase; LISTEN ends it (STOP)."""
        if cmd == wire.CMD_POSTCOPY_LISTEN:
            self._t_listen = time.perf_counter()
            self.stats.precopy_s = round(self._t_listen - self._t0, 3)
            if self.confirm:             # every precopy page is in place by now
                msg.put_return_message(rp, wire.MIG_RP_MSG_QFRAM_RECEIVED,
                                       msg.received_payload(0, f.tell()))
            return stream.STOP
        if cmd == wire.CMD_OPEN_RETURN_PATH:
            return None
        if cmd == wire.CMD_QFRAM_CONFIRM:
            self.confirm = self.send_confirmations
            return None
        if cmd == wire.CMD_PING:
            msg.put_return_message(rp, wire.MIG_RP_MSG_PONG, data[:4])
        elif cmd == wire.CMD_POSTCOPY_ADVISE:
            if len(data) >= 16 and int.from_bytes(data[8:16], "big") != TARGET_PAGE_SIZE:
                raise FormatError("the source's target page size is not 4 KiB", pos)
        elif cmd == wire.CMD_POSTCOPY_RAM_DISCARD:
            name, ranges = msg.parse_discard(data, pos)
            block = self.ram.get(name)
            if block is None:
                raise FormatError(f"RAM_DISCARD for unknown block {name!r}", pos)
            for start, length in ranges:
                if start % TARGET_PAGE_SIZE or length % TARGET_PAGE_SIZE or \
                        start + length > block.used_length:
                    raise FormatError(f"RAM_DISCARD range {start:#x}+{length:#x} outside "
                                      f"{name!r}", pos)
                # new zero memory again, and not here: its page comes after the switch
                block.discard(start, length)
                first, count = start // TARGET_PAGE_SIZE, length // TARGET_PAGE_SIZE
                set_bits(self.target.touched[name], first, count, False)
                set_bits(self.target.received[name], first, count, False)
        else:
            raise FormatError(f"unexpected command {cmd}", pos)
        return None

    # -- the switch and postcopy ----------------------------------------------------------

    def _listen_and_run(self, f, rp):
        from qfram._uffd import FaultServer
        server = FaultServer(self.window_pages, self.spin_us)
        server.exit_on_failure = self.on_failure == "exit"
        for block in self.ram:
            server.add_area(block.region, name=block.name, present=self.target.received[block.name])
        server.set_remote(rp.channel.fd, self.timeout)
        if self.preempt is None:
            # requests queue behind the main connection's buffers: keep them short
            from qfram.postcopy.source import POSTCOPY_SOCKET_BUFFER
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, POSTCOPY_SOCKET_BUFFER)
        self._fault_thread = threading.Thread(target=self._guarded, args=(server.serve_faults,),
                                              daemon=True, name="qfram-faults")
        self._fault_thread.start()
        pos = f.tell()
        if f.get_byte() != wire.SECTION_COMMAND or f.get_be16() != wire.CMD_POSTCOPY_RUN:
            raise FormatError("LISTEN is not followed by RUN", pos)
        f.skip(f.get_be16())
        self.stats.pages_at_switch = server.placed_pages
        # The receiver must be in its GIL-free loop before anything can fault: a Python
        # thread waits for its page holding the GIL.
        self._receive_error: Optional[BaseException] = None
        files = [f]
        if self.preempt is not None:
            self.preempt.setblocking(False)
            pf = channel.socket_file(self.preempt, "rb", timeout=self.timeout)
            if pf.get_buffer(len(wire.PREEMPT_MAGIC)) != wire.PREEMPT_MAGIC:
                raise FormatError("the preempt channel does not start with its magic", 0)
            files.append(pf)
        self._receivers = [threading.Thread(target=self._receive, args=(x, server, i),
                                            daemon=True, name="qfram-receive")
                           for i, x in enumerate(files)]
        for t in self._receivers:
            t.start()
        while server.receiving < len(files) and all(t.is_alive() for t in self._receivers):
            time.sleep(0.0002)
        self._confirming = None
        if self.confirm:
            self._confirming = threading.Thread(target=self._confirm_loop,
                                                args=(server, len(files)), daemon=True,
                                                name="qfram-confirm")
            self._confirming.start()
        self._t_run = time.perf_counter()
        if self.workload_factory is not None:
            self.workload = self.workload_factory(self.ram)
            self.workload.start()
        self.stats.downtime_destination_ms = round(
            (time.perf_counter() - self._t_listen) * 1000, 2)
        return server

    def _receive(self, f, server, channel: int) -> None:
        if channel == 0 and self.preempt is not None:
            sched.background()       # the bulk stream yields to the requested pages
        else:
            sched.short_slice()
        try:
            server.receive(f, channel)   # until EOF, in C
        except BaseException as exc:
            self._receive_error = exc

    def _guarded(self, loop) -> None:
        sched.short_slice()          # the fault thread: woken by every fault
        try:
            loop()
        except BaseException as exc:
            self._fail(exc, None, True)

    def _confirm_loop(self, server, channels: int) -> None:
        """Tell the source, every few ms, up to where each channel's pages are in
        place (it frees them then).  Late is harmless: it only frees later."""
        sent = [0] * channels
        while True:
            done = not any(t.is_alive() for t in self._receivers)
            for ch in range(channels):
                upto = server.placed_upto(ch)
                if upto > sent[ch]:
                    try:
                        server.send_message(wire.MIG_RP_MSG_QFRAM_RECEIVED,
                                            msg.received_payload(ch, upto))
                    except OSError:
                        return
                    sent[ch] = upto
            if done:
                return
            time.sleep(CONFIRM_INTERVAL)

    def _receive_postcopy(self, f, server) -> None:
        for t in self._receivers:
            t.join()
        if self._confirming is not None:
            self._confirming.join()
        if self._receive_error is not None:
            raise self._receive_error
        self.stats.postcopy_s = round(time.perf_counter() - self._t_run, 3)

    def _trailer(self, f) -> Optional[Description]:
        """The VMDESCRIPTION after EOF: the source's verification hashes.  Its length is
        bounded by what the RAM could need (8 bytes per chunk, base64), and it is read
        as it arrives, so a lying length costs nothing."""
        try:
            if f.get_byte() != wire.SECTION_VMDESCRIPTION:
                return None
        except EOFError:
            return None
        pos = f.tell()
        length = f.get_be32()
        limit = MAX_TRAILER + sum(b.used_length for b in self.ram) // TARGET_PAGE_SIZE
        if length > limit:
            raise FormatError(f"a VMDESCRIPTION of {length} bytes (at most {limit} for this "
                              f"RAM)", pos)
        raw = bytearray()
        while len(raw) < length:
            raw += f.get_buffer(min(length - len(raw), 1 << 20))
        return parse_description(bytes(raw), pos - 1)

    def _collect(self, server) -> None:
        st = self.stats
        n = server.counters
        st.faults, st.requests, st.requested_pages = n["faults"], n["requests"], \
            n["requested_pages"]
        st.received_pages = n["received_pages"] + n["received_zero_pages"]
        st.duplicate_pages, st.eexist = n["duplicate_pages"], n["eexist"]
        st.fault_latency = percentiles(server.latencies_ns())
        if self.workload is not None and getattr(self.workload, "touch_ns", None):
            st.workload_first_touch = percentiles(self.workload.touch_ns)

    # -- verification -------------------------------------------------------------------

    def _verify(self, description: Optional[Description]) -> bool:
        """Every HASH_CHUNK of pages must hash as at the source's switch, once the pages
        the workload wrote here are taken as they were before it wrote them; and those
        pages must hold what it wrote."""
        if description is None or description.chunk_hashes is None:
            return False
        hashes = description.chunk_hashes
        chunk = description.hash_chunk_pages
        written = getattr(self.workload, "written", {}) or {}
        originals = getattr(self.workload, "originals", {}) or {}
        for block in self.ram:
            expected = array("Q")
            if block.name not in hashes:
                raise FormatError(f"VMDESCRIPTION: no hashes for block {block.name!r}",
                                  description.offset)
            raw = base64.b64decode(hashes[block.name])
            if len(raw) != 8 * -(-block.npages // chunk):
                raise FormatError(f"VMDESCRIPTION: the hashes of block {block.name!r} do "
                                  f"not cover it", description.offset)
            expected.frombytes(raw)
            view = memoryview(block.region)
            step = chunk * TARGET_PAGE_SIZE
            for c, want in enumerate(expected):
                first = c * chunk
                pages = [p for p in range(first, min(first + chunk, block.npages))
                         if (block.name, p) in written]
                data = view[c * step:(c + 1) * step]
                if pages:
                    data = bytearray(data)
                    for p in pages:
                        if bytes(view[p * TARGET_PAGE_SIZE:(p + 1) * TARGET_PAGE_SIZE]) != written[(block.name, p)]:
                            raise MigrationFailed(f"{block.name} page {p}: the workload's "
                                                  f"write was lost")
                        off = (p - first) * TARGET_PAGE_SIZE
                        data[off:off + TARGET_PAGE_SIZE] = originals[(block.name, p)]
                if xxhash.xxh3_64_intdigest(data) != want:
                    raise MigrationFailed(f"{block.name} pages {first}..{first + chunk - 1} "
                                          f"differ from the source")
        return True
