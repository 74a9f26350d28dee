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
from typing import Callable, Dict, List, Optional

import xxhash

from qfram import wire
from qfram.format import savevm
from qfram.format import workingset
from qfram._util import sched
from qfram.errors import DeadlinePassed, FormatError, MigrationFailed, OptionError
from qfram._util.latency import percentiles
from qfram._util.text import printable
from qfram.postcopy import link
from qfram.postcopy import messages as msg
from qfram.results import DestinationStats
from qfram.format.vmdesc import Description
from qfram.format.vmdesc import parse as parse_description
from qfram.ram import RAMList, set_bits
from qfram.io.targets import RestoreTarget
from qfram.wire import TARGET_PAGE_SIZE

MAX_TRAILER = 1 << 20          # a postcopy VMDESCRIPTION: this, plus a byte per page
# What one read of a page stream may bring: a socket read costs the same for 32 KiB or
# 1 MiB, and each one opens the sender's window (its transmit work then runs here).
RECEIVE_BUFFER = 1 << 20
CONFIRM_INTERVAL = 0.005       # seconds between QFRAM_RECEIVED messages



class Destination:
    """Receive a migration on ``main`` (a connected socket or :class:`Link`) into new
    memory, or into ``ram`` (blocks matched by name and length; they must be fresh,
    zeroed memory).

    ``preempt``: the preempt channel (a socket or Link), or True to take it from
    ``acceptor`` at LISTEN.  ``acceptor`` (a :class:`link.Acceptor`) also brings the
    resumed link when the connection drops after the switch (``resume``): the RAM and
    the threads faulting on it wait — until ``deadline``, else ``timeout`` seconds.
    ``workload(ram)`` makes the program's workload (an object with ``start()`` and
    ``stop()``), started at RUN; it must touch the memory without holding the GIL to
    survive a resume (qfram's Workload does).  ``timeout`` bounds each wait,
    ``deadline`` (seconds) the whole migration; ``max_ram`` the RAM the source may
    declare.  ``on_failure``: "exit" ends the process with status 1 when the migration
    breaks after RUN (threads faulting on pages that will never arrive cannot be woken
    safely); "raise" raises instead (only safe when nothing else touches the memory).
    ``working_set``: a file to add the pages faulted on here, in order, to, once the
    migration is complete (the next migration's source sends them first)."""

    def __init__(self, main, *, preempt=None, acceptor: Optional[link.Acceptor] = None,
                 ram: Optional[RAMList] = None,
                 workload: Optional[Callable[[RAMList], object]] = None,
                 window_pages: int = 16, spin_us: float = 50.0, verify: bool = True,
                 timeout: float = 30.0, deadline: Optional[float] = None,
                 max_ram: Optional[int] = None, on_failure: str = "exit",
                 confirm: bool = True, resume: bool = True,
                 working_set: Optional[str] = None) -> None:
        if on_failure not in ("exit", "raise"):
            raise OptionError("on_failure is 'exit' or 'raise'")
        self.main = link.as_link(main)
        self.preempt = None if preempt in (None, False, True) else link.as_link(preempt)
        self.want_preempt = preempt not in (None, False)
        if preempt is True and acceptor is None:
            raise OptionError("preempt=True takes the channel from an acceptor")
        self.acceptor = acceptor
        self.resumable = resume and acceptor is not None
        # blocks the source announces: the caller's (fresh, zeroed memory) or new 4 KiB
        # anonymous memory (userfaultfd places pages one by one: huge pages would not help)
        self.target = RestoreTarget(ram, fresh=True, track_received=True, max_bytes=max_ram)
        self.ram = self.target.ram
        self.workload_factory = workload
        self.workload = None
        self.window_pages = window_pages
        self.spin_us = spin_us
        self.verify = verify
        self.timeout = timeout
        self.deadline = deadline
        self._deadline_at = None if deadline is None else time.monotonic() + deadline
        self.expired = False
        self.on_failure = on_failure
        self.stats = DestinationStats()
        self.confirm = False           # the source releases only what we confirm
        self.send_confirmations = confirm
        self.stats.tls = self.main.security
        self.session: Optional[bytes] = None     # the source's token (CMD_QFRAM_SESSION)
        self._discarded: Dict[str, int] = {}     # per block: where RAM_DISCARD got to
        self._links = [self.main] + ([self.preempt] if self.preempt else [])
        self.working_set = working_set
        self._receive_cpu = 0.0        # CPU seconds of the receiving threads, summed
        self._cpu_lock = threading.Lock()
        self._fault_cpu: Optional[float] = None

    # -- the run ------------------------------------------------------------------------

    def run(self) -> DestinationStats:
        t0 = self._t0 = time.perf_counter()
        watchdog = None
        if self.deadline is not None:
            watchdog = threading.Timer(self.deadline, self._expire)
            watchdog.daemon = True
            watchdog.start()
        f = self.main.file("rb", self.timeout, RECEIVE_BUFFER)
        rp = f.get_return_path()
        server = None
        try:
            switched = self._precopy(f, rp)
            if switched:
                server = self._listen_and_run(f, rp)
                f, rp = self._receive_postcopy(f, rp, server)
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
            if self.working_set is not None and server is not None:
                self.stats.working_set = workingset.record_migration(
                    self.working_set, self.ram, server.touches(), self.window_pages)
            msg.put_return_message(rp, wire.MIG_RP_MSG_SHUT, msg.shut_payload(0))
        except BaseException as exc:
            if self.expired:
                exc = DeadlinePassed(f"the migration did not finish within its deadline "
                                     f"({self.deadline:g} s): {exc}")
            self._fail(exc, rp, server)
            raise exc
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if server is not None:
                self._collect(server)
                server.close()
        for closer in (f.close, rp.close):
            try:
                closer()
            except OSError:
                pass
        return self.stats

    def _expire(self) -> None:
        """The deadline passed: end every wait at once (the failure path says why)."""
        self.expired = True
        for each in list(self._links):
            each.shutdown()

    def _fail(self, exc: BaseException, rp, server) -> None:
        try:
            msg.put_return_message(rp, wire.MIG_RP_MSG_SHUT, msg.shut_payload(1))
        except BaseException:
            pass
        if server is not None and self.on_failure == "exit":
            # Threads may be faulting on pages that will never come: end the process.
            print(f"qfram receive: migration failed after the switch: "
                  f"{printable(str(exc))}", file=sys.stderr, flush=True)
            os._exit(1)

    # -- precopy ------------------------------------------------------------------------

    def _precopy(self, f, rp) -> bool:
        """The stream up to LISTEN (True) or EOF (a precopy-only migration: False): the
        stream walker places the RAM, commands are answered on the return path."""
        reader = savevm.StreamReader(
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
            return savevm.STOP
        if cmd == wire.CMD_OPEN_RETURN_PATH:
            return None
        if cmd == wire.CMD_QFRAM_CONFIRM:
            self.confirm = self.send_confirmations
            return None
        if cmd == wire.CMD_QFRAM_SESSION:
            if len(data) != wire.SESSION_TOKEN_BYTES or self.session is not None:
                raise FormatError("a broken or second QFRAM_SESSION", pos)
            self.session = data
        elif cmd == wire.CMD_PING:
            msg.put_return_message(rp, wire.MIG_RP_MSG_PONG, data[:4])
        elif cmd == wire.CMD_POSTCOPY_ADVISE:
            if len(data) >= 16 and int.from_bytes(data[8:16], "big") != TARGET_PAGE_SIZE:
                raise FormatError("the source's target page size is not 4 KiB", pos)
        elif cmd == wire.CMD_POSTCOPY_RAM_DISCARD:
            self._discard(*msg.parse_discard(data, pos), pos)
        else:
            raise FormatError(f"unexpected command {cmd}", pos)
        return None

    def _discard(self, name: str, ranges, pos: int) -> None:
        """RAM_DISCARD: new zero memory again, and not here (its page comes after the
        switch).  Ranges must go up through the block without overlap, as QEMU sends
        them: the work they cost is then bounded by the block's size."""
        block = self.ram.get(name)
        if block is None:
            raise FormatError(f"RAM_DISCARD for unknown block {printable(name)!r}", pos)
        done = self._discarded.get(name, 0)
        for start, length in ranges:
            if start % TARGET_PAGE_SIZE or length % TARGET_PAGE_SIZE or \
                    start + length > block.used_length:
                raise FormatError(f"RAM_DISCARD range {start:#x}+{length:#x} outside "
                                  f"{printable(name)!r}", pos)
            if start < done:
                raise FormatError(f"RAM_DISCARD range {start:#x}+{length:#x} of "
                                  f"{printable(name)!r} is not above the last one "
                                  f"(ending at {done:#x})", pos)
            done = start + length
            block.discard(start, length)
            first, count = start // TARGET_PAGE_SIZE, length // TARGET_PAGE_SIZE
            set_bits(self.target.touched[name], first, count, False)
            set_bits(self.target.received[name], first, count, False)
        self._discarded[name] = done

    # -- the switch and postcopy ----------------------------------------------------------

    def _listen_and_run(self, f, rp):
        from qfram._uffd import FaultServer
        server = FaultServer(self.window_pages, self.spin_us)
        server.exit_on_failure = self.on_failure == "exit"
        for block in self.ram:
            server.add_area(block.region, name=block.name, present=self.target.received[block.name])
        if self.session is None:
            self.resumable = False      # a source that cannot resume (QEMU's token-less)
        server.set_remote(rp.channel, self.timeout, resumable=self.resumable)
        if not self.want_preempt:
            # requests queue behind the main connection's buffers: keep them short
            from qfram.postcopy.source import POSTCOPY_SOCKET_BUFFER
            self.main.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                      POSTCOPY_SOCKET_BUFFER)
        self._fault_thread = threading.Thread(target=self._guarded, args=(server.serve_faults,),
                                              daemon=True, name="qfram-faults")
        self._fault_thread.start()
        pos = f.tell()
        if f.get_byte() != wire.SECTION_COMMAND or f.get_be16() != wire.CMD_POSTCOPY_RUN:
            raise FormatError("LISTEN is not followed by RUN", pos)
        f.skip(f.get_be16())
        self.stats.pages_at_switch = server.placed_pages
        files = [f] + ([self._preempt_file()] if self.want_preempt else [])
        # The receivers must be in their GIL-free loops before anything can fault: a
        # Python thread may wait for its page holding the GIL.
        self._start_receivers(files, server)
        self._t_run = time.perf_counter()
        self._cpu_run = sched.process_cpu()
        if self.workload_factory is not None:
            self.workload = self.workload_factory(self.ram)
            self.workload.start()
        self.stats.downtime_destination_ms = round(
            (time.perf_counter() - self._t_listen) * 1000, 2)
        return server

    def _preempt_file(self):
        """The preempt channel's file, past its magic and the session's token."""
        if self.preempt is None:
            self.preempt = self.acceptor.wait([link.PREEMPT], self._wait_until(),
                                              "the source's preempt channel")
            self._links.append(self.preempt)
        pf = self.preempt.file("rb", self.timeout, RECEIVE_BUFFER)
        if pf.get_buffer(len(wire.PREEMPT_MAGIC)) != wire.PREEMPT_MAGIC:
            raise FormatError("the preempt channel does not start with its magic", 0)
        if self.session is not None and \
                pf.get_buffer(wire.SESSION_TOKEN_BYTES) != self.session:
            raise FormatError("the preempt channel belongs to another migration", 8)
        return pf

    def _wait_until(self) -> float:
        """Until when to wait for a source's connection: the deadline, or a timeout."""
        return self._deadline_at if self._deadline_at is not None else \
            time.monotonic() + self.timeout

    def _start_receivers(self, files, server) -> None:
        self._receive_errors: List[BaseException] = []
        self._receivers = [threading.Thread(target=self._receive, args=(x, server, i, files),
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

    def _receive(self, f, server, channel: int, files) -> None:
        if channel == 1:
            sched.urgent()           # the preempt channel: requested pages only
        elif len(files) > 1:
            sched.background()       # the bulk stream yields to the requested pages
        else:
            sched.short_slice()      # one channel carries both: never real-time
        cpu = time.thread_time()
        try:
            server.receive(f, channel)   # until EOF, in C
        except BaseException as exc:
            self._receive_errors.append(exc)
            for other in files:          # one channel lost: the others end too
                if other is not f:
                    try:
                        other.shutdown()
                    except OSError:
                        pass
        finally:
            with self._cpu_lock:
                self._receive_cpu += time.thread_time() - cpu

    def _guarded(self, loop) -> None:
        self.stats.urgent_threads = sched.urgent()   # the fault thread: woken by every fault
        cpu = time.thread_time()
        try:
            loop()
        except BaseException as exc:
            self._fail(exc, None, True)
        finally:
            self._fault_cpu = time.thread_time() - cpu

    def _confirm_loop(self, server, channels: int) -> None:
        """Tell the source, every few ms, up to where each channel's pages are in
        place (it frees them then).  Late is harmless: it only frees later."""
        sched.urgent()       # it shares the return path with page requests: never
        sent = [0] * channels  # preempted while it holds it
        while True:
            done = not any(t.is_alive() for t in self._receivers)
            if server.link_down:
                return
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

    def _receive_postcopy(self, f, rp, server):
        """Until the main stream's EOF; a link lost on the way is resumed (when it can
        be).  Returns the main stream's file and return path as they are then."""
        while True:
            for t in self._receivers:
                t.join()
            if self._confirming is not None:
                self._confirming.join()
            if not self._receive_errors:
                break
            error = self._receive_errors[0]
            if not self.resumable or self.expired or isinstance(error, FormatError):
                raise error
            f, rp = self._resume(server, f, rp, error)
        self.stats.postcopy_s = round(time.perf_counter() - self._t_run, 3)
        self.stats.postcopy_cpu_s = round(sched.process_cpu() - self._cpu_run, 3)
        return f, rp

    def _resume(self, server, f, rp, error: BaseException):
        """The link dropped after the switch: keep the RAM and the faulting threads
        waiting, take the source's resumed link, tell it what arrived (RECV_BITMAP per
        block), RESUME_ACK, and go on.  Returns the new main file and return path."""
        server.pause_remote()
        for old in [f, rp] + self._links:
            try:
                old.close()
            except OSError:
                pass
        self._links = []
        self.preempt = None
        print(f"qfram receive: the link dropped after the switch ({printable(str(error))});"
              f" waiting for the source to resume", file=sys.stderr, flush=True)
        while True:
            main = self.acceptor.wait([link.RESUME], self._wait_until(),
                                      "the source (to resume)")
            if main.hello[3:5] == b"\x00" + bytes([wire.SESSION_TOKEN_BYTES]) and \
                    main.peek(5 + wire.SESSION_TOKEN_BYTES, self.timeout)[5:] == \
                    self.session and self.session is not None:
                break
            print("qfram receive: dropped a resume for another migration", file=sys.stderr,
                  flush=True)
            main.close()
        self.main = main
        self._links.append(main)
        f = main.file("rb", self.timeout, RECEIVE_BUFFER)
        rp = f.get_return_path()
        f.skip(5 + wire.SESSION_TOKEN_BYTES)         # the QFRAM_RESUME command
        while True:
            pos = f.tell()
            if f.get_byte() != wire.SECTION_COMMAND:
                raise FormatError("a resumed link must open with commands", pos)
            cmd = f.get_be16()
            data = f.get_buffer(f.get_be16())
            if cmd == wire.CMD_RECV_BITMAP:
                name = msg.parse_counted_name(data, pos)
                try:
                    bitmap = server.received_bitmap(name)
                except KeyError:
                    raise FormatError(f"RECV_BITMAP for unknown block "
                                      f"{printable(name)!r}", pos) from None
                msg.put_received_bitmap(rp, name, bitmap)
            elif cmd == wire.CMD_POSTCOPY_RESUME:
                msg.put_return_message(rp, wire.MIG_RP_MSG_RESUME_ACK,
                                       (1).to_bytes(4, "big"))
                break
            else:
                raise FormatError(f"unexpected command {cmd} while resuming", pos)
        files = [f] + ([self._preempt_file()] if self.want_preempt else [])
        server.resume_remote(rp.channel, self.timeout)
        self._start_receivers(files, server)
        self.stats.resumes += 1
        return f, rp

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
        st.placement, st.placing_calls = server.placement, n["received_runs"]
        st.placements_offered = server.placements_offered
        st.receive_cpu_s = round(self._receive_cpu, 3)
        st.fault_cpu_s = None if self._fault_cpu is None else round(self._fault_cpu, 3)
        if st.postcopy_s:
            st.postcopy_gbps = round(st.received_pages * TARGET_PAGE_SIZE / st.postcopy_s
                                     / 1e9, 3)
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
