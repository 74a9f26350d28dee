"""Removing the chunks no snapshot names any more.

gc knows chunks by their prefix (``.qfram/chunks/``) and snapshots by parsing every other
object of the bucket: a qfram manifest protects each chunk it names.  It holds the gc
lock (qfram.store.locks) so that no push counts on a chunk it removes, and leaves chunks
younger than ``grace`` seconds alone too.  An object that claims to be a manifest but
does not parse stops gc (its chunks could not be protected): gc never guesses.
"""
from __future__ import annotations

import concurrent.futures
from typing import Optional, Set

from qfram.errors import StoreError
from qfram.format import manifest as mf
from qfram.results import GCStats
from qfram.store.client import ObjectStore
from qfram.store.locks import Lock
from qfram.store.url import Endpoint, parse_url


def gc(url: str, *, endpoint: Optional[Endpoint] = None, grace: float = 600.0,
       dry_run: bool = False, threads: int = 16, lock_wait: float = 60.0) -> GCStats:
    """Remove from the bucket ``url`` (``s3://BUCKET``) every chunk no manifest names,
    older than ``grace`` seconds."""
    target = parse_url(url, want_name=False)
    store = ObjectStore(target.bucket, endpoint, pool=max(threads, 4))
    stats = GCStats(url=url)
    try:
        with Lock(store, "gc", wait=lock_wait):
            now = store.server_time()
            chunks = {}
            for key, size, written in store.list(mf.CHUNK_PREFIX):
                digest = mf.digest_of_key(key)
                if digest is not None:
                    chunks[digest] = (key, size, written)
            named: Set[str] = set()
            for key, size, _ in store.list(""):
                if key.startswith(mf.PREFIX):
                    continue
                start = store.get(key, 64, first=64) if size else b""
                if not mf.looks_like_manifest(start):
                    stats.other_objects += 1
                    continue
                try:
                    body = store.get(key, mf.MAX_MANIFEST)
                    named |= mf.parse(body, f"s3://{target.bucket}/{key}").digests()
                except ValueError as exc:
                    raise StoreError(f"gc stopped: {exc} — its chunks could not be kept "
                                     f"safe; remove or repair it first") from None
                stats.snapshots += 1
            stats.chunks = len(chunks)
            doomed = [(d, key, size) for d, (key, size, written) in chunks.items()
                      if d not in named and now - written >= grace]
            stats.chunks_young = sum(1 for d, (_, _, written) in chunks.items()
                                     if d not in named and now - written < grace)
            stats.chunks_removed = len(doomed)
            stats.bytes_removed = sum(size for _, _, size in doomed)
            if not dry_run and doomed:
                with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
                    for future in [pool.submit(store.delete, key) for _, key, _ in doomed]:
                        future.result()
    finally:
        store.close()
    stats.dry_run = dry_run
    return stats
