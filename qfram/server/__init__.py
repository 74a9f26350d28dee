"""The host page server: one snapshot, many restores.

``serve(snapshot, socket_path)`` opens the snapshot once, keeps one decoded, verified
copy of each chunk it has been asked for in a memfd (qfram.server.cache), and serves any
number of clients on a unix socket (qfram.server.daemon); each client — ``qfram load
--lazy --server``, ``LazyRestore(path, server=...)``, ``qfram restore-qemu --server`` —
maps that cache copy-on-write, so the pages no clone writes exist once.  The protocol is
qfram.format.pageserver's; the chunk sources (chunked or mapped file, S3 store)
qfram.server.sources'.
"""
from __future__ import annotations

from typing import Optional

from qfram.results import ServeStats
from qfram.server.daemon import PageServer
from qfram.server.sources import ChunkSource, open_source

__all__ = ["serve", "PageServer", "ChunkSource", "open_source"]


def serve(snapshot: str, socket_path: str, *, memory_limit: int = 0,
          threads: Optional[int] = None, idle_exit: Optional[float] = None,
          group: Optional[str] = None, on_ready=None, private: bool = False,
          **store_options) -> ServeStats:
    """Serve ``snapshot`` on ``socket_path`` until SIGTERM (clients are told why) or
    ``idle_exit`` seconds without a client.  ``memory_limit``: at most this many bytes
    of decoded chunks (0: the whole RAM); ``group``: members of this group may connect
    too (the socket is made 0660); ``on_ready``: called once the socket listens.
    ``private``: serve one client (a lazy restore of an ``s3://`` snapshot starts such a
    server for itself): stop when it leaves.  ``store_options``: ``endpoint``, ``cache``
    (qfram.store), for an ``s3://`` snapshot; ``threads`` defaults to what the source
    wants (2 decoders for a file, 16 fetchers for a store)."""
    source = open_source(snapshot, **store_options)
    try:
        server = PageServer(source, socket_path, memory_limit=memory_limit,
                            threads=threads or getattr(source, "threads", 2),
                            idle_exit=idle_exit, group=group, private=private)
    except BaseException:
        source.close()
        raise
    if on_ready is not None:
        on_ready(server)
    return server.serve()
