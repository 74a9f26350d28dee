"""The page server's command: serve (one snapshot, many restores)."""
from __future__ import annotations

import argparse
import sys

from qfram._util.text import human
from qfram.cli.common import add_output_options, emit, parse_size
from qfram.cli.store import add_store_options, cache_of, endpoint_of


def arguments_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("snapshot", help="a chunked or mapped snapshot, or s3://BUCKET/NAME")
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="the unix socket to listen on (made mode 0600, or 0660 with "
                        "--group)")
    p.add_argument("--memory-limit", type=parse_size, default=0, metavar="SIZE",
                   help="keep at most this much decoded RAM, evicting the least recently "
                        "asked-for chunks (default: the whole RAM)")
    p.add_argument("--idle-exit", type=float, metavar="SECONDS",
                   help="stop after this long without a client")
    p.add_argument("--group", help="members of this group may connect too")
    p.add_argument("--threads", type=int,
                   help="decoding threads (default 2; 16 fetching ones for s3://)")
    p.add_argument("--private", action="store_true",
                   help="serve one client, then stop (what a lazy restore of an s3:// "
                        "snapshot starts for itself)")
    add_store_options(p)
    add_output_options(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a snapshot's pages to any number of lazy restores on this host."""
    from qfram.server import serve
    extra = {}
    if args.snapshot.startswith("s3://"):
        extra = dict(endpoint=endpoint_of(args), cache=cache_of(args))

    def ready(server) -> None:
        print(f"qfram serve: serving {server.source.name} ({human(server.cache.size)}, "
              f"{server.cache.chunk_bytes >> 10} KiB chunks) on {args.socket}",
              file=sys.stderr, flush=True)

    stats = serve(args.snapshot, args.socket, memory_limit=args.memory_limit,
                  threads=args.threads, idle_exit=args.idle_exit, group=args.group,
                  on_ready=None if args.private else ready, private=args.private, **extra)
    if args.private:
        return 0
    emit(args, stats.as_dict(),
         f"served {stats.snapshot} to {stats.clients} clients in {stats.seconds} s: "
         f"{stats.chunks_decoded} chunks decoded, {stats.hits} hits, {stats.misses} "
         f"misses, {human(stats.bytes_served)} served, {stats.evictions} evicted, "
         f"{stats.refused} refused")
    return 0


# name -> (help, the function that adds its arguments and sets its func)
COMMANDS = {
    "serve": ("serve a snapshot's pages to many lazy restores on this host",
              arguments_serve),
}
