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
from qfram.errors import OptionError, FormatError
from qfram.postcopy import link
from qfram.postcopy import messages as msg
from qfram.postcopy.source import Source, block_all_dirty
from qfram.qemu.qmp import QMP, QMPError
from qfram.ram import RAMBlock, RAMList
from qfram.results import RestoreStats

POLL_INTERVAL = 0.001          # seconds between QMP status polls while restoring


class SnapshotSource(Source):
    """A postcopy source whose RAM is a snapshot file and whose destination is QEMU: no
    precopy, no qfram extensions, the devices in the switch's package.  A mapped
    snapshot is mapped copy-on-write; a chunked one is restored lazily here (its chunks
    decoded as the sending reads them, and ahead in the background)."""

    def __init__(self, path: str, main, *, machine: Optional[str] = None,
                 timeout: float = 30.0, prefetch: bool = True) -> None:
        fd = snapshot.open_locked(path)
        try:
            info = snapshot.inspect_fd(path, fd)
            if info.layout == "stream":
                raise FormatError(f"{path}: restoring into QEMU needs a layout whose pages "
                                  f"can be found in any order; `qfram rewrite {path} OUT "
                                  f"--layout mapped` makes one", 0)
            self._maps: list = []
            self._lazy = None
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
        super().__init__(ram, main, max_rounds=0, verify=False, timeout=timeout,
                         machine=machine or devices.machine, working_set=working_set)
        self.info = info
        self.devices = devices
        self.ram_section_id = devices.ram_section_id
        self.request_log = array.array("Q")     # for the next restore's working set

    def run(self):
        """Stream until QEMU confirms (SHUT); returns the SourceStats."""
        t0 = time.perf_counter()
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
            raise self._cause(exc) from None
        finally:
            self._reader.join(5)
        self.stats.bytes_sent = self.f.tell()
        for closer in (self.f.close, self.rp.close):
            try:
                closer()
            except OSError:
                pass
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
            region.close()
        if self._lazy is not None:
            self._lazy.close()


def restore(path: str, *, qmp: Optional[str] = None, to: Optional[str] = None,
            timeout: float = 30.0, machine: Optional[str] = None, prefetch: bool = True,
            record: bool = True) -> RestoreStats:
    """Restore the snapshot at ``path`` into a QEMU started with ``-incoming defer``
    (``qmp``: its monitor socket; qfram sets postcopy-ram, hands it one end of a socket
    pair with getfd and streams until QEMU says completed), or into a QEMU already
    listening with postcopy-ram set (``to``: HOST:PORT or a unix socket path).
    ``prefetch``: send the working set an earlier restore recorded (``SNAP.ws``) before
    the guest runs; ``record``: once complete, keep the pages QEMU asked for in it."""
    if (qmp is None) == (to is None):
        raise OptionError("give the QEMU's monitor (qmp) or its listening address (to)")
    stats = RestoreStats(snapshot=path)
    t0 = time.perf_counter()
    monitor = QMP(qmp, timeout) if qmp is not None else None
    try:
        if monitor is not None:
            main = _hand_over_channel(monitor)
            stats.qemu_version = "{major}.{minor}.{micro}".format(**monitor.version) \
                if monitor.version else ""
        else:
            main = link.connect(to, None, timeout)          # type: ignore[arg-type]
        if machine is None and monitor is not None and not _has_devices(path):
            # RAM only: the devices start at reset, as this QEMU's own machine has them
            machine = _machine_type(monitor)
        source = SnapshotSource(path, main, machine=machine, timeout=timeout,
                                prefetch=prefetch)
        stats.machine, stats.ram_bytes = source.machine, source.info.ram_bytes
        stats.device_bytes = len(source.devices.sections)
        watcher = None
        if monitor is not None:
            watcher = threading.Thread(target=_watch, args=(monitor, stats, t0, timeout),
                                       daemon=True, name="qfram-qmp")
            watcher.start()
        try:
            result = source.run()
        finally:
            source.close()
        if watcher is not None:
            watcher.join(timeout)
            if stats.completed_s is None:
                raise QMPError(f"QEMU did not report the migration completed within "
                               f"{timeout:g} s after the last page")
        else:
            stats.completed_s = round(time.perf_counter() - t0, 3)
        if source.working_set is not None:
            source.working_set_note = (f"{result.prefetched_pages} pages of the working set "
                                       f"({source.working_set.pages} first touches) sent "
                                       f"before the guest ran")
        if record:
            source.record_working_set(path)
        stats.pages_prefetched = result.prefetched_pages
        stats.working_set = source.working_set_note
    finally:
        if monitor is not None:
            monitor.close()
    stats.pages_requested = result.requested_pages
    stats.pages_pushed = result.postcopy_pages - result.requested_pages
    stats.postcopy_s, stats.postcopy_gbps = result.postcopy_s, result.postcopy_gbps
    stats.requests, stats.request_service = result.requests, result.request_service
    stats.bytes_sent = result.bytes_sent
    return stats


def _has_devices(path: str) -> bool:
    fd = snapshot.open_locked(path)
    try:
        return bool(snapshot.inspect_fd(path, fd).devices)
    finally:
        os.close(fd)


def _machine_type(monitor: QMP) -> str:
    """The running machine's versioned type, e.g. pc-i440fx-7.2 (what its migration
    configuration section names)."""
    kind = monitor.cmd("qom-get", {"path": "/machine", "property": "type"})
    if not isinstance(kind, str) or not kind.endswith("-machine"):
        raise QMPError(f"QEMU's machine type is {kind!r}")
    return kind[:-len("-machine")]


def _hand_over_channel(monitor: QMP) -> link.Link:
    """A socket pair: one end to QEMU (getfd, then migrate-incoming fd:NAME), the other
    ours.  Checks first that QEMU waits for an incoming migration."""
    status = monitor.cmd("query-status").get("status")
    if status != "inmigrate":
        raise QMPError(f"QEMU's run state is {status!r}: start it with -incoming defer "
                       f"(and the devices of the saved VM)")
    monitor.set_capabilities(postcopy_ram=True)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        monitor.cmd("getfd", {"fdname": "qfram-restore"}, fd=theirs.fileno())
    finally:
        theirs.close()
    monitor.cmd("migrate-incoming", {"uri": "fd:qfram-restore"})
    return link.Link(ours)


def _watch(monitor: QMP, stats: RestoreStats, t0: float, timeout: float) -> None:
    """Poll QEMU's migration status: note when the guest can run (postcopy-active) and
    when everything is in (completed)."""
    deadline = None
    while True:
        try:
            status = monitor.migration_status()
        except (QMPError, OSError):     # QEMU gone: the stream's end says why
            return
        now = time.perf_counter()
        if status == "postcopy-active" and stats.postcopy_active_ms is None:
            stats.postcopy_active_ms = round((now - t0) * 1000, 2)
        if status == "completed":
            if stats.postcopy_active_ms is None:
                stats.postcopy_active_ms = round((now - t0) * 1000, 2)
            stats.completed_s = round(now - t0, 3)
            return
        if status in ("failed", "postcopy-paused", "cancelled"):
            return
        if deadline is None and status == "none":
            deadline = now + timeout
        if deadline is not None and now > deadline:
            return
        time.sleep(POLL_INTERVAL)
