"""The TLS channel under the core, as a migration uses it: a bulk stream one way and
small messages the other way at the same time, both intact — through socket buffers so
small that nearly every gathered send stops half way and is finished by a later call."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from qfram import backend
from qfram.postcopy.link import TLSChannel

_tls = pytest.importorskip("qfram._tls")


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    path = tmp_path_factory.mktemp("tls") / "creds"
    subprocess.run([sys.executable, "-m", "qfram", "tls-init", str(path)], check=True,
                   capture_output=True)
    return str(path)


def connected(creds: str, buffer: int):
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        s.setblocking(False)
    server = _tls.TLSConnection(_tls.TLSContext(creds, True), a)
    client = _tls.TLSConnection(_tls.TLSContext(creds, False), b)
    done = threading.Thread(target=server.handshake, args=(10.0,))
    done.start()
    client.handshake(10.0)
    done.join()
    return server, client


def files(conn, mode: str):
    """A file over the connection, and its return path (as a migration's channel)."""
    f = backend.QEMUFile(TLSChannel(conn), mode, timeout=30)
    return f, f.get_return_path()


@pytest.mark.parametrize("buffer", [4096, 1 << 20])
def test_a_stream_and_its_return_path_cross_intact(creds, buffer):
    server, client = connected(creds, buffer)
    data = os.urandom(8 << 20)
    messages = [os.urandom(n) for n in range(1, 200)]
    out, out_back = files(client, "wb")        # the source: stream out, messages in
    into, into_back = files(server, "rb")      # the destination: stream in, messages out
    got, heard = bytearray(), []

    def destination() -> None:
        for i, m in enumerate(messages):
            into_back.put_buffer(m)
            into_back.flush()
            got.extend(into.get_buffer(len(data) // len(messages)))
        got.extend(into.get_buffer(len(data) - len(got)))

    def source_listens() -> None:
        for m in messages:
            heard.append(out_back.get_buffer(len(m)))

    threads = [threading.Thread(target=destination), threading.Thread(target=source_listens)]
    for t in threads:
        t.start()
    for i in range(0, len(data), 3000):        # pieces that are not whole records
        out.put_buffer(data[i:i + 3000])
    out.flush()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert bytes(got) == data
    assert heard == messages
    for f in (out, out_back, into, into_back):
        f.close()
    client.close()
    server.close()
