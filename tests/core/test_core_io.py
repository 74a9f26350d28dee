"""The core against real fds: short writes, EAGAIN, EINTR, EPIPE, sockets, threads."""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from qfram import wire

from conftest import PAGE, Drain, fill_pages, private_anon


def page_stream(core, f, npages: int = 256):
    mm = private_anon(npages * PAGE)
    fill_pages(mm, npages)
    f.save_pages(mm, idstr="pc.ram")
    return mm


def expected_stream(core, npages: int = 256) -> bytes:
    f = core.buffer_file()
    page_stream(core, f, npages)
    f.flush()
    return f.channel.getvalue()


def test_short_writes_on_a_non_blocking_socket_are_retried(core):
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)     # tiny: every writev is short
    a.setblocking(False)
    drain = Drain(b.fileno(), delay_per_read=0.0005, chunk=3000)
    f = core.socket_file(a, "wb", socket_buffer=None)
    page_stream(core, f)
    f.close()
    b.shutdown(socket.SHUT_WR)
    got = drain.result()
    b.close()
    assert got == expected_stream(core)
    assert f.writev_calls > 10          # it really was written in many short pieces


def test_eintr_from_a_signal_is_retried_and_the_handler_runs(core):
    r, w = os.pipe()
    hits = []
    old = signal.signal(signal.SIGALRM, lambda *a: hits.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        drain = Drain(r, delay_per_read=0.002, chunk=4096)      # slow: the writer blocks
        f = core.fdopen(w, "wb", pipe_size=None)
        page_stream(core, f, 512)
        f.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    got = drain.result()
    os.close(r)
    assert got == expected_stream(core, 512)
    assert len(hits) > 5


class Interrupted(Exception):
    pass


def test_an_exception_from_a_signal_handler_stops_the_write(core):
    r, w = os.pipe()
    armed = threading.Event()

    def interrupt(*a):
        if armed.is_set():        # a SIGALRM left over from another test is ignored
            raise Interrupted

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        f = core.fdopen(w, "wb", pipe_size=None)     # nobody reads: the writer blocks
        armed.set()
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupted):
            page_stream(core, f, 256)
            f.flush()
    finally:
        armed.clear()
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert f.get_error() == -errno.EINTR
    os.close(r)
    with pytest.raises(OSError):
        f.close()


def test_a_closed_reader_is_a_broken_pipe(core):
    r, w = os.pipe()
    os.close(r)
    f = core.fdopen(w, "wb")
    f.put_buffer(b"x" * 100)
    with pytest.raises(BrokenPipeError) as info:
        f.flush()
    assert "writev" in str(info.value) and info.value.errno == errno.EPIPE
    with pytest.raises(BrokenPipeError):
        f.close()


def test_the_gil_is_released_while_a_write_blocks(core):
    # The drainer is a Python thread: if the writer held the GIL while blocked in
    # writev on a full pipe, nothing would ever drain it.
    r, w = os.pipe()
    drain = Drain(r, chunk=65536)
    f = core.fdopen(w, "wb", pipe_size=None)
    page_stream(core, f, 2048)        # 8 MiB through a 64 KiB pipe
    f.close()
    assert len(drain.result()) > 2048 * PAGE
    os.close(r)


def test_the_gil_is_released_while_a_read_blocks(core):
    r, w = os.pipe()
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.0002)

    t = threading.Thread(target=ticker, daemon=True)
    t.start()
    reader = core.fdopen(r, "rb")
    mm = private_anon(64 * PAGE)

    def writer():
        time.sleep(0.2)
        os.write(w, b"\x00" * 8)
        os.close(w)

    threading.Thread(target=writer, daemon=True).start()
    before = len(ticks)
    assert reader.get_be64() == 0          # blocks ~0.2 s in read(2) without the GIL
    stop.set()
    assert len(ticks) - before > 20
    reader.close()
    del mm


def test_shutdown_from_another_thread_stops_a_blocked_reader(core):
    a, b = socket.socketpair()
    f = core.socket_file(a, "rb")
    threading.Timer(0.2, f.shutdown).start()
    with pytest.raises(OSError) as info:
        f.get_be64()
    assert info.value.errno == errno.EIO
    b.close()
    with pytest.raises(OSError):
        f.close()


def test_a_timeout_bounds_waiting_on_a_non_blocking_fd(core):
    a, b = socket.socketpair()
    a.setblocking(False)
    f = core.socket_file(a, "rb", timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        f.get_byte()
    assert 0.15 < time.monotonic() - t0 < 5
    b.close()
    with pytest.raises(TimeoutError):
        f.close()


def test_a_socket_return_path_talks_back_over_the_same_socket(core):
    a, b = socket.socketpair()
    src = core.socket_file(a, "wb")
    dst = core.socket_file(b, "rb")
    src.put_be32(0xC0FFEE)
    src.flush()
    assert dst.get_be32() == 0xC0FFEE
    back = dst.get_return_path()            # destination -> source
    into_src = src.get_return_path()
    assert back.is_writable() and not into_src.is_writable()
    back.put_be16(4)
    back.put_counted_string("pc.ram")
    back.flush()
    assert into_src.get_be16() == 4 and into_src.get_counted_string() == b"pc.ram"
    for f in (back, into_src, src, dst):
        f.close()


def test_a_pipe_has_no_return_path(core):
    r, w = os.pipe()
    f = core.fdopen(w, "wb")
    assert f.get_return_path() is None
    f.close()
    os.close(r)


def test_pipes_are_grown_for_fewer_wake_ups(core):
    import fcntl
    r, w = os.pipe()
    f = core.fdopen(w, "wb")
    assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) >= 1 << 20
    f.close()
    os.close(r)


def test_socket_buffers_are_grown_and_never_shrunk(core):
    a, b = socket.socketpair()
    f = core.socket_file(a, "wb")
    assert a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 4 << 20
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    before = b.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    g = core.fdopen(os.dup(b.fileno()), "rb")
    assert b.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == before
    for x in (f, g):
        x.close()
    b.close()


def test_a_regular_file_round_trips_a_large_stream(core, tmp_path):
    path = tmp_path / "stream"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    f = core.fdopen(fd, "wb")
    mm = page_stream(core, f, 1024)
    f.put_be64(wire.RAM_SAVE_FLAG_EOS)
    f.close()
    data = path.read_bytes()
    expected = expected_stream(core, 1024) + wire.RAM_SAVE_FLAG_EOS.to_bytes(8, "big")
    assert hashlib.sha256(data).digest() == hashlib.sha256(expected).digest()
    r = core.fdopen(os.open(path, os.O_RDONLY), "rb")
    header = r.get_be64()
    assert r.get_counted_string() == b"pc.ram"
    target = private_anon(len(mm))
    nxt, pages, zeros = r.load_pages(target, header)
    assert (nxt, pages, zeros) == (wire.RAM_SAVE_FLAG_EOS, 1024, 0)
    assert target[:] == mm[:]
    r.close()


def test_one_thread_at_a_time(core):
    r, w = os.pipe()
    f = core.fdopen(r, "rb")
    errors = []

    def reader():
        try:
            f.get_byte()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.2)                      # the thread is blocked inside get_byte
    with pytest.raises(RuntimeError, match="another thread"):
        f.get_byte()
    os.write(w, b"\x01")
    t.join(5)
    assert not errors
    os.close(w)
    f.close()
