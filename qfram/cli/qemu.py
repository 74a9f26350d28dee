"""The QEMU commands: restore-qemu (resume a QEMU from a snapshot at once) and extract
(each RAM block of a QEMU stream as a raw file)."""
from __future__ import annotations

import argparse
import time

from qfram._util.text import human
from qfram.cli.common import WORKING_SET_SWITCHES, add_output_options, add_switches, emit
from qfram.cli.store import add_store_options, store_options


def arguments_restore_qemu(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="give up when the whole restore (the monitor's greeting and "
                        "negotiation, the handover, the pages, QEMU's word that it is "
                        "complete) takes longer than this (default: 120 s and 10 s more "
                        "per GiB of RAM)")
    p.add_argument("--server", metavar="SOCKET",
                   help="the pages come from this host page server (`qfram serve`), which "
                        "must serve SNAPSHOT: many QEMU clones, one decoded copy")
    add_store_options(p)
    add_switches(p, WORKING_SET_SWITCHES)
    add_output_options(p)
    p.set_defaults(func=cmd_restore_qemu)


def arguments_extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("stream", help="a QEMU migration stream or mapped-ram file (or a qfram "
                                  "chunked snapshot)")
    p.add_argument("outdir", help="where the files go ('/' in block names: folders)")
    p.add_argument("--force", action="store_true",
                   help="extract even a stream that declares more RAM than the disk has free")
    add_output_options(p)
    p.set_defaults(func=cmd_extract)



def cmd_restore_qemu(args: argparse.Namespace) -> int:
    """Resume a QEMU from a snapshot at once; its RAM follows on demand (postcopy)."""
    from qfram.qemu.restore import restore
    stats = restore(args.snapshot, qmp=args.qmp, to=args.to,
                    timeout=args.timeout, deadline=args.deadline, machine=args.machine,
                    prefetch=args.prefetch, record=args.record, server=args.server,
                    store=store_options(args))
    lat = stats.request_service
    emit(args, stats.as_dict(),
         f"restored {args.snapshot} ({human(stats.ram_bytes)} of RAM, "
         f"{human(stats.device_bytes)} of device state, {stats.machine}) into QEMU "
         f"{stats.qemu_version}: running after {stats.postcopy_active_ms} ms, complete "
         f"after {stats.completed_s} s; {stats.pages_requested} pages requested "
         f"(service p50 {lat.p50_us} us, p99 {lat.p99_us} us), {stats.pages_pushed} "
         f"pushed\nworking set: {stats.working_set or 'none'}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    """Write each RAM block of a QEMU stream as a raw file."""
    from qfram.qemu.streams import extract
    t0 = time.perf_counter()
    result = extract(args.stream, args.outdir, force=args.force)
    result["seconds"] = round(time.perf_counter() - t0, 4)
    lines = [f"extracted {len(result['blocks'])} RAM blocks from {args.stream} in "
             f"{result['seconds']:.3f} s:"]
    for b in result["blocks"]:
        lines.append(f"  {b['file']:48} {human(b['used_length']):>12}  {b['pages']} pages, "
                     f"{b['zero_pages']} zero")
    emit(args, result, "\n".join(lines))
    return 0


# name -> (help, the function that adds its arguments and sets its func)
COMMANDS = {
    "restore-qemu": ("resume a QEMU from a snapshot at once, its RAM following on demand",
                     arguments_restore_qemu),
    "extract": ("write each RAM block of a QEMU stream as a raw file", arguments_extract),
}
