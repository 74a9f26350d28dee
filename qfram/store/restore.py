"""Snapshots out of a store: what one holds (its manifest, checked), its RAM restored
eagerly here (every chunk fetched in parallel, hashed, then placed), or pulled into a
local chunked snapshot.  A restore is whole or nothing: a chunk that fails (after its
retries) ends it with the chunk and the snapshot named, and nothing is left behind."""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Optional, Tuple

from qfram import snapshot
from qfram.errors import OptionError, TooLarge
from qfram.format import manifest as mf
from qfram.format import savevm
from qfram.format.vmdesc import parse as parse_description
from qfram.ram import RAMBlock, RAMList, memory_room
from qfram.results import FetchStats, LoadResult
from qfram.snapshot.common import SnapshotInfo, check_checksums
from qfram.store.chunks import ChunkFetcher, LocalCache
from qfram.store.client import ObjectStore
from qfram.store.url import Endpoint, StoreURL, parse_url


def open_manifest(url: str, endpoint: Optional[Endpoint] = None, *,
                  timeout: Optional[float] = None,
                  deadline: Optional[float] = None,
                  pool: int = 32) -> Tuple[ObjectStore, mf.Manifest]:
    """The store and the snapshot's manifest, checked.  The caller closes the store."""
    target = parse_url(url)
    store = ObjectStore(target.bucket, endpoint, timeout=timeout, deadline=deadline,
                        pool=pool)
    try:
        if store.head(target.name) is None:
            raise OptionError(f"{target}: no such snapshot in {store.endpoint.url or 'S3'}")
        manifest = mf.parse(store.get(target.name, mf.MAX_MANIFEST), str(target))
    except BaseException:
        store.close()
        raise
    return store, manifest


def info_of(url: str, manifest: mf.Manifest) -> SnapshotInfo:
    """The snapshot as ``qfram info`` shows any: blocks, checksums, devices."""
    description = parse_description(_description_json(manifest), 0)
    facts = description.blocks
    blocks = []
    for b in manifest.blocks:
        f = facts.get(b.name)
        blocks.append(savevm.BlockInfo(b.name, b.used_length, f.pages if f else 0,
                                       f.zero_pages if f else 0,
                                       xxh3_64=f.xxh3_64 if f else None))
    return SnapshotInfo(url, 0, "store", manifest.machine, [], blocks, [], [], [], -1, -1,
                        True, manifest.codec, manifest.created, False, description)


def _description_json(manifest: mf.Manifest) -> bytes:
    import json
    return json.dumps(manifest.description).encode()


def device_state(manifest: mf.Manifest) -> savevm.DeviceState:
    description = parse_description(_description_json(manifest), 0)
    return savevm.DeviceState(manifest.machine, manifest.ram_section_id, manifest.devices,
                              description.devices)


def load(url: str, ram: Optional[RAMList] = None, *, endpoint: Optional[Endpoint] = None,
         cache: Optional[LocalCache] = None, threads: int = 16, verify: bool = True,
         force: bool = False, timeout: Optional[float] = None,
         deadline: Optional[float] = None) -> Tuple[RAMList, LoadResult, FetchStats]:
    """Restore the snapshot ``url`` eagerly into ``ram`` (blocks matched by name and
    length) or new anonymous memory: every non-zero chunk fetched (local cache first) on
    ``threads`` threads, decoded and hashed before it is placed; then each block's
    xxh3 checked against the description (``verify``)."""
    store, manifest = open_manifest(url, endpoint, timeout=timeout, deadline=deadline,
                                    pool=max(threads, 4))
    ram, result, stats = _load(url, store, manifest, ram, cache, threads, verify, force)
    return ram, result, stats


def _load(url: str, store: ObjectStore, manifest: mf.Manifest, ram: Optional[RAMList],
          cache: Optional[LocalCache], threads: int, verify: bool,
          force: bool) -> Tuple[RAMList, LoadResult, FetchStats]:
    """load() once the manifest is read; closes the store."""
    t0 = time.perf_counter()
    stats = FetchStats(url=url, ram_bytes=manifest.ram_bytes)
    created = ram is None
    try:
        if created:
            room, where = memory_room()
            if not force and manifest.ram_bytes > room:
                raise TooLarge(f"{url} declares {manifest.ram_bytes / 2**30:.2f} GiB of RAM, "
                               f"more than {where}; --force to try anyway", 0)
            ram = RAMList([RAMBlock.anonymous(b.name, b.used_length) for b in manifest.blocks])
        for b in manifest.blocks:
            if b.name not in ram or ram[b.name].used_length != b.used_length:
                raise OptionError(f"{url}: block {b.name!r} ({b.used_length} bytes) is not in "
                                  f"the target RAM with that length")
        fetcher = ChunkFetcher(store, cache, url)
        _place_all(manifest, ram, fetcher, threads, zeroed=created)
        info = info_of(url, manifest)
        verified = check_checksums(ram, [(b.name, b.used_length) for b in manifest.blocks],
                                   info.description) if verify else False
    except BaseException:
        if created and ram is not None:
            ram.close()
        store.close()
        raise
    stats.requests = store.requests
    store.close()
    stats.chunks = sum(1 for b in manifest.blocks for d in b.chunks if d != mf.ZERO)
    stats.fetched, stats.fetched_bytes = fetcher.fetched, fetcher.fetched_bytes
    stats.cache_hits = fetcher.cache_hits
    stats.seconds = round(time.perf_counter() - t0, 3)
    stats.verified = verified
    blocks = [b.as_dict() for b in info.blocks]
    result = LoadResult(url, "store", manifest.ram_bytes, sum(b.pages for b in info.blocks),
                        sum(b.zero_pages for b in info.blocks), time.perf_counter() - t0,
                        verified, blocks)
    return ram, result, stats


def _place_all(manifest: mf.Manifest, ram: RAMList, fetcher: ChunkFetcher, threads: int,
               zeroed: bool) -> None:
    """Every chunk into its place: fetched, decoded and hashed into a private buffer
    first, copied in only once it is known good."""
    local = threading.local()
    size = manifest.chunk_bytes

    def place(block: mf.ManifestBlock, index: int) -> None:
        at = index * size
        length = min(size, block.used_length - at)
        want = block.chunks[index]
        if want == mf.ZERO:
            if not zeroed:
                with memoryview(ram[block.name].region) as region:
                    region[at:at + length] = bytes(length)
            return
        scratch = getattr(local, "scratch", None)
        if scratch is None:
            scratch = local.scratch = bytearray(size)
        view = memoryview(scratch)[:length]
        fetcher.fetch(want, view)
        # released at once: a failed restore must be able to unmap its RAM
        with memoryview(ram[block.name].region) as region:
            region[at:at + length] = view

    work = [(b, i) for b in manifest.blocks for i in range(len(b.chunks))]
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        futures = [pool.submit(place, b, i) for b, i in work]
        for future in concurrent.futures.as_completed(futures):
            error = future.exception()
            if error is not None:
                for other in futures:
                    other.cancel()
                raise error


def pull(url: str, path: str, *, endpoint: Optional[Endpoint] = None,
         cache: Optional[LocalCache] = None, threads: int = 16,
         timeout: Optional[float] = None,
         deadline: Optional[float] = None) -> Tuple[FetchStats, object]:
    """The snapshot ``url`` as a local chunked snapshot at ``path`` (same chunk size and
    codec; written whole, or not at all), its checksums checked first."""
    store, manifest = open_manifest(url, endpoint, timeout=timeout, deadline=deadline,
                                    pool=max(threads, 4))
    ram, _, stats = _load(url, store, manifest, None, cache, threads, True, False)
    try:
        saved = snapshot.save(ram, path, layout="chunked", compress=manifest.codec,
                              chunk_bytes=min(manifest.chunk_bytes, 16 << 20),
                              devices=device_state(manifest))
    finally:
        ram.close()
    return stats, saved


def inspect(url: str, endpoint: Optional[Endpoint] = None) -> Tuple[SnapshotInfo, mf.Manifest]:
    store, manifest = open_manifest(url, endpoint)
    store.close()
    return info_of(url, manifest), manifest


__all__ = ["load", "pull", "inspect", "open_manifest", "info_of", "device_state", "StoreURL"]
