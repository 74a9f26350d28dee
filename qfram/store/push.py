"""Push a local snapshot to a store, and remove one from it.

A push restores the snapshot here (any layout, its checksums checked), cuts each block
into ``chunk_bytes`` chunks, hashes each (SHA-256), asks the store which of those it
holds already (HEAD, in parallel), compresses and uploads only the others (PUT
If-None-Match: a chunk someone stored meanwhile is not stored twice), then writes the
manifest — last, so a snapshot name appears only once every chunk it names is there.
It holds a push lock the while (qfram.store.locks: gc never removes a chunk it counts
on).
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from typing import Callable, Dict, List, Optional

from qfram import snapshot
from qfram.backend import impl as core
from qfram.errors import OptionError, StoreError
from qfram.format import manifest as mf
from qfram.format import workingset
from qfram.results import PushStats
from qfram.store import chunks
from qfram.store.client import ObjectStore
from qfram.store.locks import Lock
from qfram.store.url import Endpoint, parse_url

DEFAULT_CHUNK = 1 << 20             # chosen by scripts/bench_store.py (see README)
DEFAULT_CODEC = "zstd"

Progress = Optional[Callable[[int, int], None]]


def push(path: str, url: str, *, endpoint: Optional[Endpoint] = None,
         chunk_bytes: int = DEFAULT_CHUNK, codec: str = DEFAULT_CODEC, threads: int = 16,
         progress: Progress = None, timeout: Optional[float] = None,
         deadline: Optional[float] = None,
         lock_wait: float = 60.0) -> PushStats:
    """Push the local snapshot ``path`` to ``url`` (``s3://BUCKET/NAME``)."""
    target = parse_url(url)
    if not mf.MIN_CHUNK <= chunk_bytes <= mf.MAX_CHUNK or chunk_bytes & (chunk_bytes - 1):
        raise OptionError(f"a store chunk is a power of two of {mf.MIN_CHUNK >> 10} KiB to "
                          f"{mf.MAX_CHUNK >> 20} MiB")
    if codec not in mf.CODECS:
        raise OptionError(f"the store compresses with lz4 or zstd, not {codec!r}")
    t0 = time.perf_counter()
    ram, loaded = snapshot.load(path, verify=True, huge=False)
    try:
        devices = snapshot.device_state(path)
        info = snapshot.inspect(path)
        ws = _working_set(path, info)
        store = ObjectStore(target.bucket, endpoint, timeout=timeout, deadline=deadline,
                            pool=max(threads, 4))
        try:
            with Lock(store, "push", wait=lock_wait):
                stats = _upload(store, target.name, ram, chunk_bytes, codec, threads,
                                progress, info, devices, ws)
        finally:
            store.close()
    finally:
        ram.close()
    stats.url = str(target)
    stats.ram_bytes = loaded.ram_bytes
    stats.seconds = round(time.perf_counter() - t0, 3)
    return stats


def _working_set(path: str, info) -> Optional[dict]:
    """The working set recorded beside the snapshot, by block index and page."""
    if info.layout not in ("mapped", "chunked"):
        return None
    fd = snapshot.open_locked(path)
    try:
        ws, _ = workingset.load(path, fd, info)
    finally:
        os.close(fd)
    if ws is None:
        return None
    return {"window_pages": ws.window_pages, "touches": [list(t) for t in ws.touches]}


def _upload(store: ObjectStore, name: str, ram, chunk_bytes: int, codec: str, threads: int,
            progress: Progress, info, devices, ws) -> PushStats:
    blocks: List[mf.ManifestBlock] = []
    stats = PushStats()
    total = sum(b.used_length for b in ram)
    done = 0
    lock = threading.Lock()
    pending: Dict[str, memoryview] = {}       # a chunk to store, by hash (dedup inside too)

    # hash every chunk (zero chunks named by no hash)
    for block in ram:
        view = memoryview(block.region)
        names = []
        for start in range(0, block.used_length, chunk_bytes):
            piece = view[start:start + chunk_bytes]
            stats.chunks_total += 1
            if core.is_zero(piece):
                names.append(mf.ZERO)
                stats.chunks_zero += 1
            else:
                want = chunks.digest(piece)
                names.append(want)
                pending.setdefault(want, piece)
        blocks.append(mf.ManifestBlock(block.name, block.used_length, names))

    def settle(want: str) -> None:
        nonlocal done
        piece = pending[want]
        if store.head(mf.chunk_key(want)) is None:
            obj = chunks.encode(piece, codec)
            stored = store.put(mf.chunk_key(want), obj, if_none_match=True)
            with lock:
                if stored:
                    stats.chunks_uploaded += 1
                    stats.bytes_uploaded += len(obj)
                else:
                    stats.chunks_deduplicated += 1
        else:
            with lock:
                stats.chunks_deduplicated += 1
        with lock:
            done += len(piece)
            if progress:
                progress(done, total)

    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        failures = [f for f in concurrent.futures.as_completed(
            [pool.submit(settle, want) for want in pending]) if f.exception()]
    if failures:
        raise failures[0].exception()          # type: ignore[misc]
    description = info.description
    manifest = mf.Manifest(
        name, chunk_bytes, codec, blocks,
        {"page_size": description.page_size if description else None,
         "devices": devices.description, "qfram": description.qfram if description else {}},
        devices.machine, devices.ram_section_id, devices.sections, ws)
    body = manifest.encode()
    store.put(name, body)
    stats.manifest_bytes = len(body)
    stats.chunks_unique = len(pending)
    return stats


def remove(url: str, *, endpoint: Optional[Endpoint] = None) -> str:
    """Remove the snapshot ``url`` (its manifest: its chunks go at the next gc, if no
    other snapshot names them).  A name that is not a qfram snapshot is left alone."""
    target = parse_url(url)
    store = ObjectStore(target.bucket, endpoint)
    try:
        head = store.head(target.name)
        if head is None:
            raise StoreError(f"{target}: no such snapshot")
        data = store.get(target.name, mf.MAX_MANIFEST)
        mf.parse(data, str(target))             # refuses to remove what is not ours
        store.delete(target.name)
    finally:
        store.close()
    return str(target)
