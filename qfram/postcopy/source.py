"""The sending side of a postcopy migration.

Precopy rounds stream every page, then the pages written meanwhile (found by
``_uffd.DirtyTracker``), until few are left, a round limit, or ``switch()``.  Then the
program's workload is stopped, the still-dirty pages are announced (RAM_DISCARD), the
destination is told to LISTEN and RUN, and the remaining pages follow: the ones the
destination asks for (REQ_PAGES on the return path) first, then the scan goes on from the
requested page so its neighbours follow.  With ``release`` every page leaves the source's
memory once it is at the destination.  A link lost after the switch is reconnected
(``reconnect``): the destination says which pages it has (RECV_BITMAP), and only the
others are sent again.
"""
from __future__ import annotations

import base64
import collections
import errno
import secrets
import socket
import sys
import threading
import time
from array import array
from typing import Callable, Deque, Dict, List, Optional, Tuple

import xxhash

from qfram import wire
from qfram.format import savevm
from qfram import backend
from qfram._util import sched
from qfram.errors import DeadlinePassed, FormatError, NoConfirmation, QFramError
from qfram._util.latency import percentiles
from qfram.format.workingset import WorkingSet
from qfram.postcopy import link
from qfram.postcopy import messages as msg
from qfram.postcopy.release import ConfirmedRelease
from qfram.results import SourceStats
from qfram.ram import RAMBlock, RAMList, bitmap_bytes
from qfram.wire import TARGET_PAGE_SIZE

PRECOPY_CHUNK = 16384          # pages per PART in precopy (64 MiB)
# Without a preempt channel a requested page waits behind whatever the main connection's
# buffers hold: at ~1 GB/s a 4 MiB buffer each side is ~8 ms.  Small buffers bound that
# wait (measured here on loopback TCP, 1 GiB: p99 fault latency 14 ms with 4 MiB
# buffers, 0.35-0.6 ms with 128 KiB, for ~25% less background throughput).
POSTCOPY_SOCKET_BUFFER = 128 << 10
POSTCOPY_CHUNK = 64            # pages per background batch without preempt (256 KiB): a
                               # request queued on the main channel waits at most one
# With a preempt channel the faulting page always goes there at once, even when the
# background stream has sent it already (it may sit in the main connection's buffers):
# one duplicate page per fault buys a latency that no longer depends on the background
# stream, which can then use big buffers and big batches.  Measured (1 GiB, loopback,
# 2 x 2 runs each of 128, 256, 512, 1024 and 4096 pages): fault p99 0.43-0.89 ms
# whatever the batch; the background thread's CPU 0.31 s per GiB at 128 pages,
# 0.22-0.27 at 256, 0.18-0.21 at 1024 and 4096.  1024 keeps the scan's turns to the
# requested pages and the release's granularity at 4 MiB.
PREEMPT_CHUNK = 1024           # pages per background batch with preempt (4 MiB)
HASH_CHUNK = 64                # pages per verification hash
SWITCH_INTERVAL = 0.0002       # seconds a thread may hold the GIL while another waits
# A destination may ask for pages far faster than they can go: requests are hints (the
# background scan sends every page anyway), so at most this many wait, duplicates and
# pages already sent are dropped, and the faulting page is sent again once at most.
MAX_REQUEST_HINTS = 4096
MAX_LOGGED_REQUESTS = 1 << 20     # the request log (a working set) keeps this many
MAX_SERVICE_SAMPLES = 1 << 20
RECONNECT_INTERVAL = 0.2       # seconds between attempts to resume


class Source:
    """Send ``ram`` over ``main`` (a connected socket or :class:`link.Link`), precopy
    then postcopy.

    ``workload``: started when sending starts and stopped at the switch (an object with
    ``start()``/``stop()``, e.g. ``postcopy.workload.Workload``).  ``max_rounds``,
    ``converge_pages``, ``switch_after`` (seconds) decide when to switch (``max_rounds``
    0: no precopy at all); ``switch()`` does it at once.  ``postcopy=False`` migrates by precopy only (the workload is
    stopped for a last round).  ``preempt``: a second connected socket on which
    requested pages go out at once, ahead of the background stream (QEMU's
    postcopy-preempt); without it they are queued between background batches.
    ``reconnect()``: makes a new connection to the destination (a Link), to resume a
    link lost after the switch — tried until ``deadline`` (seconds from the start),
    else for ``timeout`` seconds.  ``working_set``: pages the destination's program
    touched first last time (a :class:`workingset.WorkingSet` whose block indexes are
    ``ram``'s order), sent at the switch before anything else, so that they are in
    place before it runs."""

    peer = "the destination"       # who confirms, as messages name it

    def __init__(self, ram: RAMList, main, *, preempt=None,
                 reconnect: Optional[Callable[[], "link.Link"]] = None,
                 deadline: Optional[float] = None, release: bool = False,
                 max_rounds: int = 10, converge_pages: int = 1024,
                 switch_after: Optional[float] = None, workload=None, verify: bool = True,
                 postcopy: bool = True, timeout: float = 30.0,
                 machine: str = "pc-i440fx-7.2",
                 working_set: Optional[WorkingSet] = None) -> None:
        self.ram = ram
        self.working_set = working_set
        self.blocks: List[RAMBlock] = list(ram)
        self.main = link.as_link(main)
        self.preempt = None if preempt is None else link.as_link(preempt)
        self.reconnect = reconnect
        self.deadline = deadline
        self._deadline_at: Optional[float] = None
        self.session = secrets.token_bytes(wire.SESSION_TOKEN_BYTES)
        self.ram_section_id = wire.RAM_SECTION_ID
        self.f = None                  # the main channel's file (new after a resume)
        self.pf = None                 # the preempt channel's file
        self._pf_lock = threading.Lock()
        # answers page requests on the preempt channel in C (qfram._requests), and the
        # lock of the bookkeeping of what it served
        self._server = None
        self._served_lock = threading.Lock()
        self.release = release
        self.max_rounds = max_rounds
        self.converge_pages = converge_pages
        self.switch_after = switch_after
        self.workload = workload
        self.verify = verify
        self.postcopy = postcopy
        self.timeout = timeout
        self.machine = machine
        self.dirty: Dict[str, bytearray] = {b.name: bytearray(bitmap_bytes(b.npages))
                                            for b in self.blocks}
        self.requests: Deque[Tuple[str, int, int, int]] = collections.deque(
            maxlen=MAX_REQUEST_HINTS)
        # when a subclass wants the pages asked for, in order (the destination's working
        # set): block index << 48 | page, 8 bytes each and at most MAX_LOGGED_REQUESTS
        self.request_log: Optional[array] = None
        self._block_index = {b.name: i for i, b in enumerate(self.blocks)}
        self._resent: Dict[str, bytearray] = {b.name: bytearray(bitmap_bytes(b.npages))
                                              for b in self.blocks}
        self.shut = threading.Event()
        self.shut_status: Optional[int] = None
        self.rp_error: Optional[BaseException] = None
        self.expired = False           # the deadline passed: every wait was ended
        self._closing = False          # we shut the channels: the reader's end is ours
        self._heard = [0, None, 0.0]   # return path: messages, the last one's type, when
        self._switch = threading.Event()
        self._preempt_pages = 0
        self._resent_pages = 0         # faulting pages sent again on the preempt channel
        self._serve_ns: List[int] = []          # request read -> its pages written
        self.stats = SourceStats(ram_bytes=sum(b.used_length for b in self.blocks),
                                 tls=self.main.security)
        # release-ram: pages go once the destination confirms them (ConfirmedRelease);
        # `claimed` per channel and block records exactly which pages a batch carried
        self.releases: Optional[ConfirmedRelease] = None
        self._claimed: List[Dict[str, bytearray]] = []
        self._bytes_before = 0         # sent on links lost since

    def switch(self) -> None:
        """Switch to postcopy at the end of the current chunk (a command)."""
        self._switch.set()

    # -- the run ------------------------------------------------------------------------

    def run(self) -> SourceStats:
        t0 = time.perf_counter()
        # The thread serving page requests needs the GIL the moment one arrives; the
        # default 5 ms switch interval would be its worst-case wait behind the others.
        sys.setswitchinterval(SWITCH_INTERVAL)
        if self.release:
            self.releases = ConfirmedRelease()
            self._claimed = [{b.name: bytearray(bitmap_bytes(b.npages)) for b in self.blocks}
                             for _ in range(2)]
        watchdog = self._watchdog()
        f = self.f = self.main.file("wb", self.timeout)
        rp = self.rp = f.get_return_path()
        rp.set_timeout(None)
        reader = self._reader = threading.Thread(target=self._read_return_path, args=(rp,),
                                                 daemon=True, name="qfram-return-path")
        trackers, tracking = self._trackers()
        try:
            if self.preempt is not None:
                self.pf = self._open_preempt(self.preempt)
            self._server = self._request_server()
            savevm.put_header(f, self.machine)
            savevm.put_command(f, wire.CMD_OPEN_RETURN_PATH)
            savevm.put_command(f, wire.CMD_QFRAM_SESSION, self.session)
            if self.releases is not None:
                savevm.put_command(f, wire.CMD_QFRAM_CONFIRM)  # release only what it confirms
            if self.postcopy:
                savevm.put_command(f, wire.CMD_POSTCOPY_ADVISE,
                                   msg.advise_payload(TARGET_PAGE_SIZE, TARGET_PAGE_SIZE))
            savevm.put_ram_setup(f, self.ram_section_id, self.blocks)
            f.flush()
            reader.start()
            for block in self.blocks:
                block_all_dirty(self.dirty[block.name], block.npages)
            if self.workload is not None:
                self.workload.start()
            rounds, precopy_pages = self._precopy(f, trackers, t0)
            # -- the switch: stop the program, find what it wrote last
            t_stop = time.perf_counter()
            if self.workload is not None:
                self.workload.stop()
            for block, tracker in zip(self.blocks, trackers):
                if tracker is not None:
                    tracker.collect(self.dirty[block.name])
            remaining = self._dirty_count()
            t_verify = 0.0
            hashes = None
            if self.verify:
                tv = time.perf_counter()
                hashes = self._chunk_hashes()
                t_verify = time.perf_counter() - tv
            tail = {"page_size": TARGET_PAGE_SIZE, "devices": [],
                    "qfram": {"postcopy": True, "hash_chunk_pages": HASH_CHUNK,
                              "chunk_hashes": hashes}}
            if self.postcopy:
                postcopy_pages, requested_pages = self._postcopy(t_stop, t_verify, tail)
            else:
                precopy_pages += self._send_all_dirty(f)
                postcopy_pages = requested_pages = 0
                if self.releases is not None:
                    end = f.tell()       # every page went in precopy: free all on SHUT
                    for block in self.blocks:
                        self.releases.sent(0, end, block, [(0, block.npages)])
                self.stats.downtime_source_ms = round(
                    (time.perf_counter() - t_stop - t_verify) * 1000, 2)
                self._finish(tail)
            if self.releases is not None:
                self.releases.confirm_all()      # SHUT(0): it holds and verified everything
        except BaseException as exc:
            self._shutdown_channels()
            self._join_reader()
            self._close_server()
            self._close_files()
            raise self._reason(exc) from None
        finally:
            if watchdog is not None:
                watchdog.cancel()
            for tracker in trackers:
                if tracker is not None:
                    tracker.close()
            self._join_reader()
            self._close_server()
            released = self.releases.stop() if self.releases is not None else 0
        sent_bytes = self._bytes_before + self.f.tell() + \
            (self.pf.tell_fast() if self.pf is not None else 0)
        self._close_files()
        st = self.stats
        st.dirty_tracking, st.precopy_rounds, st.precopy_pages = tracking, rounds, precopy_pages
        st.dirty_at_switch, st.postcopy_pages = remaining, postcopy_pages
        st.requested_pages, st.pages_sent = requested_pages, precopy_pages + postcopy_pages
        st.bytes_sent, st.released_bytes = sent_bytes, released
        st.confirmations = self.releases.confirmations if self.releases else 0
        st.preempt_channel, st.verify_s = self.pf is not None, round(t_verify, 3)
        st.request_service = percentiles(self._serve_ns)
        st.seconds = round(time.perf_counter() - t0, 3)
        return st

    # -- precopy ------------------------------------------------------------------------

    def _trackers(self):
        from qfram import _uffd
        trackers = []
        try:
            for block in self.blocks:
                trackers.append(_uffd.DirtyTracker(block.region))
            return trackers, "userfaultfd-wp-async+pagemap-scan"
        except OSError:
            for t in trackers:
                t.close()
            # No way to see writes: one round, with the program stopped while it runs.
            if self.workload is not None:
                raise QFramError("this kernel cannot track dirty pages (needs Linux 6.7+ "
                                   "for asynchronous userfaultfd write protection); "
                                   "migrate without a running workload") from None
            return [None] * len(self.blocks), "none"

    def _precopy(self, f, trackers, t0: float):
        rounds = sent = 0
        if self.max_rounds == 0 and self.postcopy:
            return 0, 0             # pure postcopy: every page is sent after the switch
        while True:
            rounds += 1
            sent += self._send_all_dirty(f, stop_on_switch=rounds > 1)
            for block, tracker in zip(self.blocks, trackers):
                if tracker is not None:
                    tracker.collect(self.dirty[block.name])
            dirty = self._dirty_count()
            if (self._switch.is_set() or dirty <= self.converge_pages
                    or rounds >= self.max_rounds or trackers[0] is None
                    or (self.switch_after is not None
                        and time.perf_counter() - t0 >= self.switch_after)):
                return rounds, sent

    def _send_all_dirty(self, f, stop_on_switch: bool = False) -> int:
        sent = 0
        for block in self.blocks:
            for first in range(0, block.npages, PRECOPY_CHUNK):
                if stop_on_switch and self._switch.is_set():
                    return sent
                count = min(PRECOPY_CHUNK, block.npages - first)
                with savevm.ram_part(f, self.ram_section_id):
                    p, z, _ = f.save_pages(block.region, first, count, 0,
                                           wire.RAM_SAVE_FLAG_CONTINUE, idstr=block.name,
                                           dirty=self.dirty[block.name])
                sent += p + z
        f.flush()
        return sent

    def _dirty_count(self) -> int:
        return sum(bin(int.from_bytes(d, "little")).count("1") for d in self.dirty.values())

    def _chunk_hashes(self) -> Dict[str, str]:
        """The final contents, for the destination to check: xxh3 of every HASH_CHUNK
        pages (taken at the switch, before anything is released)."""
        out = {}
        for block in self.blocks:
            view = memoryview(block.region)
            step = HASH_CHUNK * TARGET_PAGE_SIZE
            values = array("Q", (xxhash.xxh3_64_intdigest(view[o:o + step])
                                 for o in range(0, block.used_length, step)))
            out[block.name] = base64.b64encode(values.tobytes()).decode()
        return out

    # -- postcopy -----------------------------------------------------------------------

    def _postcopy(self, t_stop: float, t_verify: float, tail: dict):
        f = self.f
        self._push_working_set(f)      # while the destination still takes precopy pages
        clean_at_switch = [(b, bytes(x ^ 0xFF for x in self.dirty[b.name]))
                           for b in self.blocks]
        for block in self.blocks:
            name = block.name
            for payload in msg.discard_payloads(
                    name, msg.bitmap_ranges(self.dirty[name], block.npages, TARGET_PAGE_SIZE)):
                savevm.put_command(f, wire.CMD_POSTCOPY_RAM_DISCARD, payload)
        listen_end = self._switch_commands(f)
        f.flush()
        if self.releases is not None:
            # the pages that are not dirty went in precopy: the destination has them
            # once it confirms the stream up to LISTEN
            end = listen_end
            for block, clean in clean_at_switch:
                self.releases.sent(0, end, block, backend.impl.bitmap_runs(clean, block.npages))
        self._short_send_buffer()
        self.stats.downtime_source_ms = round(
            (time.perf_counter() - t_stop - t_verify) * 1000, 2)
        t_post = time.perf_counter()
        cpu_post = sched.process_cpu()
        counts = {"pushed": 0, "requested": 0}
        bytes_before = f.tell()
        while True:
            try:
                self._send_remaining(counts)
                self._finish(tail)
                break
            except Exception as exc:
                cause = self._cause(exc)
                if not self._resumable(cause):
                    raise cause from None
                bytes_before -= self.f.tell()
                self._resume(cause)
                bytes_before += self.f.tell()
        pushed, requested = counts["pushed"], counts["requested"]
        requested += self._preempt_pages
        seconds = time.perf_counter() - t_post
        self.stats.postcopy_s = round(seconds, 3)
        self.stats.postcopy_cpu_s = round(sched.process_cpu() - cpu_post, 3)
        self.stats.postcopy_gbps = round((pushed + requested) * TARGET_PAGE_SIZE / seconds / 1e9,
                                         3) if seconds else None
        self.stats.postcopy_bytes = self.f.tell() - bytes_before
        return pushed + requested, requested

    def _push_working_set(self, f) -> None:
        """The working set's pages still to send, each run of adjacent windows in one
        PART: before the switch, they are in place before the program on the other side
        runs (and, sent, never sent again)."""
        if self.working_set is None:
            return
        window = self.working_set.window_pages
        runs: List[list] = []
        for index, page in self.working_set.in_place_order():
            block = self.blocks[index]
            first = page - page % window
            count = min(window, block.npages - first)
            if runs and runs[-1][0] is block and runs[-1][1] + runs[-1][2] == first:
                runs[-1][2] += count
            else:
                runs.append([block, first, count])
        for block, first, count in runs:
            self.stats.prefetched_pages += self._send_range(f, block, first, count)

    def _switch_commands(self, f) -> int:
        """LISTEN and RUN; returns where LISTEN ends (what the destination holds once it
        confirms that far)."""
        savevm.put_command(f, wire.CMD_POSTCOPY_LISTEN)
        listen_end = f.tell_fast()
        savevm.put_command(f, wire.CMD_POSTCOPY_RUN)
        return listen_end

    def _short_send_buffer(self) -> None:
        if self.pf is None:
            # requests queue behind what the main connection's buffers hold: keep it short
            self.main.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                      POSTCOPY_SOCKET_BUFFER)

    def _send_remaining(self, counts: Dict[str, int]) -> None:
        """Every page still dirty, on a niced thread of its own."""
        error: List[BaseException] = []
        streamer = threading.Thread(target=self._guard,
                                    args=(self._background, self.f, counts, error),
                                    name="qfram-background", daemon=True)
        streamer.start()
        streamer.join()
        if error:
            raise error[0]

    def _finish(self, tail: dict) -> None:
        """The end of the streams, the verification hashes, and the destination's word."""
        if self._server is not None:
            self._server.finish()
        elif self.pf is not None:
            with self._pf_lock:
                self.pf.put_byte(wire.SECTION_EOF)
                self.pf.flush()
                self._pf_done = True
        savevm.put_ram_tail(self.f, self.ram_section_id, description=tail)
        self.f.flush()
        wait = self._left(self.timeout)
        if not self.shut.wait(wait):
            if self._deadline_at is not None and time.monotonic() >= self._deadline_at:
                self.expired = True              # said as the deadline's
            raise NoConfirmation(f"{self.peer} did not confirm within {wait:g} s; "
                                 f"{self.last_word()}")
        if self.rp_error is not None:
            raise self.rp_error
        if self.shut_status:
            raise NoConfirmation(f"{self.peer} failed the migration (it ended with status "
                                 f"{self.shut_status})")

    def _left(self, wait: float) -> float:
        """``wait``, or less when the deadline comes first."""
        if self._deadline_at is None:
            return wait
        return max(0.0, min(wait, self._deadline_at - time.monotonic()))

    def last_word(self) -> str:
        """What the peer last said on the return path, for a message that says why it
        was given up on."""
        count, kind, at = self._heard
        if not count:
            return "it said nothing on the return path"
        name = wire.RETURN_MESSAGE_NAMES.get(kind, f"type {kind}")
        return (f"its last word on the return path: {name}, {time.monotonic() - at:.1f} s "
                f"ago ({count} messages in all)")

    def _watchdog(self) -> Optional[threading.Timer]:
        """At the deadline, end every wait at once (the failure path says why)."""
        if self.deadline is None:
            return None
        self._deadline_at = time.monotonic() + self.deadline
        timer = threading.Timer(self.deadline, self._expire)
        timer.daemon = True
        timer.start()
        return timer

    def _expire(self) -> None:
        self.expired = True
        self._shutdown_channels()

    def _reason(self, exc: BaseException) -> BaseException:
        """What the user is told when the migration breaks."""
        if self.expired:
            return DeadlinePassed(f"the migration did not finish within its deadline "
                                  f"({self.deadline:g} s); {self.last_word()}")
        cause = self._cause(exc)
        if not isinstance(cause, OSError) or isinstance(cause, QFramError):
            return cause
        if cause.errno == errno.ETIMEDOUT:
            return link.LinkError(f"{self.peer} took nothing for {self.timeout:g} s "
                                  f"({cause.strerror or cause}); {self.last_word()}")
        if cause.errno in (errno.EPIPE, errno.ECONNRESET):
            return link.LinkError(f"{self.peer} hung up ({cause.strerror or cause}); "
                                  f"{self.last_word()}")
        return cause

    def _cause(self, exc: BaseException) -> BaseException:
        """Why the migration broke: a write that failed because the return path's
        reader shut the channels down reports the reader's reason."""
        if self.rp_error is not None and isinstance(exc, OSError) and exc is not self.rp_error:
            return self.rp_error
        return exc

    def _join_reader(self) -> None:
        """Wait for the return path's reader (which a shut channel ends), if it ran."""
        if self._reader.ident is not None:
            self._reader.join(5)

    def _close_files(self) -> None:
        """Close every channel's file: their zero-copy iovecs let go of the RAM (which
        may then be unmapped).  Errors are the peer's closing first: all was said."""
        for each in (self.f, self.rp, self.pf):
            try:
                if each is not None:
                    each.close()
            except (OSError, QFramError, RuntimeError):
                pass

    def _shutdown_channels(self) -> None:
        """End both directions of every channel now: the peer sees it at once and our
        return path reader wakes (its end is then ours, not a reason of its own)."""
        self._closing = True
        for file in (self.f, self.pf):
            try:
                if file is not None:
                    file.shutdown()
            except OSError:
                pass

    # -- resuming a lost link -----------------------------------------------------------

    def _resumable(self, exc: BaseException) -> bool:
        """A lost link (not a broken peer, not a refusal) can be resumed."""
        return (self.reconnect is not None and isinstance(exc, OSError) and not self.expired
                and not isinstance(exc, (NoConfirmation, link.LinkError)))

    def _resume(self, error: BaseException) -> None:
        """Reconnect, learn what the destination holds (RECV_BITMAP per block), send
        POSTCOPY_RESUME and wait for RESUME_ACK; what it lacks is dirty again."""
        self._shutdown_channels()
        self._reader.join()
        self.rp_error = None             # said: it is ``error`` (or caused it)
        self._close_server()
        self._bytes_before += self.f.tell() + (self.pf.tell() if self.pf else 0)
        self._close_files()
        if self.releases is not None:
            self.releases.forget_pending()    # unconfirmed: the bitmap will say
        until = self._deadline_at if self._deadline_at is not None else \
            time.monotonic() + self.timeout
        print(f"qfram send: the link dropped after the switch ({error}); resuming",
              file=sys.stderr, flush=True)
        while True:
            try:
                self.main = self.reconnect()
                f = self.f = self.main.file("wb", self.timeout)
                rp = self.rp = f.get_return_path()
                rp.set_timeout(max(0.001, min(self.timeout, until - time.monotonic())))
                self._exchange_bitmaps(f, rp)
                break
            except (OSError, QFramError) as exc:
                if isinstance(exc, FormatError) or time.monotonic() >= until or self.expired:
                    raise link.LinkError(f"could not resume the migration: {exc}") from None
                time.sleep(RECONNECT_INTERVAL)
        self._closing = False
        rp.set_timeout(None)
        self.pf = self._open_preempt(self.reconnect()) if self.pf is not None else None
        self._pf_done = False
        self._server = self._request_server()
        self._short_send_buffer()
        self.shut.clear()
        self.rp_error = None
        self.requests.clear()
        for bits in list(self._resent.values()) + [
                bits for per_channel in self._claimed for bits in per_channel.values()]:
            bits[:] = bytes(len(bits))
        self._reader = threading.Thread(target=self._read_return_path, args=(rp,),
                                        daemon=True, name="qfram-return-path")
        self._reader.start()
        self.stats.resumes += 1

    def _exchange_bitmaps(self, f, rp) -> None:
        savevm.put_command(f, wire.CMD_QFRAM_RESUME, self.session)
        for block in self.blocks:
            savevm.put_command(f, wire.CMD_RECV_BITMAP, msg.counted_name(block.name))
        f.flush()
        for block in self.blocks:
            pos = rp.tell()
            kind, payload = msg.read_return_message(rp)
            if kind != wire.MIG_RP_MSG_RECV_BITMAP or \
                    msg.parse_counted_name(payload, pos) != block.name:
                raise FormatError(f"expected the received bitmap of {block.name!r}", pos)
            received = msg.read_received_bitmap(rp, block.npages)
            dirty = self.dirty[block.name]
            dirty[:] = bytes(~b & 0xFF for b in received[:len(dirty)])
            if block.npages % 8:
                dirty[-1] &= (1 << (block.npages % 8)) - 1
            if self.releases is not None:        # it holds these: they may go here
                self.releases.sent(0, 0, block, backend.impl.bitmap_runs(received,
                                                                      block.npages))
        savevm.put_command(f, wire.CMD_POSTCOPY_RESUME)
        f.flush()
        pos = rp.tell()
        kind, _ = msg.read_return_message(rp)
        if kind != wire.MIG_RP_MSG_RESUME_ACK:
            raise FormatError(f"expected RESUME_ACK, got message {kind}", pos)

    def _request_server(self):
        """The page requests' server on the preempt channel: in C, without the GIL
        (None without a preempt channel, or with the pure-Python core: then this
        module answers them)."""
        if self.pf is None or backend.PURE_PYTHON:
            return None
        from qfram._requests import RequestServer
        return RequestServer(self.pf, [
            (b.name, b.region, b.used_length, self.dirty[b.name], self._resent[b.name],
             self._claimed[1][b.name] if self.releases is not None else None)
            for b in self.blocks], self.ram_section_id)

    def _close_server(self) -> None:
        """The requests it served counted, the preempt file given back to Python —
        once the return path's reader has stopped (it may be inside serve())."""
        if self._server is None or self._reader.is_alive():
            return
        self._take_served()
        self._server.close()
        self._server = None

    def _take_served(self) -> None:
        """The bookkeeping of the requests the C server answered, in order: the pages
        it sent wait for the destination's word (release-ram), the scan follows the
        requested pages, the log and the statistics."""
        server = self._server
        if server is None:
            return
        with self._served_lock:
            for (index, first, count, pages, end, t_read, t_done, resent, dropped,
                 runs) in server.take():
                block = self.blocks[index]
                self.stats.requests += 1
                self._log_request(index, first)
                if len(self._serve_ns) < MAX_SERVICE_SAMPLES:
                    self._serve_ns.append(t_done - t_read)
                if dropped:
                    continue
                self._preempt_pages += pages
                self._resent_pages += resent
                if runs and self.releases is not None:
                    self.releases.sent(1, end, block, runs)
                self.requests.append((block.name, first, count, 0))   # a hint for the scan

    def _log_request(self, index: int, page: int) -> None:
        """Keep a request (the first MAX_LOGGED_REQUESTS) when the log is wanted."""
        log = self.request_log
        if log is not None and len(log) < MAX_LOGGED_REQUESTS:
            log.append(index << 48 | page)

    def _open_preempt(self, channel: "link.Link"):
        """The preempt channel's file, its magic and the session's token sent."""
        pf = channel.file("wb", self.timeout)
        pf.put_buffer(wire.PREEMPT_MAGIC + self.session)
        pf.flush()
        return pf

    @staticmethod
    def _guard(target, *args) -> None:
        error = args[-1]
        try:
            target(*args[:-1])
        except BaseException as exc:
            error.append(exc)

    def _background(self, f, counts: Dict[str, int]) -> None:
        """Send every page still dirty: requested ones first (without a preempt channel
        they are queued here), then the scan, which goes on from the last requested page
        so that its neighbours follow."""
        if self.pf is not None:
            sched.background()      # bulk: the thread serving requests must come first
        cpu = time.thread_time()
        try:
            self._background_scan(f, counts)
        finally:
            self.stats.background_cpu_s = round(time.thread_time() - cpu
                                                + (self.stats.background_cpu_s or 0), 3)

    def _background_scan(self, f, counts: Dict[str, int]) -> None:
        scan = {b.name: 0 for b in self.blocks}
        order = list(self.blocks)
        current = 0
        chunk = PREEMPT_CHUNK if self.pf else POSTCOPY_CHUNK
        while current < len(order):
            self._take_served()              # the requests answered meanwhile: hints
            while True:
                try:
                    name, first, count, t_req = self.requests.popleft()
                except IndexError:
                    break
                block = self.ram[name]
                if self.pf is None:
                    counts["requested"] += self._send_range(f, block, first, count)
                    self._served(t_req)
                scan[name] = first + count          # its neighbours follow
                current = order.index(block)
            if self.rp_error is not None:
                raise self.rp_error
            block = order[current]
            first = scan[block.name]
            if first >= block.npages:
                # this block's scan reached its end: one more pass catches pages skipped
                # when a request moved the scan forward, then the next block
                if self._block_dirty(block):
                    scan[block.name] = 0
                else:
                    current += 1
                continue
            count = min(chunk, block.npages - first)
            counts["pushed"] += self._send_range(f, block, first, count)
            scan[block.name] = first + count

    def _send_range(self, f, block: RAMBlock, first: int, count: int,
                    channel: int = 0) -> int:
        """The still-dirty pages of [first, first+count) in one PART, flushed.  With
        release-ram the pages it carried wait for the destination's confirmation."""
        claimed = self._claimed[channel][block.name] if self.releases is not None else None
        with savevm.ram_part(f, self.ram_section_id):
            p, z, _ = f.save_pages(block.region, first, count, 0, wire.RAM_SAVE_FLAG_CONTINUE,
                                   idstr=block.name, dirty=self.dirty[block.name],
                                   claimed=claimed)
        if p + z:
            f.flush()
            if claimed is not None and self.releases is not None:
                runs = backend.impl.bitmap_runs(claimed, first + count, first)
                claimed[first // 8:(first + count + 7) // 8] = bytes(
                    (first + count + 7) // 8 - first // 8)
                self.releases.sent(channel, f.tell(), block, runs)
        return p + z

    def _serve_preempt(self, block: RAMBlock, first: int, count: int) -> None:
        """A request, sent at once on the preempt channel (from the return path's
        thread; the dirty bitmap's atomic claims keep the two senders apart).  The
        faulting page goes even if the background stream sent it already: it may still
        sit in that connection's buffers (the destination keeps whichever comes first)."""
        dirty = self.dirty[block.name]
        sent_before = not (dirty[first >> 3] >> (first & 7)) & 1
        resent = self._resent[block.name]
        if sent_before and (resent[first >> 3] >> (first & 7)) & 1:
            return                  # sent, and sent again already: a duplicate request
        with self._pf_lock:
            if getattr(self, "_pf_done", False):
                return
            self._preempt_pages += self._send_range(self.pf, block, first, count, channel=1)
            if sent_before:
                resent[first >> 3] |= 1 << (first & 7)
                with savevm.ram_part(self.pf, self.ram_section_id):
                    self.pf.save_pages(block.region, first, 1, 0, wire.RAM_SAVE_FLAG_CONTINUE,
                                       idstr=block.name)
                self.pf.flush()
                self._resent_pages += 1
        self.requests.append((block.name, first, count, 0))    # a hint for the scan

    def _served(self, t_req: int) -> None:
        """A request read at ``t_req`` has its pages written (kept: the first million)."""
        if len(self._serve_ns) < MAX_SERVICE_SAMPLES:
            self._serve_ns.append(time.perf_counter_ns() - t_req)

    def _still_dirty(self, block: RAMBlock, page: int) -> bool:
        return bool((self.dirty[block.name][page >> 3] >> (page & 7)) & 1)

    def _block_dirty(self, block: RAMBlock) -> bool:
        return any(self.dirty[block.name])

    # -- the return path ----------------------------------------------------------------

    def _read_return_path(self, rp) -> None:
        self.stats.urgent_threads = sched.urgent()   # requests wake it: it runs at once
        last: Optional[str] = None
        heard = self._heard
        server = self._server
        try:
            while True:
                if server is not None:
                    # page requests are answered in there; the rest comes back here
                    kind, payload, pos = server.serve(rp)
                    self._take_served()
                    if kind == 0:
                        continue            # only the served requests to count
                else:
                    pos = rp.tell()
                    kind, payload = msg.read_return_message(rp)
                heard[0] += 1
                heard[1], heard[2] = kind, time.monotonic()
                if kind in (wire.MIG_RP_MSG_REQ_PAGES_ID, wire.MIG_RP_MSG_REQ_PAGES):
                    name, start, length = msg.parse_page_request(kind, payload, last, pos)
                    block = self.ram.get(name)
                    if block is None or start % TARGET_PAGE_SIZE or length % TARGET_PAGE_SIZE or \
                            start + length > block.used_length or length == 0:
                        raise FormatError(f"a request for {name!r} {start:#x}+{length:#x} "
                                          f"outside the RAM", pos)
                    last = name
                    self.stats.requests += 1
                    self._log_request(self._block_index[name], start // TARGET_PAGE_SIZE)
                    if self.pf is not None:
                        t_req = time.perf_counter_ns()
                        self._serve_preempt(block, start // TARGET_PAGE_SIZE, length // TARGET_PAGE_SIZE)
                        self._served(t_req)
                    elif self._still_dirty(block, start // TARGET_PAGE_SIZE):
                        self.requests.append((name, start // TARGET_PAGE_SIZE,
                                              length // TARGET_PAGE_SIZE,
                                              time.perf_counter_ns()))
                elif kind == wire.MIG_RP_MSG_SHUT:
                    self.shut_status = int.from_bytes(payload[:4], "big") if payload else 0
                    return
                elif kind == wire.MIG_RP_MSG_PONG:
                    continue
                elif kind == wire.MIG_RP_MSG_QFRAM_RECEIVED and self.releases is not None:
                    self.releases.confirm(*msg.parse_received(payload, pos))
                else:
                    raise FormatError(f"unknown return path message {kind}", pos)
        except BaseException as exc:
            if not self._closing:        # (else we ended it: not the peer's doing)
                self.rp_error = exc
                self._shutdown_channels()    # the streams stop at once, to resume or fail
        finally:
            self.shut.set()



def block_all_dirty(bitmap: bytearray, npages: int) -> None:
    bitmap[:npages // 8] = b"\xff" * (npages // 8)
    for i in range(npages // 8 * 8, npages):
        bitmap[i >> 3] |= 1 << (i & 7)
