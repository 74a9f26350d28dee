"""Bare RAM page records (QEMU's RAM record format, no savevm framing) of one region into
a file or pipe — ``qfram stream``.  With release on a file, a page goes only once its
bytes are durable there (qfram.io.durable), and comes back from the file should the
stream fail."""
from __future__ import annotations

import functools
from typing import Tuple

from qfram import wire
from qfram.errors import StreamEnded
from qfram.io import channel
from qfram.io.durable import DurableRelease
from qfram.ram import RAMBlock

STREAM_WINDOW_PAGES = (32 << 20) // 4096    # records made durable, then released


def stream_records(out, region, idstr: str, release: bool,
                   durable: bool) -> Tuple[int, int, int]:
    """RAM page records of ``region`` then EOS.  ``release`` on a pipe or socket: each
    page goes once written (the reader has it).  On a file (``durable``) a page goes
    only once its bytes are fdatasync'd (qfram.io.durable); should the stream fail later,
    every released page is read back from the file first.  Returns (pages, zero pages,
    bytes released)."""
    if not (release and durable):
        pages, zeros, _ = out.save_pages(region, may_free=release, idstr=idstr)
        out.put_be64(wire.RAM_SAVE_FLAG_EOS)
        out.flush()
        return pages, zeros, out.released_bytes
    fd = out.channel.fd
    block = RAMBlock.from_buffer(idstr, region)
    releaser = DurableRelease(True)
    pages = zeros = 0
    try:
        for first in range(0, block.npages, STREAM_WINDOW_PAGES):
            count = min(STREAM_WINDOW_PAGES, block.npages - first)
            start = out.tell_fast()
            p, z, _ = out.save_pages(region, first, count, idstr=idstr if first == 0 else None,
                                     flags=wire.RAM_SAVE_FLAG_CONTINUE if first else 0)
            pages, zeros = pages + p, zeros + z
            out.flush()
            releaser.written(fd, block, first, count,
                             functools.partial(_read_records_back, region=region,
                                               offset=start), start, out.tell() - start)
        out.put_be64(wire.RAM_SAVE_FLAG_EOS)
        out.flush()
        releaser.finish(fd)
    except BaseException as exc:
        releaser.undo(fd, exc)
        raise
    return pages, zeros, releaser.bytes


def _read_records_back(fd: int, region, offset: int) -> None:
    """Place the page records a failed stream left in the file ``fd`` from ``offset`` on
    back into ``region`` (up to where the file ends)."""
    back = channel.fdopen(fd, "rb", owned=False)
    back.set_offset(offset)
    header = back.get_be64()
    if not header & wire.RAM_SAVE_FLAG_CONTINUE:
        back.get_counted_string()
    try:
        back.load_pages(region, header)
        back.close()
    except StreamEnded:
        pass                            # the records stop where the failure did

