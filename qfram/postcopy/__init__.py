"""Postcopy RAM streaming: precopy rounds, then demand paging over a return path.

``send(ram, "host:port")`` and ``receive("host:port")`` (or a unix socket path) move a
program's RAM to another process or host while it keeps running; ``Source`` and
``Destination`` are the same with every knob.
"""
from __future__ import annotations

import os
import socket
from typing import Tuple

from qfram.postcopy.destination import Destination, MigrationFailed
from qfram.postcopy.source import Source
from qfram.postcopy.workload import Workload

__all__ = ["Source", "Destination", "Workload", "MigrationFailed", "send", "receive",
           "parse_address", "listen", "connect"]

def parse_address(text: str) -> Tuple[int, object]:
    """'host:port' -> (AF_INET/AF_INET6, (host, port)); a path -> (AF_UNIX, path)."""
    if "/" in text or ":" not in text:
        return socket.AF_UNIX, text
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


def listen(address: str) -> socket.socket:
    family, addr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_UNIX:
        if os.path.exists(addr):      # type: ignore[arg-type]
            os.unlink(addr)           # type: ignore[arg-type]
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(1)
    return sock


def connect(address: str, timeout: float = 30.0) -> socket.socket:
    family, addr = parse_address(address)
    sock = socket.create_connection(addr, timeout=timeout) if family != socket.AF_UNIX \
        else socket.socket(socket.AF_UNIX)
    if family == socket.AF_UNIX:
        sock.settimeout(timeout)
        sock.connect(addr)
    sock.settimeout(None)
    if family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send(ram, address: str, preempt: bool = True, **options):
    """Migrate ``ram`` to the destination listening at ``address`` (with a preempt
    channel for requested pages unless ``preempt=False``; the destination must agree)."""
    sock = connect(address)
    second = connect(address) if preempt else None
    return Source(ram, sock, preempt=second, **options).run()


def receive(address: str, preempt: bool = True, timeout: float = 30.0, **options):
    """Listen at ``address`` for one migration; returns (ram, stats)."""
    server = listen(address)
    server.settimeout(None)
    conns = []
    try:
        conns.append(server.accept()[0])
        if preempt:
            server.settimeout(timeout)
            conns.append(server.accept()[0])
    finally:
        server.close()
    for c in conns:
        if c.family != socket.AF_UNIX:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # which is which: the main channel opens with "QEVM", the preempt one with its magic
    conns.sort(key=lambda c: c.recv(4, socket.MSG_PEEK) != b"QEVM")
    dest = Destination(conns[0], preempt=conns[1] if preempt else None, timeout=timeout,
                       **options)
    stats = dest.run()
    return dest.ram, stats
