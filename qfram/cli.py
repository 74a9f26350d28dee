"""The ``qfram`` command.  Results go to stdout (``--json`` for scripts), progress and
notes to stderr."""
from __future__ import annotations

import argparse
import functools
import json
import mmap
import os
import stat
import sys
import time
from typing import List, Optional, Tuple

from qfram import snapshot, wire
from qfram.qemu import extract
from qfram.io import channel
from qfram.io import outputs
from qfram import backend
from qfram.lab.demo import demo_ram, fill_demo
from qfram.io.durable import DurableRelease
from qfram._util.text import human, parse_size as text_parse_size, printable
from qfram.errors import OptionError, QFramError, StreamEnded
from qfram.ram import RAMBlock, RAMList, disk_room
from qfram.errors import TooLarge

def parse_size(text: str) -> int:
    """A size option: what _util.text.parse_size reads, its complaint in argparse's words."""
    try:
        return text_parse_size(text)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def rss() -> int:
    import psutil        # here, not at import: every command starts faster
    return psutil.Process().memory_info().rss


def map_source(path: str) -> mmap.mmap:
    """A memory file (e.g. /dev/shm/..., a VMM's mem-path) mapped shared, so that
    releasing sent pages frees them for its owner too."""
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


STREAM_WINDOW_PAGES = (32 << 20) // 4096    # records made durable, then released


def stream_records(out, region, idstr: str, release: bool,
                   durable: bool) -> Tuple[int, int, int]:
    """RAM page records of ``region`` then EOS.  ``release`` on a pipe or socket: each
    page goes once written (the reader has it).  On a file (``durable``) a page goes
    only once its bytes are fdatasync'd (qfram.io.durable); should the stream fail later,
    every released page is read back from the file first.  Returns (pages, zero pages,
    bytes released)."""
    if not (release and durable):
        pages, zeros, _ = out.save_pages(region, may_free=release, idstr=idstr)
        out.put_be64(wire.RAM_SAVE_FLAG_EOS)
        out.flush()
        return pages, zeros, out.released_bytes
    fd = out.channel.fd
    block = RAMBlock.from_buffer(idstr, region)
    releaser = DurableRelease(True)
    pages = zeros = 0
    try:
        for first in range(0, block.npages, STREAM_WINDOW_PAGES):
            count = min(STREAM_WINDOW_PAGES, block.npages - first)
            start = out.tell_fast()
            p, z, _ = out.save_pages(region, first, count, idstr=idstr if first == 0 else None,
                                     flags=wire.RAM_SAVE_FLAG_CONTINUE if first else 0)
            pages, zeros = pages + p, zeros + z
            out.flush()
            releaser.written(fd, block, first, count,
                             functools.partial(_read_records_back, region=region,
                                               offset=start), start, out.tell() - start)
        out.put_be64(wire.RAM_SAVE_FLAG_EOS)
        out.flush()
        releaser.finish(fd)
    except BaseException as exc:
        releaser.undo(fd, exc)
        raise
    return pages, zeros, releaser.bytes


def _read_records_back(fd: int, region, offset: int) -> None:
    """Place the page records a failed stream left in the file ``fd`` from ``offset`` on
    back into ``region`` (up to where the file ends)."""
    back = channel.fdopen(fd, "rb", owned=False)
    back.set_offset(offset)
    header = back.get_be64()
    if not header & wire.RAM_SAVE_FLAG_CONTINUE:
        back.get_counted_string()
    try:
        back.load_pages(region, header)
        back.close()
    except StreamEnded:
        pass                            # the records stop where the failure did


def cmd_stream(args: argparse.Namespace) -> int:
    """Stream RAM as page records (QEMU's RAM record format) into a file or pipe."""
    if args.demo:
        region = demo_ram(args.demo)
    else:
        region = map_source(args.source)
    params = backend.SEED_PARAMS if args.seed_params else {}
    rss_before = rss()
    target = None if args.output == "-" else outputs.new_file(args.output)
    fd = os.dup(sys.stdout.fileno()) if target is None else target.fd
    out = channel.fdopen(fd, "wb", owned=target is None, **params)
    t0 = time.perf_counter()
    try:
        pages, zeros, released = stream_records(out, region, args.block, args.release,
                                                durable=stat.S_ISREG(os.fstat(fd).st_mode))
        out.close()
        if target is not None:
            target.commit()
    except BaseException:
        if target is not None:
            target.abort()
        raise
    seconds = time.perf_counter() - t0
    rss_after = rss()
    result = {
        "ram_bytes": len(region), "stream_bytes": out.tell(), "pages": pages,
        "zero_pages": zeros, "seconds": round(seconds, 4),
        "gbps": round(len(region) / seconds / 1e9, 3),
        "released_bytes": released, "rss_before": rss_before,
        "rss_after": rss_after,
    }
    text = (f"streamed {human(len(region))} of RAM ({pages} pages, {zeros} zero) as "
            f"{human(out.tell())} in {seconds:.3f} s: {result['gbps']} GB/s\n"
            f"released {human(released)}; RSS {human(rss_before)} -> "
            f"{human(rss_after)}")
    # with the stream on stdout, the summary goes to stderr
    emit(args, result, text, sys.stderr if args.output == "-" else sys.stdout)
    return 0


def emit(args: argparse.Namespace, result: dict, text: str, to=None) -> None:
    """Results go to stdout: one JSON object with --json, else the text; --json-out FILE
    also writes the JSON object to FILE (for scripts that show the text)."""
    if getattr(args, "json_out", None):
        with open(args.json_out, "w") as f:
            json.dump(result, f)
    print(json.dumps(result) if args.json else text, file=to or sys.stdout)


class Progress:
    """A progress bar on stderr, only when stderr is a terminal; it also samples RSS so
    that a save with --release shows the footprint falling."""

    def __init__(self, label: str, enabled: Optional[bool] = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.last = 0.0
        self.rss_trace: List[List[float]] = []

    def __call__(self, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        if not self.rss_trace or fraction - self.rss_trace[-1][0] >= 0.1 or done == total:
            self.rss_trace.append([round(fraction, 2), rss()])
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or done == total):
            self.last = now
            bar = "#" * int(fraction * 30)
            print(f"\r{self.label} [{bar:<30}] {fraction * 100:5.1f}% "
                  f"{human(done)} / {human(total)}  RSS {human(rss())}", end="",
                  file=sys.stderr, flush=True)
            if done == total:
                print(file=sys.stderr)


def source_blocks(args: argparse.Namespace) -> RAMList:
    """The RAM to save: the embedded demo, or memory files ('PATH' or 'NAME=PATH')."""
    if args.demo:
        block = RAMBlock.anonymous(args.block, args.demo, huge=False)
        fill_demo(block.region)
        return RAMList([block])
    ram = RAMList()
    for spec in args.sources:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = (args.block if len(args.sources) == 1 else os.path.basename(spec)), spec
        ram.add(RAMBlock.map_file(name, path))
    return ram


def cmd_save(args: argparse.Namespace) -> int:
    """Save RAM to a snapshot file."""
    if not args.demo and not args.sources:
        raise ValueError("name a memory file to save, or --demo SIZE")
    ram = source_blocks(args)
    devices = extract.device_state(args.devices_from) if args.devices_from else None
    before = rss()
    progress = Progress("save")
    result = snapshot.save(ram, args.snapshot, layout=args.layout, machine=args.machine,
                           release=args.release, compress=args.compress,
                           incremental=args.incremental, direct=args.direct,
                           threads=args.threads, progress=progress, devices=devices,
                           chunk_bytes=args.chunk_size)
    out = result.as_dict()
    out.update(rss_before=before, rss_after=rss(), rss_trace=progress.rss_trace)
    what = f"{result.pages} pages, {result.zero_pages} zero"
    if result.unchanged_pages:
        what += f", {result.unchanged_pages} unchanged"
    text = (f"saved {human(result.ram_bytes)} of RAM ({what}) to {args.snapshot}: "
            f"{human(result.file_bytes)} {result.layout} layout in {result.seconds:.3f} s, "
            f"{out['gbps']} GB/s")
    if args.release:
        text += (f"\nreleased {human(result.released_bytes)} while saving; RSS "
                 f"{human(before)} -> {human(out['rss_after'])}")
    emit(args, out, text)
    ram.close()
    return 0


def target_blocks(info: dict, target: str,
                  force: bool = False) -> Tuple[RAMList, outputs.BlockFiles]:
    """New memory files to restore into: TARGET itself for one block, else a directory
    with a file per block (names with '/' become folders, never outside it).  They
    appear only on the files' commit(), once the restore is verified.  More RAM than
    the disk has free is refused unless ``force``."""
    files = outputs.BlockFiles(target, single=len(info.blocks) == 1)
    ram = RAMList()
    try:
        room, where = disk_room(files.root.path)
        if not force and info.ram_bytes > room:
            raise TooLarge(f"{info.path} declares {info.ram_bytes / 2**30:.2f} GiB of "
                           f"RAM, more than {where} ({room / 2**30:.2f} GiB); --force to try "
                           f"anyway", 0)
        for b in info.blocks:
            out = files.new(b.name)
            ram.add(RAMBlock.map_fd(b.name, out.fd, b.used_length, path=out.path))
    except BaseException:
        ram.close()
        files.abort()
        raise
    return ram, files


def cmd_load(args: argparse.Namespace) -> int:
    """Restore a snapshot, eagerly or lazily, and check it."""
    if args.reset_loop:
        return load_reset_loop(args)
    if args.lazy:
        return load_lazy(args)
    files = None
    ram = None
    if args.target:
        ram, files = target_blocks(snapshot.inspect(args.snapshot), args.target, args.force)
    before = rss()
    try:
        ram, result = snapshot.load(args.snapshot, ram, verify=not args.no_verify,
                                    threads=args.threads, zeroed=ram is not None,
                                    force=args.force)
    except BaseException:
        if files is not None:
            ram.close()
            files.abort()
        raise
    ram.close()
    if files is not None:
        files.commit()
    out = result.as_dict()
    out.update(rss_before=before, rss_after=rss(), target=args.target)
    check = "checksums verified" if result.verified else "no checksums to verify"
    emit(args, out, f"restored {human(result.ram_bytes)} ({result.pages} pages, "
                    f"{result.zero_pages} zero) from {args.snapshot} in {result.seconds:.3f} s, "
                    f"{out['gbps']} GB/s; {check}"
                    + (f"; written to {args.target}" if args.target else ""))
    return 0


def load_lazy(args: argparse.Namespace) -> int:
    from qfram.lazy import LazyRestore
    from qfram.lab import workloads
    with LazyRestore(args.snapshot, window_pages=args.window,
                            spin_us=args.spin_us, force=args.force,
                            background=args.background,
                            prefetch=None if args.prefetch else False,
                            record=args.record) as lazy:
        if args.hot_set:
            touched = workloads.hot_set_workload(lazy.ram, args.hot_set,
                                              threads=args.touch_threads)
        else:
            touched = workloads.touch_workload(lazy.ram, args.touches,
                                            threads=args.touch_threads)
        stats = lazy.wait(verify=not args.no_verify)
        if args.target:
            out_ram, files = target_blocks(lazy.info, args.target, args.force)
            try:
                for block in lazy.ram:
                    memoryview(out_ram[block.name].region)[:] = memoryview(block.region)
            except BaseException:
                out_ram.close()
                files.abort()
                raise
            out_ram.close()
            files.commit()
    out = stats.as_dict()
    out.update(workload_first_touch=touched.as_dict(), snapshot=args.snapshot,
               target=args.target,
               ram_bytes=sum(b.used_length for b in lazy.ram))
    lat = stats.handler_latency
    emit(args, out,
         f"lazily restored {human(out['ram_bytes'])} from {args.snapshot} in "
         f"{stats.seconds:.3f} s: {stats.faults} faults served ({stats.fault_pages} pages), "
         f"{stats.background_pages} pages in the background, {stats.zero_pages} zero pages\n"
         f"working set: {stats.working_set}\n"
         f"fault service p50 {lat.p50_us} us, p99 {lat.p99_us} us, max "
         f"{lat.max_us} us; the workload's touches p50 {touched.p50_us} us, p99 "
         f"{touched.p99_us} us; "
         + ("checksums verified" if stats.verified else "no checksums to verify"))
    return 0


def load_reset_loop(args: argparse.Namespace) -> int:
    """Map the snapshot copy-on-write (with --lazy: restore it into anonymous memory
    with userfaultfd), then N times: write --dirty-pages pages, reset."""
    from qfram.lab import workloads
    from qfram.lazy import LazyRestore, Resettable
    from qfram._util.latency import percentiles
    if args.target:
        raise QFramError("--reset-loop keeps the RAM to itself: no TARGET")
    took = []
    pages = 0
    if args.lazy:
        box = LazyRestore(args.snapshot, resettable=True, record=False,
                                 prefetch=None if args.prefetch else False,
                                 window_pages=args.window, force=args.force)
        box.wait(verify=False)
    else:
        box = Resettable(args.snapshot, force=args.force)
    with box:
        for k in range(args.reset_loop):
            workloads.scribble(box.ram, args.dirty_pages, seed=k + 1)
            stats = box.reset()
            took.append(int(stats.seconds * 1e9))
            pages += stats.pages
        verified = not args.no_verify and box.verify()
    lat = percentiles(took)
    out = dict(snapshot=args.snapshot, resets=args.reset_loop,
               pages_per_reset=pages / max(1, args.reset_loop),
               reset_us=dict(p50=lat.p50_us, p99=lat.p99_us, max=lat.max_us),
               verified=verified)
    emit(args, out,
         f"{args.reset_loop} resets of {args.snapshot}, {out['pages_per_reset']:.0f} pages "
         f"written before each: reset p50 {lat.p50_us} us, p99 {lat.p99_us} us, max "
         f"{lat.max_us} us; "
         + ("checksums verified after the last" if verified else "not verified"))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a snapshot or QEMU migration stream."""
    info = snapshot.inspect(args.snapshot)
    shown = printable       # names come from the file: escape what a terminal obeys
    kind = "qfram snapshot" if info.chunked is not None else "QEMU migration stream"
    lines = [f"{args.snapshot}: {kind}, {info.layout} layout, "
             f"{human(info.file_bytes)}"
             + (f", machine {shown(info.machine)}" if info.machine else "")]
    if info.written_by_qfram:
        lines.append(f"written by qfram {info.created or ''}"
                     + (f", {info.compression} compression" if info.compression else ""))
    if info.chunked is not None:
        facts = info.as_dict()
        lines.append(f"{human(facts['chunk_bytes'])} chunks: {facts['chunks']['compressed']} "
                     f"compressed, {facts['chunks']['raw']} raw, {facts['chunks']['zero']} "
                     f"zero (QEMU cannot load this layout: `qfram rewrite` it to mapped)")
    lines.append(f"{'block':24} {'size':>12} {'pages':>9} {'zero':>9} {'absent':>8}  checksum")
    for b in info.blocks:
        lines.append(f"{shown(b.name):24} {human(b.used_length):>12} {b.pages:>9} "
                     f"{b.zero_pages:>9} {b.absent_pages:>8}  "
                     f"{('xxh3:' + b.xxh3_64) if b.xxh3_64 else '-'}")
    if info.devices:
        lines.append(f"{len(info.devices)} device sections"
                     + ("" if info.vmdescription else " (no VMDESCRIPTION: names from the "
                        "section headers)") + ":")
        lines.append(f"  {'section':32} {'instance':>8} {'version':>7} {'bytes':>21}")
        for d in info.devices:
            lines.append(f"  {shown(d.name):32} {d.instance:>8} {d.version:>7} "
                         f"{d.offset:>10}-{d.end:<10}")
    for cmd, length, offset in info.commands:
        lines.append(f"command {cmd} ({length} bytes) at byte {offset}")
    out = info.as_dict()
    if info.layout in ("mapped", "chunked"):
        out["working_set"] = ws = working_set_of(args.snapshot, info)
        lines.append("working set: " + (f"{ws['pages']} pages in {ws['runs']} runs "
                                        f"({ws['window_pages']}-page windows), recorded "
                                        f"{ws['recorded']}" if "pages" in ws else ws["note"]))
    emit(args, out, "\n".join(lines))
    return 0


def working_set_of(path: str, info) -> dict:
    """The recorded working set of a mapped snapshot, or why there is none to use."""
    from qfram.format import workingset
    fd = snapshot.open_locked(path)
    try:
        ws, note = workingset.load(path, fd, info)
    finally:
        os.close(fd)
    return ws.describe() if ws is not None else {"note": note}


def cmd_extract(args: argparse.Namespace) -> int:
    """Write each RAM block of a QEMU stream as a raw file."""
    t0 = time.perf_counter()
    result = extract.extract(args.stream, args.outdir, force=args.force)
    result["seconds"] = round(time.perf_counter() - t0, 4)
    lines = [f"extracted {len(result['blocks'])} RAM blocks from {args.stream} in "
             f"{result['seconds']:.3f} s:"]
    for b in result["blocks"]:
        lines.append(f"  {b['file']:48} {human(b['used_length']):>12}  {b['pages']} pages, "
                     f"{b['zero_pages']} zero")
    emit(args, result, "\n".join(lines))
    return 0


def cmd_rewrite(args: argparse.Namespace) -> int:
    """Read a stream, replace block contents, write it again (either layout); the
    device sections and machine type are carried over byte for byte."""
    devices = extract.device_state(args.input)
    ram, _ = snapshot.load(args.input, verify=not args.no_verify, huge=False)
    for spec in args.set or []:
        name, sep, path = spec.partition("=")
        if not sep or name not in ram:
            raise ValueError(f"--set takes NAME=FILE with a block of {args.input}: {spec!r}")
        data = open(path, "rb").read()
        if len(data) != ram[name].used_length:
            raise ValueError(f"{path} has {len(data)} bytes, block {name!r} has "
                             f"{ram[name].used_length}")
        memoryview(ram[name].region)[:] = data
    result = snapshot.save(ram, args.output, layout=args.layout, compress=args.compress,
                           devices=devices, threads=args.threads,
                           chunk_bytes=args.chunk_size)
    out = dict(result.as_dict(), input=args.input, devices=len(devices.description))
    emit(args, out, f"rewrote {args.input} as {args.output} ({result.layout} layout, "
                    f"{human(result.file_bytes)}), {len(ram)} RAM blocks"
                    + (f", {len(args.set)} replaced" if args.set else "")
                    + f", device state carried over ({len(devices.sections)} bytes)")
    ram.close()
    return 0


def add_layout_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=["stream", "mapped", "chunked"], default="stream",
                   help="stream: QEMU's migration stream; mapped: QEMU's mapped-ram (pages "
                        "at fixed offsets, lazy restore, reset); chunked: qfram's "
                        "compressed chunks (small, lazy restore; QEMU cannot load it)")
    p.add_argument("--compress", "--codec", dest="compress", choices=["zlib", "lz4", "zstd"],
                   help="stream layout: zlib (QEMU's) or lz4 (qfram extension); chunked "
                        "layout: lz4 (default) or zstd")
    p.add_argument("--chunk-size", type=parse_size, default=64 << 10, metavar="SIZE",
                   help="chunked layout: bytes per chunk, a power of two from 4K to 16M")


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--json-out", metavar="FILE", help="also write the JSON object to FILE")


def cmd_send(args: argparse.Namespace) -> int:
    """Migrate RAM to a `qfram receive` (precopy rounds, then postcopy)."""
    from qfram import postcopy
    if not args.demo and not args.sources:
        raise ValueError("name a memory file to send, or --demo SIZE")
    ram = source_blocks(args)
    workload = None
    if args.workload:
        workload = postcopy.Workload(ram, kinds=("write",), seed=args.seed,
                                     pause_us=args.workload_pause_us)
    working_set, note = None, ""
    if args.working_set:
        from qfram.format import workingset
        working_set, note = workingset.for_migration(args.working_set, ram)
    before = rss()
    stats = postcopy.send(ram, args.to, preempt=not args.no_preempt, release=args.release,
                          max_rounds=args.rounds, converge_pages=args.converge_pages,
                          switch_after=args.switch_after, workload=workload,
                          postcopy=not args.precopy_only, timeout=args.timeout,
                          deadline=args.deadline, resume=not args.no_resume,
                          tls_creds=args.tls_creds, tls_hostname=args.tls_hostname,
                          working_set=working_set)
    after = rss()
    emit(args, dict(stats.as_dict(), rss_before=before, rss_after=after),
         f"sent {human(stats.ram_bytes)} to {args.to} in {stats.seconds} s: "
         f"{stats.precopy_rounds} precopy rounds ({stats.precopy_pages} pages), "
         f"{stats.postcopy_pages} pages after the switch ({stats.requested_pages} "
         f"requested), downtime here {stats.downtime_source_ms} ms; dirty "
         f"tracking {stats.dirty_tracking}"
         + (f"; released {human(stats.released_bytes)}, RSS {human(before)} -> "
            f"{human(after)}" if args.release else "")
         + (f"; working set: {stats.prefetched_pages} pages sent first" if working_set
            else f"; working set: {note}" if note else ""))
    ram.close()
    return 0


def cmd_receive(args: argparse.Namespace) -> int:
    """Receive a migration; run the built-in workload from the switch on."""
    from qfram import postcopy
    factory = None
    if args.workload:
        kinds = tuple(args.workload.split(","))
        factory = lambda ram: postcopy.Workload(ram, kinds=kinds, seed=args.seed + 1,  # noqa: E731
                                                pause_us=args.workload_pause_us)
    ram, stats = postcopy.receive(args.listen, preempt=not args.no_preempt,
                                  timeout=args.timeout, workload=factory,
                                  window_pages=args.window, spin_us=args.spin_us,
                                  tls_creds=args.tls_creds, tls_authz=args.tls_authz or (),
                                  insecure=args.insecure, deadline=args.deadline,
                                  max_ram=args.max_ram, resume=not args.no_resume,
                                  working_set=args.working_set)
    lat = stats.fault_latency
    emit(args, stats.as_dict(),
         f"received {human(ram.total_size)} on {args.listen} in {stats.seconds} s: "
         f"{stats.faults} faults, {stats.requested_pages} pages requested, fault latency "
         f"p50 {lat.p50_us} us p99 {lat.p99_us} us max {lat.max_us} us; downtime here "
         f"{stats.downtime_destination_ms} ms; "
         + ("verified against the source" if stats.verified else "not verified")
         + (f"; working set: {stats.working_set}" if stats.working_set else ""))
    ram.close()
    return 0


def cmd_restore_qemu(args: argparse.Namespace) -> int:
    """Resume a QEMU from a snapshot at once; its RAM follows on demand (postcopy)."""
    from qfram.qemu.restore import restore
    stats = restore(args.snapshot, qmp=args.qmp, to=args.to,
                    timeout=args.timeout, machine=args.machine,
                    prefetch=args.prefetch, record=args.record)
    lat = stats.request_service
    emit(args, stats.as_dict(),
         f"restored {args.snapshot} ({human(stats.ram_bytes)} of RAM, "
         f"{human(stats.device_bytes)} of device state, {stats.machine}) into QEMU "
         f"{stats.qemu_version}: running after {stats.postcopy_active_ms} ms, complete "
         f"after {stats.completed_s} s; {stats.pages_requested} pages requested "
         f"(service p50 {lat.p50_us} us, p99 {lat.p99_us} us), {stats.pages_pushed} "
         f"pushed\nworking set: {stats.working_set or 'none'}")
    return 0


def cmd_tls_init(args: argparse.Namespace) -> int:
    """Make a CA, server and client certificates for TLS migration (QEMU's layout)."""
    from qfram.postcopy import tlscreds
    paths = tlscreds.init(args.directory, host=args.host, force=args.force)
    emit(args, {"directory": args.directory, "files": paths},
         f"wrote {len(paths)} files to {args.directory} (server certificate for "
         f"{args.host}); give --tls-creds {args.directory} to both `qfram send` and "
         f"`qfram receive`, or dir={args.directory} to QEMU's tls-creds-x509")
    return 0


# The options of a migration's connections: who has each, its argparse keywords, its help.
LINK_OPTIONS = [
    ("both", "--tls-creds", {"metavar": "DIR"}),
    ("receive", "--tls-authz", {"action": "append", "metavar": "SUBJECT"}),
    ("receive", "--insecure", {"action": "store_true"}),
    ("receive", "--max-ram", {"type": parse_size, "metavar": "SIZE"}),
    ("send", "--tls-hostname", {"metavar": "NAME"}),
    ("both", "--deadline", {"type": float, "metavar": "SECONDS"}),
    ("both", "--no-resume", {"action": "store_true"}),
]
LINK_HELP = {
    "--tls-creds": "TLS on every channel, both ends verified: a QEMU tls-creds-x509 "
                   "directory (`qfram tls-init DIR` makes one)",
    "--tls-authz": "accept only a client certificate with this subject (RFC 2253, e.g. "
                   "'CN=qfram client of HOST,O=qfram'); repeatable",
    "--insecure": "accept a migration in the clear on an address other machines can "
                  "reach (loopback and unix sockets need no TLS)",
    "--max-ram": "refuse a source that declares more RAM than this (default: what this "
                 "machine has available, less a tenth)",
    "--tls-hostname": "the name the destination's certificate must carry (default: the "
                      "host in --to)",
    "--deadline": "give up when the whole migration (waits for the peer included) takes "
                  "longer than this",
    "--no-resume": "a link lost after the switch ends the migration (default: reconnect "
                   "and resume, until --deadline or --timeout)",
}


def add_link_options(p: argparse.ArgumentParser, side: str) -> None:
    for who, flag, keywords in LINK_OPTIONS:
        if who in ("both", side):
            p.add_argument(flag, help=LINK_HELP[flag], **keywords)


def cmd_footprint(args: argparse.Namespace) -> int:
    """Run memory-footprint scenarios and write series, plots and a report."""
    from qfram.lab import footprint
    names = list(footprint.SCENARIOS) if args.scenario == ["all"] else args.scenario
    unknown = [n for n in names if n not in footprint.SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r}; try: "
                         f"{', '.join(footprint.SCENARIOS)} or all")
    note = (lambda line: print(line, file=sys.stderr)) if sys.stderr.isatty() else \
        (lambda line: None)
    rows = footprint.run_experiments(names, args.size, args.out, args.repeat,
                                     "qfram footprint " + " ".join(sys.argv[2:]), note)
    emit(args, {"out": args.out, "rows": rows},
         "\n".join(f"{r['scenario']} run {r['run']}: source USS peak "
                   f"{human(r['source_peak_uss'])} final {human(r['source_final_uss'])}; "
                   f"destination peak {human(r['destination_peak_uss'])} final "
                   f"{human(r['destination_final_uss'])}" for r in rows)
         + f"\nseries, plots and report.md in {args.out}")
    return 0


# a lazy restore's switches: each --NAME / --no-NAME, on by default
WORKING_SET_SWITCHES = (
    ("prefetch", "place the recorded working set (SNAPSHOT.ws) first, when there is one "
                 "that fits"),
    ("record", "once complete, record the pages touched first in SNAPSHOT.ws"),
)
LAZY_SWITCHES = WORKING_SET_SWITCHES + (
    ("background", "fill what is not touched in the background (--no-background "
                   "--window 1 records the exact working set)"),
)


def add_switches(p: argparse.ArgumentParser, switches, prefix: str = "") -> None:
    for name, what in switches:
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=True,
                       help=prefix + what)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qfram", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("save", help="save RAM to a snapshot file")
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="memory file(s) to save: PATH or NAME=PATH (mapped shared)")
    p.add_argument("snapshot", help="the snapshot file to write")
    p.add_argument("--demo", type=parse_size, metavar="SIZE",
                   help="save an embedded demo RAM of SIZE instead (e.g. 1G)")
    p.add_argument("--block", default="pc.ram", help="block name for a single source")
    add_layout_options(p)
    p.add_argument("--release", action="store_true",
                   help="give each page back to the kernel once it is written")
    p.add_argument("--incremental", action="store_true",
                   help="mapped layout: update SNAPSHOT in place, only changed pages")
    p.add_argument("--direct", action="store_true", help="mapped layout: O_DIRECT writes")
    p.add_argument("--machine", "--qemu-machine", dest="machine",
                   help="machine type in the configuration section, e.g. pc-i440fx-7.2 "
                        "(default: the --devices-from stream's, else pc-i440fx-7.2)")
    p.add_argument("--devices-from", metavar="STREAM",
                   help="carry the device sections of this QEMU stream over, byte for byte "
                        "(QEMU also loads a stream without them: devices keep their reset "
                        "state)")
    p.add_argument("--threads", type=int, default=2, help="writer threads (mapped layout)")
    add_output_options(p)
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("load", help="restore a snapshot (eagerly or lazily) and check it")
    p.add_argument("snapshot")
    p.add_argument("target", nargs="?",
                   help="memory file to write (a directory for several blocks); "
                        "without it the RAM is restored, checked and dropped")
    p.add_argument("--lazy", action="store_true",
                   help="restore on first touch (userfaultfd) while a workload runs")
    p.add_argument("--touches", type=int, default=4000,
                   help="--lazy: random first touches by the built-in workload")
    p.add_argument("--touch-threads", type=int, default=4)
    p.add_argument("--hot-set", type=int, metavar="PAGES",
                   help="--lazy: the workload reads the same PAGES pages every run instead")
    add_switches(p, LAZY_SWITCHES, "--lazy: ")
    p.add_argument("--window", type=int, default=16, help="--lazy: pages placed per fault")
    p.add_argument("--spin-us", type=float, default=50.0,
                   help="--lazy: fault thread busy-waits this long before sleeping")
    p.add_argument("--threads", type=int, default=2, help="reader threads (mapped layout)")
    p.add_argument("--reset-loop", type=int, default=0, metavar="N",
                   help="map the snapshot copy-on-write (--lazy: restore it lazily into "
                        "anonymous memory) and N times write --dirty-pages random pages, "
                        "then reset it (only the written pages are undone)")
    p.add_argument("--dirty-pages", type=int, default=100,
                   help="--reset-loop: pages written before each reset")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    p.add_argument("--force", action="store_true",
                   help="restore even a snapshot that declares more RAM than there is room "
                        "for")
    add_output_options(p)
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("info", help="describe a snapshot or QEMU migration stream")
    p.add_argument("snapshot")
    add_output_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("send", help="migrate RAM to `qfram receive` (precopy + postcopy)")
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="memory file(s) to send: PATH or NAME=PATH")
    p.add_argument("--demo", type=parse_size, metavar="SIZE", help="send an embedded demo RAM")
    p.add_argument("--block", default="pc.ram", help="block name for a single source")
    p.add_argument("--to", required=True, metavar="HOST:PORT|PATH",
                   help="the destination: TCP host:port or a unix socket path")
    p.add_argument("--release", action="store_true",
                   help="free each page here once the destination has it")
    p.add_argument("--rounds", type=int, default=5,
                   help="precopy rounds at most before the switch (0: postcopy only)")
    p.add_argument("--converge-pages", type=int, default=1024,
                   help="switch once fewer pages than this are dirty after a round")
    p.add_argument("--switch-after", type=float, metavar="SECONDS",
                   help="switch after this long in precopy")
    p.add_argument("--precopy-only", action="store_true",
                   help="no postcopy: stop the workload for a last precopy round")
    p.add_argument("--workload", action="store_true",
                   help="run the built-in writing workload here until the switch")
    p.add_argument("--workload-pause-us", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--working-set", metavar="FILE",
                   help="send the pages this file names first, at the switch (what `qfram "
                        "receive --working-set` recorded for this RAM last time)")
    p.add_argument("--no-preempt", action="store_true",
                   help="requested pages queue on the main connection (no second one)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds without progress before the migration is given up")
    add_link_options(p, "send")
    add_output_options(p)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("receive", help="receive one migration from `qfram send`")
    p.add_argument("--listen", required=True, metavar="HOST:PORT|PATH")
    p.add_argument("--workload", nargs="?", const="scan,read,write", metavar="KINDS",
                   help="run the built-in workload from the switch on (scan,read,write)")
    p.add_argument("--workload-pause-us", type=float, default=0.0)
    p.add_argument("--working-set", metavar="FILE",
                   help="once complete, add the pages faulted on here, in order, to FILE "
                        "(for the next migration's `qfram send --working-set`)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--window", type=int, default=16, help="pages requested per fault")
    p.add_argument("--spin-us", type=float, default=0.0,
                   help="fault thread busy-waits this long before sleeping")
    p.add_argument("--no-preempt", action="store_true")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a wait on the source may last (a resume too, without "
                        "--deadline)")
    add_link_options(p, "receive")
    add_output_options(p)
    p.set_defaults(func=cmd_receive)

    p = sub.add_parser("restore-qemu", help="resume a QEMU from a snapshot at once, its RAM "
                                            "following on demand (QEMU's postcopy)")
    p.add_argument("snapshot", help="a mapped-layout snapshot (qfram's, or QEMU's "
                                    "mapped-ram file), or a chunked one")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--qmp", metavar="SOCKET",
                       help="the monitor of a QEMU started with -incoming defer")
    where.add_argument("--to", metavar="HOST:PORT|PATH",
                       help="a QEMU already listening (-incoming ...) with postcopy-ram set")
    p.add_argument("--machine", help="the machine type to announce (default: the "
                                     "snapshot's)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a wait on QEMU may last")
    add_switches(p, WORKING_SET_SWITCHES)
    add_output_options(p)
    p.set_defaults(func=cmd_restore_qemu)

    p = sub.add_parser("tls-init", help="make TLS certificates for migration (QEMU's "
                                        "tls-creds-x509 layout)")
    p.add_argument("directory")
    p.add_argument("--host", default="localhost",
                   help="the destination's host name or address (its certificate is for "
                        "it, and for localhost)")
    p.add_argument("--force", action="store_true", help="replace existing credentials")
    add_output_options(p)
    p.set_defaults(func=cmd_tls_init)

    p = sub.add_parser("footprint", help="measure what moving RAM costs in memory")
    p.add_argument("scenario", nargs="+",
                   help="scenario(s), or all: snapshot-release, snapshot-keep, "
                        "postcopy-release, postcopy-keep, memfd-release, file-release, "
                        "thp-release, zero-heavy, random, lazy-restore, eager-restore")
    p.add_argument("--size", type=parse_size, default=parse_size("256M"))
    p.add_argument("--repeat", type=int, default=1, help="runs per scenario (the spread)")
    p.add_argument("--out", default="footprint-out", help="directory for the results")
    add_output_options(p)
    p.set_defaults(func=cmd_footprint)

    p = sub.add_parser("extract", help="write each RAM block of a QEMU stream as a raw file")
    p.add_argument("stream", help="a QEMU migration stream or mapped-ram file")
    p.add_argument("outdir", help="where the files go ('/' in block names: folders)")
    p.add_argument("--force", action="store_true",
                   help="extract even a stream that declares more RAM than the disk has free")
    add_output_options(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("rewrite", help="rewrite a stream: replace blocks, change the layout")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--set", action="append", metavar="NAME=FILE",
                   help="replace block NAME's contents with a raw file of its size")
    add_layout_options(p)
    p.add_argument("--threads", type=int, default=2, help="compressing threads (chunked)")
    p.add_argument("--no-verify", action="store_true")
    add_output_options(p)
    p.set_defaults(func=cmd_rewrite)

    p = sub.add_parser("stream", help="stream RAM as page records into a file or pipe")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("source", nargs="?", help="a memory file to stream (mapped shared)")
    src.add_argument("--demo", type=parse_size, metavar="SIZE",
                     help="stream an embedded demo RAM of SIZE (e.g. 1G)")
    p.add_argument("output", help="output file, or - for stdout")
    p.add_argument("--release", action="store_true",
                   help="give each page back to the kernel once it is written")
    p.add_argument("--block", default="pc.ram", help="block name in the records")
    p.add_argument("--seed-params", action="store_true",
                   help="QEMU's flush points (64 iovecs, release every flush)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_stream)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, QFramError) as exc:
        print(f"qfram {args.command}: {printable(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
