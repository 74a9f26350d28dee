"""Postcopy RAM streaming: precopy rounds, then demand paging over a return path.

``send(ram, "host:port")`` and ``receive("host:port")`` (or a unix socket path) move a
program's RAM to another process or host while it keeps running, over TLS when given a
QEMU tls-creds-x509 directory; ``Source`` and ``Destination`` are the same with every
knob, and :mod:`qfram.postcopy.link` makes their connections.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import psutil

from qfram.postcopy import link
from qfram.postcopy.destination import Destination, MigrationFailed
from qfram.postcopy.source import Source
from qfram.postcopy.workload import Workload

__all__ = ["Source", "Destination", "Workload", "MigrationFailed", "send", "receive",
           "link", "default_max_ram"]

def default_max_ram() -> int:
    """What a destination accepts by default: the memory this machine has available,
    less a tenth for everything else."""
    return int(psutil.virtual_memory().available * 0.9)


def send(ram, address: str, preempt: bool = True, *, tls_creds: Optional[str] = None,
         tls_hostname: Optional[str] = None, resume: bool = True,
         timeout: float = 30.0, **options):
    """Migrate ``ram`` to the destination listening at ``address`` (with a preempt
    channel for requested pages unless ``preempt=False``; the destination must agree).
    ``tls_creds``: a QEMU tls-creds-x509 directory: every channel is TLS, both ends
    verified.  ``resume``: a link lost after the switch is reconnected (until
    ``deadline``, else ``timeout``)."""
    security = link.Security(tls_creds, hostname=tls_hostname) if tls_creds else None

    def connect() -> link.Link:
        return link.connect(address, security, timeout)

    main = connect()
    second = connect() if preempt else None
    return Source(ram, main, preempt=second, reconnect=connect if resume else None,
                  timeout=timeout, **options).run()


def receive(address: str, preempt: bool = True, timeout: float = 30.0, *,
            tls_creds: Optional[str] = None, tls_authz: Sequence[str] = (),
            insecure: bool = False, deadline: Optional[float] = None,
            max_ram: Optional[int] = None, hello_timeout: float = link.HELLO_TIMEOUT,
            **options):
    """Listen at ``address`` for one migration; returns (ram, stats).

    Beyond loopback and unix sockets the channels must be TLS (``tls_creds``; with
    ``tls_authz`` the client subjects allowed) unless ``insecure``.  Connections that
    are not the source's channels are dropped and the listener goes on.  ``deadline``
    (seconds) bounds everything, the wait for the source included; ``max_ram`` the RAM
    it may declare (default: :func:`default_max_ram`)."""
    if tls_creds is None and not insecure and not link.is_local(address):
        raise link.LinkError(f"{address} can be reached from other machines: anyone who "
                             f"connects could write this RAM.  Give --tls-creds DIR "
                             f"(`qfram tls-init DIR` makes one), or --insecure to accept "
                             f"a migration in the clear")
    security = link.Security(tls_creds, tls_authz) if tls_creds else None
    started = time.monotonic()
    acceptor = link.Acceptor(link.listen(address), security,
                             hello_timeout=min(hello_timeout, timeout))
    try:
        main = acceptor.wait([link.MAIN], None if deadline is None else started + deadline)
        left = None if deadline is None else max(0.0, deadline - (time.monotonic() - started))
        dest = Destination(main, preempt=True if preempt else None, acceptor=acceptor,
                           timeout=timeout, deadline=left,
                           max_ram=default_max_ram() if max_ram is None else max_ram,
                           **options)
        stats = dest.run()
    finally:
        acceptor.close()
    return dest.ram, stats
