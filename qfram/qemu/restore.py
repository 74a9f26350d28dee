"""`qfram restore-qemu`: an unmodified QEMU resumes from a snapshot at once, its RAM
arriving on demand over QEMU's own postcopy protocol, with qfram as the source.

QEMU loads a saved VM only eagerly: time to running grows with RAM.  But a QEMU started
with ``-incoming defer`` and ``postcopy-ram`` takes a migration whose source switches
to postcopy before sending a single page.  So qfram plays that source, from the
snapshot file:

* header, configuration (the snapshot's machine type), OPEN_RETURN_PATH,
  POSTCOPY_ADVISE, the RAM setup (every block's name and length), RAM_DISCARD of every
  block (QEMU's own pages, e.g. ROMs it loaded at start, make way for the snapshot's);
* PACKAGED: LISTEN, the snapshot's device sections byte for byte, RUN — QEMU loads its
  devices and the guest runs, with none of its RAM present;
* then the pages: the ones QEMU asks for (REQ_PAGES on the return path, from guest
  faults) first, the rest in order in the background, each page exactly once (QEMU
  fails on a page placed twice) — read straight from the mmap'd snapshot by the core's
  zero-copy writer; then the RAM's END section and EOF, and QEMU's SHUT.

The snapshot must have a layout whose pages can be found in any order: mapped (every
page at a fixed offset: qfram's ``--layout mapped`` saves, QEMU's mapped-ram files as
they are, or QEMU's stream after ``qfram rewrite F SNAP --layout mapped``), or chunked
(compressed; decoded here as the pages are sent, by a lazy restore of its own).
"""
from __future__ import annotations

import array
import os
import socket
import threading
import time
from typing import Optional

from qfram import snapshot, wire
from qfram.format import savevm
from qfram.format import workingset
from qfram._util.text import printable
from qfram.errors import (DeadlinePassed, FormatError, MigrationFailed, OptionError,
                          QFramError)
from qfram.postcopy import link
from qfram.postcopy import messages as msg
from qfram.postcopy.source import Source, block_all_dirty
from qfram.qemu.qmp import QMP, QMPError, QMPTimeout
from qfram.ram import RAMBlock, RAMList
from qfram.results import RestoreStats

POLL_INTERVAL = 0.001          # seconds between QMP status polls while restoring
DEFAULT_DEADLINE = 120.0       # seconds a whole restore may take, and per GiB of RAM:
DEADLINE_PER_GIB = 10.0
FAILED = ("failed", "postcopy-paused", "cancelled")     # QEMU's migration gave up


class SnapshotSource(Source):
    """A postcopy source whose RAM is a snapshot file and whose destination is QEMU: no
    precopy, no qfram extensions, the devices in the switch's package.  A mapped
    snapshot is mapped copy-on-write; a chunked one is restored lazily here (its chunks
    decoded as the sending reads them, and ahead in the background).  ``deadline``
    (seconds) bounds the whole run, ``timeout`` each wait."""

    peer = "QEMU"

    def __init__(self, path: str, main, *, machine: Optional[str] = None,
                 timeout: float = 30.0, deadline: Optional[float] = None,
                 prefetch: bool = True, served=None) -> None:
        self._maps: list = []
        self._lazy = None
        self.served = served is not None
        if served is not None:
            ram, info, devices, working_set = self._from_server(served)
        else:
            ram, info, devices, working_set = self._from_file(path, prefetch)
        super().__init__(ram, main, max_rounds=0, verify=False, timeout=timeout,
                         deadline=deadline, machine=machine or devices.machine,
                         working_set=working_set)
        self.info = info
        self.devices = devices
        self.ram_section_id = devices.ram_section_id
        self.request_log = array.array("Q")     # for the next restore's working set

    def _from_server(self, lazy):
        """The RAM from a host page server (``lazy``: a LazyRestore connected to it; for
        an s3:// snapshot without one, its private server): the server's cache mapped
        copy-on-write here, chunks asked for as the sending reads them (the server
        holds the working set)."""
        from qfram.lazy.served import device_state
        self._lazy = lazy
        self.working_set_note = lazy.working_set_note
        ram = RAMList([RAMBlock.from_buffer(b.name, b.region) for b in lazy.ram])
        return ram, lazy.info, device_state(lazy.served_welcome), None

    def _from_file(self, path: str, prefetch: bool):
        fd = snapshot.open_locked(path)
        try:
            info = snapshot.inspect_fd(path, fd)
            check_layout(path, info)
            if info.chunked is not None:
                from qfram.lazy import LazyRestore
                from qfram.snapshot import chunked
                devices = chunked.device_state(info.chunked)
                self._lazy = LazyRestore(path, record=False, prefetch=False)
                ram = RAMList([RAMBlock.from_buffer(b.name, b.region)
                               for b in self._lazy.ram])
            else:
                devices = snapshot.devices_of(fd, info)
                ram = RAMList()
                for b in info.blocks:    # (inspect checked every offset against the file)
                    # private: QEMU gets the bytes, the file is never written; pages the
                    # bitmap calls zero are zero even where the file has stale bytes
                    region = snapshot.map_block_private(fd, b, info)
                    self._maps.append(region)
                    ram.add(RAMBlock.from_buffer(b.name, region))
            working_set, self.working_set_note = (
                workingset.load(path, fd, info) if prefetch else (None, "prefetch off"))
        finally:
            os.close(fd)
        return ram, info, devices, working_set

    def run(self):
        """Stream until QEMU confirms (SHUT); returns the SourceStats."""
        t0 = time.perf_counter()
        watchdog = self._watchdog()
        f = self.f = self.main.file("wb", self.timeout)
        rp = self.rp = f.get_return_path()
        rp.set_timeout(None)
        self._reader = threading.Thread(target=self._read_return_path, args=(rp,),
                                        daemon=True, name="qfram-return-path")
        try:
            savevm.put_header(f, self.machine)
            savevm.put_command(f, wire.CMD_OPEN_RETURN_PATH)
            savevm.put_command(f, wire.CMD_POSTCOPY_ADVISE,
                               msg.advise_payload(wire.TARGET_PAGE_SIZE,
                                                  wire.TARGET_PAGE_SIZE))
            savevm.put_ram_setup(f, self.ram_section_id, self.blocks)
            f.flush()
            self._reader.start()
            for block in self.blocks:         # every page goes, exactly once
                block_all_dirty(self.dirty[block.name], block.npages)
            self.stats.postcopy_pages, self.stats.requested_pages = \
                self._postcopy(time.perf_counter(), 0.0, None)
        except BaseException as exc:
            self._shutdown_channels()
            self._join_reader()
            self._close_files()         # (their iovecs let go of the snapshot's mapping)
            raise self._reason(exc) from None
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self._join_reader()
        self.stats.bytes_sent = self.f.tell()
        self._close_files()
        self.stats.seconds = round(time.perf_counter() - t0, 3)
        from qfram._util.latency import percentiles
        self.stats.request_service = percentiles(self._serve_ns)
        return self.stats

    def _switch_commands(self, f) -> int:
        """QEMU's switch: LISTEN, the devices and RUN in one PACKAGED command, so the
        destination has them all before it runs anything."""
        from qfram.io import channel
        package = channel.buffer_file()
        savevm.put_command(package, wire.CMD_POSTCOPY_LISTEN)
        package.put_buffer(self.devices.sections)
        savevm.put_command(package, wire.CMD_POSTCOPY_RUN)
        package.flush()
        body = package.channel.getvalue()
        savevm.put_command(f, wire.CMD_PACKAGED, len(body).to_bytes(4, "big"))
        f.put_buffer(body)
        return f.tell_fast()

    def record_working_set(self, path: str) -> None:
        """Keep the pages QEMU asked for, after the ones sent first, as the working set
        of the next restore (a hint: a failure to write it is reported, not raised)."""
        before = self.working_set.touches if self.working_set is not None else []
        touches = workingset.first_touches(before, [(entry >> 48, entry & (1 << 48) - 1)
                                                    for entry in self.request_log])
        if not touches or touches == before:
            return
        fd = snapshot.open_locked(path)
        try:
            window = self.working_set.window_pages if self.working_set is not None else 1
            workingset.save(path, fd, self.info,
                            workingset.WorkingSet(touches, window, time.time()))
        except OSError as exc:
            self.working_set_note += f"; not recorded: {exc.strerror}"
            return
        finally:
            os.close(fd)
        self.working_set_note += (f"; {len(touches)} first touches recorded in "
                                  f"{workingset.sidecar_of(path)}")

    def close(self) -> None:
        for region in self._maps:
            snapshot.release_private(region)
        if self._lazy is not None:
            self._lazy.close()


def check_layout(path: str, info) -> None:
    """Only a layout whose pages can be found in any order can be restored into QEMU."""
    if info.layout == "stream":
        raise FormatError(f"{path}: restoring into QEMU needs a layout whose pages can be "
                          f"found in any order; `qfram rewrite {path} OUT --layout mapped` "
                          f"makes one", 0)


def default_deadline(ram_bytes: int) -> float:
    """How long a whole restore may take unless told: two minutes, and ten seconds more
    per GiB of RAM (a restore slower than ~100 MiB/s is stuck, not slow)."""
    return DEFAULT_DEADLINE + DEADLINE_PER_GIB * ram_bytes / (1 << 30)


class _Clock:
    """The restore's deadline, and each phase's share of it: a phase waits ``timeout``
    at most, and never past the deadline."""

    def __init__(self, deadline: float, timeout: float) -> None:
        self.deadline = deadline
        self.timeout = timeout
        self.until = time.monotonic() + deadline

    def left(self) -> float:
        return self.until - time.monotonic()

    def phase(self, what: str) -> float:
        """The bound for the next wait, or DeadlinePassed naming ``what`` it was for."""
        left = self.left()
        if left <= 0:
            raise self.passed(what)
        return min(self.timeout, left)

    def passed(self, what) -> DeadlinePassed:
        return DeadlinePassed(f"the restore did not finish within its deadline "
                              f"({self.deadline:g} s): {what}")


def restore(path: str, *, qmp: Optional[str] = None, to: Optional[str] = None,
            timeout: float = 30.0, deadline: Optional[float] = None,
            machine: Optional[str] = None, prefetch: bool = True,
            record: bool = True, server: Optional[str] = None,
            store: Optional[dict] = None) -> RestoreStats:
    """Restore the snapshot at ``path`` into a QEMU started with ``-incoming defer``
    (``qmp``: its monitor socket; qfram sets postcopy-ram, hands it one end of a socket
    pair with getfd and streams until QEMU says completed), or into a QEMU already
    listening with postcopy-ram set (``to``: HOST:PORT or a unix socket path).
    ``timeout`` bounds each wait on QEMU, ``deadline`` (seconds; default
    :func:`default_deadline` of the snapshot's RAM) the whole restore: the monitor's
    greeting and negotiation, the handover, the pages and QEMU's word that it is
    complete.  ``prefetch``: send the working set an earlier restore recorded
    (``SNAP.ws``) before the guest runs; ``record``: once complete, keep the pages QEMU
    asked for in it.  ``server``: the pages come from the host page server on this unix
    socket (which serves ``path``; the file is not opened here); ``path`` may be
    s3://BUCKET/NAME (``store``: its options, as qfram.lazy.LazyRestore takes them)."""
    if (qmp is None) == (to is None):
        raise OptionError("give the QEMU's monitor (qmp) or its listening address (to)")
    if not timeout > 0 or deadline is not None and not deadline > 0:
        raise OptionError("a timeout and a deadline are seconds, more than zero")
    served = None
    if server is not None or path.startswith("s3://"):
        # the page server first: what it serves (and whether it serves at all) is known
        # before QEMU is asked anything
        from qfram.lazy import LazyRestore
        served = LazyRestore(path, server=server, record=False, timeout=timeout,
                             prefetch=None if prefetch else False, store=store)
        info = served.info
        has_devices = bool(served.served_welcome.devices)
    else:
        fd = snapshot.open_locked(path)
        try:
            info = snapshot.inspect_fd(path, fd)
        finally:
            os.close(fd)
        check_layout(path, info)        # before QEMU is asked anything
        has_devices = bool(info.devices)
    clock = _Clock(default_deadline(info.ram_bytes) if deadline is None else deadline,
                   timeout)
    stats = RestoreStats(snapshot=path)
    t0 = time.perf_counter()
    monitor = watcher = None
    try:
        if qmp is not None:
            monitor = QMP(qmp, clock.phase("waiting for QEMU's monitor to greet"),
                          read_timeout=timeout)
            main = _hand_over_channel(monitor, clock)
            stats.qemu_version = "{major}.{minor}.{micro}".format(**monitor.version) \
                if monitor.version else ""
            if machine is None and not has_devices:
                # RAM only: the devices start at reset, as this QEMU's own machine has them
                machine = _machine_type(monitor, clock)
        else:
            main = link.connect(to, None, clock.phase("connecting to QEMU"))  # type: ignore
        clock.phase("opening the snapshot")
        source = SnapshotSource(path, main, machine=machine, timeout=timeout,
                                deadline=max(0.001, clock.left()), prefetch=prefetch,
                                served=served)
        served = None                   # the source closes it
        stats.machine, stats.ram_bytes = source.machine, source.info.ram_bytes
        stats.device_bytes = len(source.devices.sections)
        if monitor is not None:
            watcher = _Watcher(monitor, stats, t0, clock)
            watcher.start()
        try:
            result = source.run()
        except DeadlinePassed:
            raise clock.passed(f"QEMU had not confirmed every page; "
                               f"{source.last_word()}") from None
        except BaseException as exc:
            raise watcher.explain(exc) if watcher is not None else exc
        finally:
            source.close()
        if watcher is not None:
            watcher.wait_complete()
        else:
            stats.completed_s = round(time.perf_counter() - t0, 3)
        if source.working_set is not None:
            source.working_set_note = (f"{result.prefetched_pages} pages of the working set "
                                       f"({source.working_set.pages} first touches) sent "
                                       f"before the guest ran")
        if record and not source.served:   # (a page server keeps its own)
            source.record_working_set(path)
        stats.pages_prefetched = result.prefetched_pages
        stats.working_set = source.working_set_note
    except QMPTimeout as exc:
        if clock.left() <= 0:
            raise clock.passed(exc) from None
        raise
    finally:
        if watcher is not None:
            watcher.stop()
        if monitor is not None:
            monitor.close()
        if served is not None:          # a failure before the source took it
            served.close()
    stats.pages_requested = result.requested_pages
    stats.pages_pushed = result.postcopy_pages - result.requested_pages
    stats.postcopy_s, stats.postcopy_gbps = result.postcopy_s, result.postcopy_gbps
    stats.requests, stats.request_service = result.requests, result.request_service
    stats.bytes_sent = result.bytes_sent
    return stats


def _machine_type(monitor: QMP, clock: _Clock) -> str:
    """The running machine's versioned type, e.g. pc-i440fx-7.2 (what its migration
    configuration section names)."""
    kind = monitor.cmd("qom-get", {"path": "/machine", "property": "type"}, returns=str,
                       timeout=clock.phase("asking QEMU its machine type"))
    if not kind.endswith("-machine"):
        raise QMPError(f"qom-get: QEMU's machine type is {printable(kind)!r}, which does "
                       f"not end in -machine")
    return kind[:-len("-machine")]


def _hand_over_channel(monitor: QMP, clock: _Clock) -> link.Link:
    """A socket pair: one end to QEMU (getfd, then migrate-incoming fd:NAME), the other
    ours.  Checks first that QEMU waits for an incoming migration."""
    status = monitor.cmd("query-status", timeout=clock.phase("asking QEMU its state")) \
        .get("status")
    if status != "inmigrate":
        raise QMPError(f"QEMU's run state is {printable(str(status))!r}: start it with "
                       f"-incoming defer (and the devices of the saved VM)")
    monitor.set_capabilities(postcopy_ram=True,
                             timeout=clock.phase("setting QEMU's postcopy-ram"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            monitor.cmd("getfd", {"fdname": "qfram-restore"}, fd=theirs.fileno(),
                        timeout=clock.phase("handing QEMU the stream (getfd)"))
        finally:
            theirs.close()
        monitor.cmd("migrate-incoming", {"uri": "fd:qfram-restore"},
                    timeout=clock.phase("starting QEMU's incoming migration"))
    except BaseException:
        ours.close()
        raise
    return link.Link(ours)


class _Watcher(threading.Thread):
    """Polls QEMU's migration status while the pages go: notes when the guest can run
    (postcopy-active) and when everything is in (completed).  Whatever ends it early —
    QEMU gone, a reply that breaks QMP, a bug — is kept for the main thread to say."""

    def __init__(self, monitor: QMP, stats: RestoreStats, t0: float, clock: _Clock) -> None:
        super().__init__(daemon=True, name="qfram-qmp")
        self.monitor, self.stats, self.t0, self.clock = monitor, stats, t0, clock
        self.status: Optional[str] = None
        self.error: Optional[BaseException] = None
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            self._watch()
        except BaseException as exc:
            if not self._stopping.is_set():     # (else: the monitor was shut by stop())
                self.error = exc

    def _watch(self) -> None:
        stats = self.stats
        idle_until = None
        while not self._stopping.is_set():
            status = self.status = self.monitor.migration_status(
                timeout=self.clock.phase(f"QEMU's migration status was {self.status}"))
            now = time.perf_counter()
            if status == "postcopy-active" and stats.postcopy_active_ms is None:
                stats.postcopy_active_ms = round((now - self.t0) * 1000, 2)
            if status == "completed":
                if stats.postcopy_active_ms is None:
                    stats.postcopy_active_ms = round((now - self.t0) * 1000, 2)
                stats.completed_s = round(now - self.t0, 3)
                return
            if status in FAILED:
                return
            if status == "none":                # no migration has started (yet?)
                idle_until = idle_until or now + self.clock.timeout
                if now > idle_until:
                    return
            self._stopping.wait(POLL_INTERVAL)

    def explain(self, exc: BaseException) -> BaseException:
        """The source's failure, with what QEMU's monitor said meanwhile (a bug of the
        watcher's own comes first, with its traceback)."""
        if self.error is not None and not isinstance(self.error, (QFramError, OSError)):
            return self.error
        said = (f"QEMU's migration status: {self.status}" if self.status in FAILED
                else f"its monitor: {self.error}" if self.error is not None else None)
        if said is None or not isinstance(exc, (QFramError, OSError)):
            return exc
        failed = MigrationFailed(f"{exc} ({said})")
        failed.__cause__ = exc
        return failed

    def wait_complete(self) -> None:
        """Until QEMU says completed; its failure or silence, said, otherwise."""
        self.join(max(0.0, min(self.clock.timeout, self.clock.left())))
        if self.error is not None:
            if not isinstance(self.error, (QFramError, OSError)):
                raise self.error                  # a bug: its own traceback
            raise QMPError(f"watching QEMU's migration: {self.error}") from None
        if self.stats.completed_s is None:
            raise QMPError(f"QEMU did not report the migration completed within "
                           f"{self.clock.timeout:g} s after the last page (its status: "
                           f"{self.status})")

    def stop(self) -> None:
        """End the watch now (the monitor is shut, its read wakes) and wait for it."""
        self._stopping.set()
        self.monitor.shutdown()
        self.join(self.clock.timeout)
