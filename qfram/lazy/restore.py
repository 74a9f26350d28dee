"""Guest RAM that fills itself on first touch: userfaultfd-backed lazy restore.

:class:`LazyRestore` maps empty memory for each block of a mapped snapshot, registers it
with userfaultfd, and starts the core's fault server (``qfram._uffd``): one thread serves
each first touch from the snapshot (the faulting page and the not yet placed neighbours
of its window; zero pages with UFFDIO_ZEROPAGE), another fills everything else in the
background.  The caller's code uses the memory at once.  No page is placed twice.

The fault server is the one piece that restores and postcopy share: the page source is
its seam (here a mapping of the snapshot file and its bitmap of present pages).
"""
from __future__ import annotations

import mmap
import os
import threading
import time
from typing import List, Optional

from qfram import snapshot
from qfram._util.closing import Closing
from qfram._util.latency import percentiles
from qfram._uffd import FaultServer
from qfram.errors import OptionError, FormatError, QFramError, TooLarge
from qfram.format import workingset
from qfram.lazy import served
from qfram.ram import RAMBlock, RAMList, bitmap_bytes, memory_room
from qfram.results import LazyStats, ResetStats


class LazyRestore(Closing):
    """Restore a mapped snapshot lazily.  ``ram`` is usable as soon as the object
    exists; ``wait()`` returns once every page is in place (and checks the checksums).

    ``window_pages``: pages placed per fault (16 = 64 KiB).  ``spin_us``: how long the
    fault thread busy-waits for the next fault before sleeping (latency for CPU).
    ``background``: fill the rest in the background (else only touched pages arrive).
    ``on_failure``: what happens when a page cannot be placed (the snapshot file was cut
    under us, say): "exit" says why on stderr and ends the process with status 1 — a
    thread waiting for that page (perhaps holding the GIL) can never be woken with the
    right bytes; "raise" hands the error to ``wait()``, which is only safe when no
    other thread touches the memory.  The snapshot is held with a shared lock, so no
    incremental save changes it meanwhile.  ``force``: restore even when the snapshot
    declares more RAM than the machine has available.

    ``prefetch``: place the pages of the working set recorded by an earlier restore
    (``SNAP.ws``) before returning — None (the default) when there is one that fits,
    False never.  ``record``: once complete, write the pages first touched (after the
    prefetched ones) as the working set for the next restore.

    ``resettable``: pages are placed write-protected (asynchronously: writes are never
    stopped, only noted) and the fault thread keeps serving after ``wait()``, so that
    ``reset()`` can return the RAM to the snapshot: the pages written since are dropped
    and come back from the snapshot on their next touch.  (Without a need for
    anonymous memory, :class:`qfram.lazy.reset.Resettable` does the same with no fault
    server at all.)

    ``server``: the pages come from the host page server listening on this unix socket
    (``qfram serve``), which must serve ``path`` (it is not opened here): the RAM is a
    copy-on-write mapping of the server's cache, so every page this process does not
    write is shared with every other clone of the snapshot (qfram.lazy.served).  The
    fault thread then serves until ``close()`` — the server may evict a chunk, and its
    next touch asks for it again.  ``timeout`` bounds each wait for the server.

    ``path`` may be an ``s3://BUCKET/NAME`` snapshot (qfram.store): without ``server``,
    a private page server is started for it (``qfram serve --private``, a process of its
    own: fetching needs Python, and a thread touching missing memory may hold the GIL),
    fed from the store through this host's chunk cache; ``store`` holds its options
    (``endpoint``, ``cache``, ``cache_limit``).
    """

    def __init__(self, path: str, *, window_pages: int = 16, spin_us: float = 50.0,
                 background: bool = True, on_failure: str = "exit",
                 force: bool = False, prefetch: Optional[bool] = None,
                 record: bool = True, resettable: bool = False,
                 server: Optional[str] = None, timeout: float = 30.0,
                 store: Optional[dict] = None) -> None:
        if on_failure not in ("exit", "raise"):
            raise OptionError("on_failure is 'exit' or 'raise'")
        self._served: Optional[served.Served] = None
        self._private: Optional[served.PrivateServer] = None
        self.timeout = timeout
        if server is None and "://" in path:
            self._private = served.PrivateServer(path, timeout, **(store or {}))
            server = self._private.socket
        if server is not None:
            if resettable:
                raise OptionError("a restore from a page server cannot be reset: its pages "
                                  "are the server's (reset a local restore instead)")
            try:
                self._start_served(path, server, window_pages, spin_us, on_failure,
                                   prefetch, background)
            except BaseException:
                if self._private is not None:
                    self._private.close()
                raise
            return
        self._fd = snapshot.open_locked(path)
        try:
            info = snapshot.inspect_fd(path, self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        if info.layout not in ("mapped", "chunked"):
            os.close(self._fd)
            raise FormatError(f"{path}: lazy restore needs the mapped or chunked layout "
                              f"(pages found without reading what comes before); this is "
                              f"a {info.layout} snapshot", 0)
        room, where = memory_room()
        if not force and info.ram_bytes > room:
            os.close(self._fd)
            raise TooLarge(f"{path} declares {info.ram_bytes / 2**30:.2f} GiB of RAM, "
                           f"more than {where} ({room / 2**30:.2f} GiB); --force to try "
                           f"anyway", 0)
        self.path = path
        self.info = info
        self.window_pages = window_pages
        self._file: Optional[mmap.mmap] = None
        self.server = FaultServer(window_pages, spin_us, track_writes=resettable)
        self.resettable = resettable
        self.server.exit_on_failure = on_failure == "exit"
        self.ram = RAMList()
        if info.chunked is not None:
            self._add_chunked(info.chunked)
        else:
            self._add_mapped(info)
        self._record = record
        self._start_threads(prefetch, background)

    def _start_served(self, path: str, server: str, window_pages: int, spin_us: float,
                      on_failure: str, prefetch: Optional[bool], background: bool) -> None:
        """The pages from a page server: its cache mapped copy-on-write, one shared area
        per block, the working set asked for before returning."""
        self._served = link = served.connect(server, path, self.timeout)
        self.path = path
        self.info = link.info
        self.window_pages = window_pages
        self._fd = -1
        self._file = None
        self._record = False
        self.resettable = False
        self.server = FaultServer(window_pages, spin_us)
        self.server.exit_on_failure = on_failure == "exit"
        try:
            self.ram = link.map_blocks()
            for i, b in enumerate(link.welcome.blocks):
                self.server.add_shared_area(self.ram[b.name].region, i,
                                            link.welcome.chunk_bytes, b.zero_chunks,
                                            b.offset)
            self.server.set_page_server(link.sock.detach(), os.dup(link.cache_fd),
                                        self.timeout)
        except BaseException:
            self.server.close()
            link.close()
            raise
        self._start_threads(prefetch, background, served_prefetch=True)

    def _start_threads(self, prefetch: Optional[bool], background: bool,
                       served_prefetch: bool = False) -> None:
        self._errors: List[BaseException] = []
        self._t0 = time.perf_counter()
        self._faults = threading.Thread(target=self._run, args=(self.server.serve_faults,),
                                        name="qfram-faults", daemon=True)
        self._faults.start()
        if served_prefetch:
            self._prefetch_served(prefetch)
        else:
            self._prefetch_working_set(prefetch)
        self._fill: Optional[threading.Thread] = None
        if background:
            self._fill = threading.Thread(target=self._run,
                                          args=(self.server.fill_background,),
                                          name="qfram-fill", daemon=True)
            self._fill.start()
        self._done = False

    def _prefetch_served(self, wanted: Optional[bool]) -> None:
        """Ask the server for the chunks of the working set it holds (recorded by an
        earlier restore), coalesced, and wait until they are in its cache."""
        self.working_set = None
        self.prefetch_pages = 0
        self.prefetch_seconds = 0.0
        ws = self._served.welcome.working_set if self._served else None
        self.working_set_note = "prefetch off" if wanted is False else \
            "no working set recorded for this snapshot"
        if wanted is False or not ws:
            return
        chunk_pages = self._served.welcome.chunk_bytes // 4096
        nblocks = len(self._served.welcome.blocks)
        try:
            wanted_chunks = sorted({(int(b), int(p) // chunk_pages)
                                    for b, p in ws.get("touches", [])[:1 << 20]
                                    if 0 <= int(b) < nblocks and int(p) >= 0})
        except (TypeError, ValueError):
            self.working_set_note = "the server's working set is not a list of pages"
            return
        t0 = time.perf_counter()
        for block, chunk in wanted_chunks:
            self.server.ask_chunks(block, chunk, 1)
        end = time.monotonic() + self.timeout
        while not all(self.server.chunks_ready(b, c, 1) for b, c in wanted_chunks):
            if self._errors or time.monotonic() > end:
                break
            time.sleep(0.0005)
        self.prefetch_seconds = time.perf_counter() - t0
        self.prefetch_pages = len(wanted_chunks) * chunk_pages
        self.working_set_note = (f"{len(wanted_chunks)} chunks of the working set in the "
                                 f"server's cache first")

    def _add_mapped(self, info: snapshot.SnapshotInfo) -> None:
        """Pages from a mapping of the file, at the offsets inspect checked."""
        self._file = mmap.mmap(self._fd, info.file_bytes, prot=mmap.PROT_READ)
        for b in info.blocks:
            # 4 KiB pages: userfaultfd places pages one by one, huge pages would not help
            block = self.ram.add(RAMBlock.anonymous(b.name, b.used_length, huge=False))
            present = os.pread(self._fd, bitmap_bytes(block.npages), b.bitmap_offset)
            source = memoryview(self._file)[b.pages_offset:b.pages_offset + b.used_length]
            self.server.add_area(block.region, source, present, name=block.name)
            del source

    def _add_chunked(self, cf) -> None:
        """Pages decoded a chunk at a time, read from the file with pread."""
        for b in cf.blocks:
            block = self.ram.add(RAMBlock.anonymous(b.name, b.used_length, huge=False))
            self.server.add_area(block.region, name=block.name, chunks=b.index, fd=self._fd,
                                 chunk_bytes=cf.chunk_bytes)

    def _prefetch_working_set(self, wanted: Optional[bool]) -> None:
        """Place the recorded working set first (the areas were added in the order of
        the snapshot's blocks: area index = block index)."""
        self.working_set: Optional[workingset.WorkingSet] = None
        self.working_set_note = "prefetch off"
        self.prefetch_pages = 0
        self.prefetch_seconds = 0.0
        if wanted is False:
            return
        self.working_set, self.working_set_note = workingset.load(self.path, self._fd,
                                                                  self.info)
        if self.working_set is None:
            return
        t0 = time.perf_counter()
        self.prefetch_pages = self.server.prefetch(self.working_set.in_place_order(),
                                                   self.working_set.window_pages)
        self.prefetch_seconds = time.perf_counter() - t0
        self.working_set_note = (f"{self.prefetch_pages} pages of the working set "
                                 f"({self.working_set.pages} first touches) placed first")

    def _record_working_set(self) -> None:
        """Keep what was touched first for the next restore (a hint: a failure to write
        it is reported, never raised)."""
        before = self.working_set.touches if self.working_set is not None else []
        touches = workingset.first_touches(before, self.server.touches())
        if not touches or touches == before:
            return
        # the pages placed with a touch: the widest window it was recorded with
        window = max(self.window_pages,
                     self.working_set.window_pages if self.working_set is not None else 1)
        try:
            workingset.save(self.path, self._fd, self.info,
                            workingset.WorkingSet(touches, window, time.time()))
        except OSError as exc:
            self.working_set_note += f"; not recorded: {exc.strerror}"
            return
        self.working_set_note += (f"; {len(touches)} first touches recorded in "
                                  f"{workingset.sidecar_of(self.path)}")

    def _run(self, loop) -> None:
        try:
            loop()
        except BaseException as exc:
            self._errors.append(exc)

    @property
    def complete(self) -> bool:
        return self.server.placed_pages >= self.server.total_pages

    def wait(self, timeout: Optional[float] = None, verify: bool = True) -> LazyStats:
        """Wait for every page to be in place, stop the fault thread, unregister the
        memory and check it against the snapshot's checksums."""
        if self._fill is None:
            self._fill = threading.Thread(target=self._run,
                                          args=(self.server.fill_background,), daemon=True)
            self._fill.start()
        self._fill.join(timeout)
        if self._fill.is_alive():
            raise TimeoutError(f"lazy restore of {self.path} not complete after {timeout} s")
        seconds = time.perf_counter() - self._t0
        if not self._keeps_serving:
            if self.complete:
                self.server.unregister()  # ordinary memory again; then the fault thread ends
            self.server.stop()
            self._faults.join()
        if self._errors:
            raise self._errors[0]
        if not self.complete:
            raise QFramError(f"lazy restore stopped with {self.server.placed_pages} of "
                               f"{self.server.total_pages} pages in place")
        verified = verify and self.verify()
        self._done = True
        if self._record:
            self._record_working_set()
        n = self.server.counters
        return LazyStats(n["faults"], n["fault_pages"], n["background_pages"],
                         n["zero_pages"], n["eexist"], seconds, verified,
                         percentiles(self.server.latencies_ns()), self.prefetch_pages,
                         self.prefetch_seconds, self.working_set_note)

    @property
    def served_welcome(self):
        """What the page server said (None for a restore from a file)."""
        return self._served.welcome if self._served is not None else None

    @property
    def _keeps_serving(self) -> bool:
        """The fault thread serves after wait(): for resets, and for a page server's
        evictions."""
        return self.resettable or self._served is not None

    def reset(self) -> ResetStats:
        """Return the RAM to the snapshot (``resettable`` restores, after ``wait()``,
        while no thread touches the memory): the pages written since the restore or the
        last reset become missing again, and the next touch places them from the
        snapshot."""
        if not self.resettable or not self._done:
            raise OptionError("reset() needs LazyRestore(..., resettable=True) and wait() "
                             "first")
        t0 = time.perf_counter()
        pages, runs = self.server.revert_written()
        return ResetStats(pages, runs, time.perf_counter() - t0)

    def verify(self) -> bool:
        """Check every block against the snapshot's checksums (pages missing after a
        reset are placed as they are read)."""
        return snapshot.check_checksums(
            self.ram, [(b.name, b.used_length) for b in self.info.blocks],
            self.info.description, "lazily restored")

    def close(self) -> None:
        """Stop serving and unmap everything (the RAM too: a program keeps what it
        needs before closing)."""
        if not self._done or self._keeps_serving:
            self.server.stop()
            self._faults.join()
            if self._fill is not None:
                self._fill.join()
        self.server.close()
        self.ram.close()
        if self._served is not None:
            self._served.close()
        if self._private is not None:
            self._private.close()
        if self._file is not None:
            self._file.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
