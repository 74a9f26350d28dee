"""The store's commands: push, pull, rm, gc (snapshots in an S3-compatible store), and
the options every command that reads an ``s3://`` snapshot takes."""
from __future__ import annotations

import argparse

from qfram._util.text import human
from qfram.cli.common import Progress, add_output_options, emit, parse_size


def add_store_options(p: argparse.ArgumentParser, cache: bool = True) -> None:
    """Where the store is (else AWS_ENDPOINT_URL; keys from AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY, as every S3 tool reads them) and this host's chunk cache."""
    p.add_argument("--endpoint", metavar="URL",
                   help="the S3 endpoint of an s3:// snapshot (default: AWS_ENDPOINT_URL; "
                        "plain http is fine for a local store)")
    p.add_argument("--store-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="s3://: each connect and each read of a request may last this long")
    p.add_argument("--store-deadline", type=float, default=60.0, metavar="SECONDS",
                   help="s3://: each request, with its retries, may last this long")
    if cache:
        p.add_argument("--cache", metavar="DIR",
                       help="this host's chunk cache (default: $XDG_CACHE_HOME/qfram)")
        p.add_argument("--cache-limit", type=parse_size, default=10 << 30, metavar="SIZE",
                       help="keep at most this much in the chunk cache (default 10G)")


def add_lock_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lock-wait", type=float, default=60.0, metavar="SECONDS",
                   help="wait this long for a gc (or, for gc, the pushes) under way")


def endpoint_of(args: argparse.Namespace):
    from qfram.store import Endpoint
    return Endpoint(url=getattr(args, "endpoint", None),
                    timeout=getattr(args, "store_timeout", 10.0),
                    deadline=getattr(args, "store_deadline", 60.0))


def cache_of(args: argparse.Namespace):
    from qfram.store.chunks import LocalCache
    return LocalCache(getattr(args, "cache", None), getattr(args, "cache_limit", 10 << 30))


def store_options(args: argparse.Namespace) -> dict:
    """For a lazy restore's private page server."""
    return {"endpoint": endpoint_of(args), "cache": getattr(args, "cache", None),
            "cache_limit": getattr(args, "cache_limit", None)}


def arguments_push(p: argparse.ArgumentParser) -> None:
    p.add_argument("snapshot", help="a local snapshot (any layout)")
    p.add_argument("url", metavar="s3://BUCKET/NAME")
    p.add_argument("--chunk-size", type=parse_size, default=1 << 20, metavar="SIZE",
                   help="bytes per stored chunk, a power of two from 64K to 16M (default "
                        "1M: see the README's store section for the trade-off)")
    p.add_argument("--codec", choices=["zstd", "lz4"], default="zstd")
    p.add_argument("--threads", type=int, default=16, help="requests at once")
    add_lock_option(p)
    add_store_options(p, cache=False)
    add_output_options(p)
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    """Push a snapshot to a store: only the chunks it does not hold yet are uploaded."""
    from qfram.store import push
    stats = push(args.snapshot, args.url, endpoint=endpoint_of(args),
                 chunk_bytes=args.chunk_size, codec=args.codec, threads=args.threads,
                 progress=Progress("push"), lock_wait=args.lock_wait)
    emit(args, stats.as_dict(),
         f"pushed {args.snapshot} ({human(stats.ram_bytes)}) to {stats.url} in "
         f"{stats.seconds} s: {stats.chunks_uploaded} of {stats.chunks_total} chunks "
         f"uploaded ({human(stats.bytes_uploaded)}), {stats.chunks_deduplicated} already "
         f"stored, {stats.chunks_zero} zero")
    return 0


def arguments_pull(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="s3://BUCKET/NAME")
    p.add_argument("snapshot", help="the local chunked snapshot to write")
    p.add_argument("--threads", type=int, default=16, help="requests at once")
    add_store_options(p)
    add_output_options(p)
    p.set_defaults(func=cmd_pull)


def cmd_pull(args: argparse.Namespace) -> int:
    """Pull a snapshot from a store into a local chunked snapshot."""
    from qfram.store import pull
    stats, saved = pull(args.url, args.snapshot, endpoint=endpoint_of(args),
                        cache=cache_of(args), threads=args.threads)
    emit(args, dict(stats.as_dict(), snapshot=args.snapshot, file_bytes=saved.file_bytes),
         f"pulled {args.url} ({human(stats.ram_bytes)}) into {args.snapshot} "
         f"({human(saved.file_bytes)}, chunked): {stats.fetched} chunks fetched "
         f"({human(stats.fetched_bytes)}), {stats.cache_hits} from this host's cache; "
         f"checksums verified")
    return 0


def arguments_rm(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="s3://BUCKET/NAME")
    add_store_options(p, cache=False)
    add_output_options(p)
    p.set_defaults(func=cmd_rm)


def cmd_rm(args: argparse.Namespace) -> int:
    """Remove a snapshot from a store (its chunks go at the next gc)."""
    from qfram.store import remove
    url = remove(args.url, endpoint=endpoint_of(args))
    emit(args, {"removed": url}, f"removed {url} (its chunks go at the next `qfram gc`)")
    return 0


def arguments_gc(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="s3://BUCKET")
    p.add_argument("--grace", type=float, default=600.0, metavar="SECONDS",
                   help="keep unreferenced chunks younger than this (default 600)")
    p.add_argument("--dry-run", action="store_true", help="say what would go")
    add_lock_option(p)
    add_store_options(p, cache=False)
    add_output_options(p)
    p.set_defaults(func=cmd_gc)


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove the chunks no snapshot in the bucket names."""
    from qfram.store import gc
    stats = gc(args.url, endpoint=endpoint_of(args), grace=args.grace, dry_run=args.dry_run,
               lock_wait=args.lock_wait)
    emit(args, stats.as_dict(),
         f"{args.url}: {stats.snapshots} snapshots name "
         f"{stats.chunks - stats.chunks_removed - stats.chunks_young} "
         f"of {stats.chunks} chunks; {'would remove' if args.dry_run else 'removed'} "
         f"{stats.chunks_removed} ({human(stats.bytes_removed)}), kept {stats.chunks_young} "
         f"younger than {args.grace:g} s")
    return 0


# name -> (help, the function that adds its arguments and sets its func)
COMMANDS = {
    "push": ("push a snapshot to an S3 store (only new chunks are uploaded)", arguments_push),
    "pull": ("pull a snapshot from an S3 store into a local chunked snapshot",
             arguments_pull),
    "rm": ("remove a snapshot from an S3 store", arguments_rm),
    "gc": ("remove the chunks no snapshot in a bucket names", arguments_gc),
}
