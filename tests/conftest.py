"""Shared fixtures: every core test runs against the Cython core and its pure-Python twin."""
from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import threading
from typing import List

import pytest

from qfram import _fast, _pyfast
from qfram.io import channel

PAGE = mmap.PAGESIZE
HOSTILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "hostile.py")


class Core:
    """One implementation of the core, with the entry points bound to it."""

    def __init__(self, name: str, module) -> None:
        self.name = name
        self.QEMUFile = module.QEMUFile

    def fdopen(self, fd: int, mode: str, **kw):
        return channel.fdopen(fd, mode, file_class=self.QEMUFile, **kw)

    def socket_file(self, sock, mode: str, **kw):
        return channel.socket_file(sock, mode, file_class=self.QEMUFile, **kw)

    def buffer_file(self, data=None, mode=None, **kw):
        return channel.buffer_file(data, mode, file_class=self.QEMUFile, **kw)

    def object_file(self, obj, mode: str, **kw):
        return channel.object_file(obj, mode, file_class=self.QEMUFile, **kw)

    def __repr__(self) -> str:
        return self.name


CORES = [Core("fast", _fast), Core("pure", _pyfast)]


@pytest.fixture(params=CORES, ids=lambda c: c.name)
def core(request) -> Core:
    return request.param


SEED = {"iov_max": 64, "buf_size": 32768, "release_min": 0}


def private_anon(size: int) -> mmap.mmap:
    """Private anonymous memory (what a VM's RAM usually is); MADV_DONTNEED frees it."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def memfd_region(size: int):
    """A memfd mapped shared: its pages are shmem, which only MADV_REMOVE frees."""
    fd = os.memfd_create("qfram-test")
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def fill_pages(mm, npages: int, seed: int = 1) -> None:
    """A distinct, non-zero pattern in every page."""
    for i in range(npages):
        mm[i * PAGE:(i + 1) * PAGE] = bytes([(seed + i) % 251 + 1]) * PAGE


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_pages(mm) -> List[bool]:
    """Per page: is it in memory (mincore; for shared mappings, in the page cache)."""
    npages = (len(mm) + PAGE - 1) // PAGE
    vec = ctypes.create_string_buffer(npages)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    if _libc.mincore(addr, len(mm), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return [b & 1 == 1 for b in vec.raw]


def memfd_blocks(fd: int) -> int:
    """Bytes of shmem allocated to a memfd."""
    return os.fstat(fd).st_blocks * 512


class Drain(threading.Thread):
    """Reads an fd to its end in the background, keeping what it read."""

    def __init__(self, fd: int, delay_per_read: float = 0.0, chunk: int = 1 << 20) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.delay = delay_per_read
        self.chunk = chunk
        self.data = bytearray()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        import time
        try:
            while True:
                if self.delay:
                    time.sleep(self.delay)
                block = os.read(self.fd, self.chunk)
                if not block:
                    break
                self.data += block
        except BaseException as exc:  # report in the test thread
            self.error = exc

    def result(self, timeout: float = 60) -> bytes:
        self.join(timeout)
        assert not self.is_alive(), "drain did not finish"
        if self.error:
            raise self.error
        return bytes(self.data)


class RecordingChannel:
    """A custom channel that records the byte count of every writev (the flush points)."""

    fd = -1

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes: List[int] = []
        self.iovecs: List[int] = []

    def writev(self, views) -> int:
        n = 0
        for v in views:
            self.data += v
            n += len(v)
        self.writes.append(n)
        self.iovecs.append(len(views))
        return n


@pytest.fixture
def hostile(tmp_path):
    """Starts a hostile peer (tests/helpers/hostile.py, a process of its own) of a kind
    at a unix socket; returns its address.  Killed at the end of the test."""
    started = []

    def start(kind: str) -> str:
        address = str(tmp_path / f"peer{len(started)}.sock")
        proc = subprocess.Popen([sys.executable, HOSTILE, kind, address],
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline() == "ready\n"
        return address

    yield start
    for proc in started:
        proc.kill()
        proc.wait()
