"""The migration commands: send, receive, and tls-init (certificates for both ends)."""
from __future__ import annotations

import argparse

from qfram._util.text import human
from qfram.cli.common import add_output_options, emit, parse_size, rss, source_ram
from qfram.errors import OptionError


def arguments_send(p: argparse.ArgumentParser) -> None:
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


def arguments_receive(p: argparse.ArgumentParser) -> None:
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


def arguments_tls_init(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory")
    p.add_argument("--host", default="localhost",
                   help="the destination's host name or address (its certificate is for "
                        "it, and for localhost)")
    p.add_argument("--force", action="store_true", help="replace existing credentials")
    add_output_options(p)
    p.set_defaults(func=cmd_tls_init)



LINK_OPTIONS = [
    ("both", "--tls-creds", {"metavar": "DIR"}),
    ("receive", "--tls-authz", {"action": "append", "metavar": "SUBJECT"}),
    ("receive", "--insecure", {"action": "store_true"}),
    ("receive", "--max-ram", {"type": parse_size, "metavar": "SIZE"}),
    ("send", "--tls-hostname", {"metavar": "NAME"}),
    ("both", "--deadline", {"type": float, "metavar": "SECONDS"}),
    ("both", "--resume", {"action": argparse.BooleanOptionalAction, "default": True}),
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
    "--resume": "a link lost after the switch is reconnected and the migration resumed, "
                "until --deadline or --timeout (the default); --no-resume: it ends the "
                "migration",
}


def add_link_options(p: argparse.ArgumentParser, side: str) -> None:
    for who, flag, keywords in LINK_OPTIONS:
        if who in ("both", side):
            p.add_argument(flag, help=LINK_HELP[flag], **keywords)


def cmd_send(args: argparse.Namespace) -> int:
    """Migrate RAM to a `qfram receive` (precopy rounds, then postcopy)."""
    from qfram import postcopy
    if not args.demo and not args.sources:
        raise OptionError("name a memory file to send, or --demo SIZE")
    ram = source_ram(args)
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
                          deadline=args.deadline, resume=args.resume,
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
                                  max_ram=args.max_ram, resume=args.resume,
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


def cmd_tls_init(args: argparse.Namespace) -> int:
    """Make a CA, server and client certificates for TLS migration (QEMU's layout)."""
    from qfram.postcopy import tlscreds
    paths = tlscreds.init(args.directory, host=args.host, force=args.force)
    emit(args, {"directory": args.directory, "files": paths},
         f"wrote {len(paths)} files to {args.directory} (server certificate for "
         f"{args.host}); give --tls-creds {args.directory} to both `qfram send` and "
         f"`qfram receive`, or dir={args.directory} to QEMU's tls-creds-x509")
    return 0


# name -> (help, the function that adds its arguments and sets its func)
COMMANDS = {
    "send": ("migrate RAM to `qfram receive` (precopy + postcopy)", arguments_send),
    "receive": ("receive one migration from `qfram send`", arguments_receive),
    "tls-init": ("make TLS certificates for migration (QEMU's tls-creds-x509 layout)",
                 arguments_tls_init),
}
