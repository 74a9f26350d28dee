"""Chunks in and out of a store: encoded on their own (qfram/_chunks.pyx, in C),
named by their SHA-256, kept on this host in a bounded local cache, and fetched at most
once at a time each.  Whatever comes back — from the store or from the local cache — is
decoded into a buffer of the length the manifest expects and hashed before anyone uses
a byte of it; a chunk that fails is fetched again, a bounded number of times, then the
caller gets a reason that names the chunk and the snapshot.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from typing import Dict, Optional

from qfram import _chunks
from qfram.errors import FormatError, StoreError
from qfram.format import manifest as mf
from qfram.store.client import ObjectStore

DEFAULT_CACHE_LIMIT = 10 << 30
CODEC_IDS = {"lz4": _chunks.CODECS["lz4"], "zstd": _chunks.CODECS["zstd"]}


def digest(data) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(data, codec: str) -> bytes:
    """A chunk object for ``data`` (not all zero: a zero chunk is never stored)."""
    kind, stored, _ = _chunks.encode_one(data, CODEC_IDS[codec])
    if kind == 0:                            # all zero after all: stored raw, harmless
        kind, stored = mf.KIND_RAW, bytes(data)
    return mf.chunk_object(kind, len(data), stored)


def decode(obj: bytes, want: str, out: memoryview, what: str) -> None:
    """Decode a chunk object into ``out`` (the length the manifest expects) and check it
    hashes to ``want``."""
    kind, stored = mf.parse_chunk_object(obj, len(out), what)
    if _chunks.decode_one(kind, stored, out, 0, False) != 0:
        raise FormatError(f"{what}: does not decode to {len(out)} bytes")
    got = hashlib.sha256(out).hexdigest()
    if got != want:
        raise FormatError(f"{what}: decodes to bytes that hash to {got[:16]}..., not "
                          f"{want[:16]}... (altered or damaged)")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qfram")


class LocalCache:
    """Chunk objects on this host, a file each (``DIR/chunks/ab/<hash>``), written whole
    or not at all, the least recently used removed past ``limit`` bytes.  What it holds
    is checked like what the store sends (a damaged file is dropped and fetched again)."""

    def __init__(self, directory: Optional[str] = None, limit: int = DEFAULT_CACHE_LIMIT):
        self.root = os.path.join(directory or default_cache_dir(), "chunks")
        self.limit = limit
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self._added = 0
        self._lock = threading.Lock()
        self.hits = 0

    def _path(self, want: str) -> str:
        return os.path.join(self.root, want[:2], want)

    def get(self, want: str) -> Optional[bytes]:
        path = self._path(want)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size > 2 * mf.MAX_CHUNK:
                return None
            data = os.pread(fd, size, 0)
            os.utime(fd, None)                # recently used
        except OSError:
            return None
        finally:
            os.close(fd)
        with self._lock:
            self.hits += 1
        return data

    def drop(self, want: str) -> None:
        try:
            os.unlink(self._path(want))
        except OSError:
            pass

    def put(self, want: str, data: bytes) -> None:
        """Keep a checked chunk object (a hint: a full disk is no failure)."""
        folder = os.path.dirname(self._path(want))
        temporary = os.path.join(folder, f".{want}.{secrets.token_hex(4)}")
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.rename(temporary, self._path(want))
        except OSError:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            return
        with self._lock:
            self._added += len(data)
            trim = self._added > max(self.limit // 16, 64 << 20)
            if trim:
                self._added = 0
        if trim:
            self.trim()

    def trim(self) -> int:
        """Remove the least recently used chunk files until the cache fits its limit."""
        files = []
        for folder in os.scandir(self.root):
            if folder.is_dir(follow_symlinks=False):
                for entry in os.scandir(folder.path):
                    if entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        files.append((st.st_mtime, st.st_size, entry.path))
        total = sum(size for _, size, _ in files)
        gone = 0
        for _, size, path in sorted(files):
            if total <= self.limit:
                break
            try:
                os.unlink(path)
                total -= size
                gone += 1
            except OSError:
                pass
        return gone


class ChunkFetcher:
    """Chunks by hash, checked: from the local cache, else the store — one fetch at a
    time per chunk however many threads want it."""

    def __init__(self, store: ObjectStore, cache: Optional[LocalCache], snapshot: str,
                 attempts: int = 3) -> None:
        self.store = store
        self.cache = cache
        self.snapshot = snapshot
        self.attempts = attempts
        self._flights: Dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.fetched = 0
        self.fetched_bytes = 0
        self.cache_hits = 0
        self.seconds = 0.0

    def fetch(self, want: str, out: memoryview) -> None:
        """The chunk named ``want``, decoded into ``out`` and checked."""
        what = f"chunk {want[:16]}... of {self.snapshot}"
        if self.cache is not None:
            cached = self.cache.get(want)
            if cached is not None:
                try:
                    decode(cached, want, out, what + " (local cache)")
                    with self._lock:
                        self.cache_hits += 1
                    return
                except FormatError:
                    self.cache.drop(want)     # damaged here: fetch it again
        leader = False
        with self._lock:
            flight = self._flights.get(want)
            if flight is None:
                flight = self._flights[want] = threading.Event()
                leader = True
        if not leader:                        # someone fetches it: wait, then take theirs
            flight.wait(self.store.deadline * self.attempts)
            if self.cache is not None:
                cached = self.cache.get(want)
                if cached is not None:
                    try:
                        decode(cached, want, out, what + " (local cache)")
                        return
                    except FormatError:
                        self.cache.drop(want)
        try:
            self._fetch(want, out, what)
        finally:
            if leader:
                with self._lock:
                    self._flights.pop(want, None)
                flight.set()

    def _fetch(self, want: str, out: memoryview, what: str) -> None:
        last: Optional[Exception] = None
        for _ in range(self.attempts):
            t0 = time.perf_counter()
            data = self.store.get(mf.chunk_key(want), mf.CHUNK_HEAD.size + 2 * len(out) + 1024,
                                  what=f"GET {what}")
            try:
                decode(data, want, out, what)
            except FormatError as exc:        # altered or cut: the store may do better
                last = exc
                continue
            with self._lock:
                self.fetched += 1
                self.fetched_bytes += len(data)
                self.seconds += time.perf_counter() - t0
            if self.cache is not None:
                self.cache.put(want, data)
            return
        raise StoreError(f"{last} ({self.attempts} tries)")
