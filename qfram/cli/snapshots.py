"""The snapshot commands: save, load, info, rewrite, and stream (bare page records)."""
from __future__ import annotations

import argparse
import os
import stat
import sys
import time

from qfram._util.text import human, printable
from qfram.cli.common import (LAZY_SWITCHES, Progress, add_output_options, add_switches,
                              emit, parse_size, rss, source_ram)
from qfram.cli.store import add_store_options, cache_of, endpoint_of, store_options
from qfram.errors import OptionError


def arguments_save(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="memory file(s) to save: PATH or NAME=PATH (mapped shared)")
    p.add_argument("snapshot", help="the snapshot file to write, or s3://BUCKET/NAME "
                                    "(saved chunked, then pushed)")
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
    add_store_options(p, cache=False)
    add_output_options(p)
    p.set_defaults(func=cmd_save)


def arguments_load(p: argparse.ArgumentParser) -> None:
    p.add_argument("snapshot", help="a snapshot file, or s3://BUCKET/NAME")
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
    p.add_argument("--server", metavar="SOCKET",
                   help="--lazy: the pages come from this host page server (`qfram serve`), "
                        "which must serve SNAPSHOT; unwritten pages are shared with its "
                        "other clients")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="--lazy --server: seconds a wait on the page server may last")
    p.add_argument("--spin-us", type=float, default=50.0,
                   help="--lazy: fault thread busy-waits this long before sleeping")
    p.add_argument("--threads", type=int, default=2, help="reader threads (mapped layout)")
    p.add_argument("--fetch-threads", type=int, default=16,
                   help="s3://: chunks fetched at once")
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
    add_store_options(p)
    add_output_options(p)
    p.set_defaults(func=cmd_load)


def arguments_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("snapshot", help="a snapshot file or QEMU stream, or s3://BUCKET/NAME")
    add_store_options(p, cache=False)
    add_output_options(p)
    p.set_defaults(func=cmd_info)


def arguments_rewrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--set", action="append", metavar="NAME=FILE",
                   help="replace block NAME's contents with a raw file of its size")
    add_layout_options(p)
    p.add_argument("--threads", type=int, default=2, help="compressing threads (chunked)")
    p.add_argument("--no-verify", action="store_true")
    add_store_options(p)
    add_output_options(p)
    p.set_defaults(func=cmd_rewrite)


def arguments_stream(p: argparse.ArgumentParser) -> None:
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


def cmd_stream(args: argparse.Namespace) -> int:
    """Stream RAM as page records (QEMU's RAM record format) into a file or pipe."""
    from qfram import backend
    from qfram.io import channel, outputs
    from qfram.io.records import stream_records
    from qfram.lab.demo import demo_ram
    from qfram.ram import RAMBlock
    if args.demo:
        region = demo_ram(args.demo)
    else:
        region = RAMBlock.map_file(args.block, args.source).region
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


def cmd_save(args: argparse.Namespace) -> int:
    """Save RAM to a snapshot file (or a store)."""
    if not args.demo and not args.sources:
        raise OptionError("name a memory file to save, or --demo SIZE")
    if args.snapshot.startswith("s3://"):
        return save_to_store(args)
    out, text = save_ram(args, args.snapshot, args.layout)
    emit(args, out, text)
    return 0


def save_ram(args: argparse.Namespace, path: str, layout: str):
    """The RAM the arguments name, saved to ``path``: (JSON object, text)."""
    from qfram import snapshot
    ram = source_ram(args)
    devices = snapshot.device_state(args.devices_from) if args.devices_from else None
    before = rss()
    progress = Progress("save")
    # (on a failure the RAM is left to the process's end: the failed save's frames may
    # still hold views of it)
    result = snapshot.save(ram, path, layout=layout, machine=args.machine,
                           release=args.release, compress=args.compress,
                           incremental=args.incremental, direct=args.direct,
                           threads=args.threads, progress=progress, devices=devices,
                           chunk_bytes=args.chunk_size)
    ram.close()
    out = result.as_dict()
    out.update(rss_before=before, rss_after=rss(), rss_trace=progress.rss_trace)
    what = f"{result.pages} pages, {result.zero_pages} zero"
    if result.unchanged_pages:
        what += f", {result.unchanged_pages} unchanged"
    text = (f"saved {human(result.ram_bytes)} of RAM ({what}) to {path}: "
            f"{human(result.file_bytes)} {result.layout} layout in {result.seconds:.3f} s, "
            f"{out['gbps']} GB/s")
    if args.release:
        text += (f"\nreleased {human(result.released_bytes)} while saving; RSS "
                 f"{human(before)} -> {human(out['rss_after'])}")
    return out, text


def save_to_store(args: argparse.Namespace) -> int:
    """``qfram save ... s3://B/N``: saved as a local chunked snapshot in a private
    temporary directory, pushed (only the chunks the store lacks), then removed."""
    import shutil
    import tempfile
    from qfram.store import push
    if args.release or args.incremental or args.direct:
        raise OptionError("a save to a store is chunked and whole: no --release, "
                          "--incremental or --direct")
    where = tempfile.mkdtemp(prefix="qfram-save-")
    try:
        local = os.path.join(where, "snapshot.chk")
        saved, _ = save_ram(args, local, "chunked")
        stats = push(local, args.snapshot, endpoint=endpoint_of(args),
                     progress=Progress("push"))
    finally:
        shutil.rmtree(where, ignore_errors=True)
    emit(args, dict(stats.as_dict(), save=saved),
         f"saved {human(stats.ram_bytes)} of RAM to {stats.url}: {stats.chunks_uploaded} of "
         f"{stats.chunks_total} chunks uploaded ({human(stats.bytes_uploaded)}), "
         f"{stats.chunks_deduplicated} already stored, {stats.chunks_zero} zero")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    """Restore a snapshot, eagerly or lazily, and check it."""
    if args.reset_loop:
        return load_reset_loop(args)
    if args.lazy:
        return load_lazy(args)
    if args.server:
        raise OptionError("--server serves lazy restores: add --lazy")
    if args.snapshot.startswith("s3://"):
        return load_from_store(args)
    from qfram import snapshot
    before = rss()
    result, = into_target(
        args, lambda: snapshot.inspect(args.snapshot),
        lambda ram: snapshot.load(args.snapshot, ram, verify=not args.no_verify,
                                  threads=args.threads, zeroed=ram is not None,
                                  force=args.force))
    out = result.as_dict()
    out.update(rss_before=before, rss_after=rss(), target=args.target)
    check = what_was_verified(result, args.no_verify)
    emit(args, out, f"restored {human(result.ram_bytes)} ({result.pages} pages, "
                    f"{result.zero_pages} zero) from {args.snapshot} in {result.seconds:.3f} s, "
                    f"{out['gbps']} GB/s; {check}"
                    + (f"; written to {args.target}" if args.target else ""))
    return 0


def load_from_store(args: argparse.Namespace) -> int:
    """An eager restore from a store: every chunk fetched, checked, placed."""
    from qfram import store
    result, fetched = into_target(
        args, lambda: store.inspect(args.snapshot, endpoint_of(args))[0],
        lambda ram: store.load(args.snapshot, ram, endpoint=endpoint_of(args),
                               cache=cache_of(args), threads=args.fetch_threads,
                               verify=not args.no_verify, force=args.force))
    out = dict(result.as_dict(), fetch=fetched.as_dict(), target=args.target)
    emit(args, out, f"restored {human(result.ram_bytes)} from {args.snapshot} in "
                    f"{result.seconds:.3f} s, {out['gbps']} GB/s: {fetched.fetched} chunks "
                    f"fetched ({human(fetched.fetched_bytes)}), {fetched.cache_hits} from "
                    f"this host's cache; "
                    + ("every chunk's hash checked, "
                       + ("block checksums verified" if result.verified else
                          "block checksums not verified (--no-verify)"))
                    + (f"; written to {args.target}" if args.target else ""))
    return 0


def what_was_verified(result, no_verify: bool) -> str:
    """What an eager load or a rewrite checked, in words (a chunked file's chunk hashes
    are checked as they are decoded, whatever --no-verify says)."""
    chunks = result.layout == "chunked"
    if result.verified:
        return "checksums verified" + (" (every chunk's hash, every block's checksum)"
                                       if chunks else "")
    if no_verify:
        return "block checksums not verified (--no-verify)" + (
            "; every chunk's hash checked" if chunks else "")
    return "no checksums to verify" + ("; every chunk's hash checked" if chunks else "")


def load_lazy(args: argparse.Namespace) -> int:
    from qfram.lab import workloads
    from qfram.lazy import LazyRestore
    with LazyRestore(args.snapshot, window_pages=args.window, spin_us=args.spin_us,
                     force=args.force, background=args.background,
                     prefetch=None if args.prefetch else False,
                     record=args.record, server=args.server,
                     timeout=args.timeout, store=store_options(args)) as lazy:
        if args.hot_set:
            touched = workloads.hot_set_workload(lazy.ram, args.hot_set,
                                                 threads=args.touch_threads)
        else:
            touched = workloads.touch_workload(lazy.ram, args.touches,
                                               threads=args.touch_threads)
        stats = lazy.wait(verify=not args.no_verify)
        if args.target:
            out_ram, files = target_files(lazy.info, args)
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
    from qfram._util.latency import percentiles
    from qfram.lab import workloads
    from qfram.lazy import LazyRestore, Resettable
    if args.target:
        raise OptionError("--reset-loop keeps the RAM to itself: no TARGET")
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
    from qfram import snapshot
    if args.snapshot.startswith("s3://"):
        return info_from_store(args)
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


def info_from_store(args: argparse.Namespace) -> int:
    """What a snapshot in a store holds: its manifest."""
    from qfram import store
    from qfram.format.manifest import ZERO
    info, manifest = store.inspect(args.snapshot, endpoint_of(args))
    stored = len(manifest.digests())
    total = sum(len(b.chunks) for b in manifest.blocks)
    zero = sum(b.chunks.count(ZERO) for b in manifest.blocks)
    lines = [f"{args.snapshot}: qfram snapshot in {endpoint_of(args).describe()}, "
             f"{human(manifest.ram_bytes)} of RAM in {total} chunks of "
             f"{human(manifest.chunk_bytes)} ({stored} distinct stored, "
             f"{zero} zero), "
             f"{manifest.codec}, machine {printable(manifest.machine or '-')}, created "
             f"{manifest.created}"]
    lines.append(f"{'block':24} {'size':>12} {'pages':>9} {'zero':>9}  checksum")
    for b in info.blocks:
        lines.append(f"{printable(b.name):24} {human(b.used_length):>12} {b.pages:>9} "
                     f"{b.zero_pages:>9}  {('xxh3:' + b.xxh3_64) if b.xxh3_64 else '-'}")
    ws = manifest.working_set
    lines.append("working set: " + (f"{len(ws.get('touches', []))} pages" if ws else "none"))
    out = {"path": args.snapshot, "format": "qfram-store", "layout": "store",
           "ram_bytes": manifest.ram_bytes, "chunk_bytes": manifest.chunk_bytes,
           "codec": manifest.codec, "chunks": total, "chunks_stored": stored,
           "chunks_zero": zero,
           "machine": manifest.machine, "created": manifest.created,
           "device_bytes": len(manifest.devices),
           "blocks": [b.as_dict() for b in info.blocks],
           "working_set_pages": len(ws.get("touches", [])) if ws else 0}
    emit(args, out, "\n".join(lines))
    return 0


def working_set_of(path: str, info) -> dict:
    """The recorded working set of a mapped snapshot, or why there is none to use."""
    from qfram import snapshot
    from qfram.format import workingset
    fd = snapshot.open_locked(path)
    try:
        ws, note = workingset.load(path, fd, info)
    finally:
        os.close(fd)
    return ws.describe() if ws is not None else {"note": note}


def cmd_rewrite(args: argparse.Namespace) -> int:
    """Read a stream, replace block contents, write it again (either layout); the
    device sections and machine type are carried over byte for byte."""
    from qfram import snapshot
    if args.input.startswith("s3://"):
        from qfram import store
        from qfram.store.restore import device_state as stored_devices
        _, manifest = store.inspect(args.input, endpoint_of(args))
        devices = stored_devices(manifest)
        ram, loaded, _ = store.load(args.input, endpoint=endpoint_of(args),
                                    cache=cache_of(args), verify=not args.no_verify)
    else:
        devices = snapshot.device_state(args.input)
        ram, loaded = snapshot.load(args.input, verify=not args.no_verify, huge=False)
    for spec in args.set or []:
        name, sep, path = spec.partition("=")
        if not sep or name not in ram:
            raise OptionError(f"--set takes NAME=FILE with a block of {args.input}: {spec!r}")
        data = open(path, "rb").read()
        if len(data) != ram[name].used_length:
            raise OptionError(f"{path} has {len(data)} bytes, block {name!r} has "
                              f"{ram[name].used_length}")
        memoryview(ram[name].region)[:] = data
    result = snapshot.save(ram, args.output, layout=args.layout, compress=args.compress,
                           devices=devices, threads=args.threads,
                           chunk_bytes=args.chunk_size)
    out = dict(result.as_dict(), input=args.input, devices=len(devices.description),
               input_verified=loaded.verified)
    emit(args, out, f"rewrote {args.input} as {args.output} ({result.layout} layout, "
                    f"{human(result.file_bytes)}), {len(ram)} RAM blocks"
                    + (f", {len(args.set)} replaced" if args.set else "")
                    + f", device state carried over ({len(devices.sections)} bytes); "
                    + f"input {what_was_verified(loaded, args.no_verify)}")
    ram.close()
    return 0


def into_target(args: argparse.Namespace, inspect, restore) -> tuple:
    """Restore into new memory files at args.target (made from ``inspect()``'s blocks,
    committed only once ``restore(ram)`` succeeded; gone if it failed), or into new
    memory that is dropped after (no target).  Returns what ``restore`` returned after
    the RAM."""
    ram = files = None
    if args.target:
        ram, files = target_files(inspect(), args)
    try:
        ram, *rest = restore(ram)
    except BaseException:
        if files is not None:
            ram.close()
            files.abort()
        raise
    ram.close()
    if files is not None:
        files.commit()
    return tuple(rest)


def target_files(info, args: argparse.Namespace):
    """New memory files for the restored RAM at args.target (qfram.io.targets)."""
    from qfram.io.targets import new_block_files
    return new_block_files([(b.name, b.used_length) for b in info.blocks], args.target,
                           info.path, args.force)


# name -> (help, the function that adds its arguments and sets its func)
COMMANDS = {
    "save": ("save RAM to a snapshot file", arguments_save),
    "load": ("restore a snapshot (eagerly or lazily) and check it", arguments_load),
    "info": ("describe a snapshot or QEMU migration stream", arguments_info),
    "rewrite": ("rewrite a stream: replace blocks, change the layout", arguments_rewrite),
    "stream": ("stream RAM as page records into a file or pipe", arguments_stream),
}
