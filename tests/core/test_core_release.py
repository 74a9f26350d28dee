"""may_free: sent pages go back to the kernel — only once every byte of them is written,
with the advice their memory needs, whole pages only, and never while still queued."""
from __future__ import annotations

import mmap
import os

import pytest

from conftest import (PAGE, SEED, Drain, RecordingChannel, fill_pages, memfd_blocks,
                      memfd_region, private_anon, resident_pages)


def send_all(core, mm, npages, **params):
    """Stream every page of mm with may_free into a drained pipe; returns the bytes."""
    r, w = os.pipe()
    drain = Drain(r)
    f = core.fdopen(w, "wb", **params)
    f.save_pages(mm, 0, npages, may_free=True, idstr="ram")
    f.close()
    got = drain.result()
    os.close(r)
    return f, got


def test_private_anonymous_pages_are_freed_after_they_are_written(core):
    mm = private_anon(64 * PAGE)
    fill_pages(mm, 64)
    expected = core.buffer_file()
    expected.save_pages(bytes(mm), idstr="ram")
    expected.flush()
    assert all(resident_pages(mm))
    f, got = send_all(core, mm, 64)
    assert got == expected.channel.getvalue()        # what left is what was there
    assert not any(resident_pages(mm))               # and the memory is back
    assert f.released_bytes == 64 * PAGE


def test_memfd_pages_are_freed_with_madvise_remove(core):
    fd, mm = memfd_region(64 * PAGE)
    fill_pages(mm, 64)
    assert memfd_blocks(fd) >= 64 * PAGE
    send_all(core, mm, 64)
    assert memfd_blocks(fd) == 0                     # MADV_REMOVE punched the pages out
    mm.close()
    os.close(fd)


def test_dontneed_alone_would_free_nothing_on_a_memfd():
    # why the core does not use MADV_DONTNEED everywhere, as QEMU does
    fd, mm = memfd_region(16 * PAGE)
    fill_pages(mm, 16)
    mm.madvise(mmap.MADV_DONTNEED)
    assert memfd_blocks(fd) >= 16 * PAGE
    assert mm[0] != 0                                # the data is still there
    mm.close()
    os.close(fd)


def test_python_default_mmap_is_shared_memory_and_is_freed_too(core):
    mm = mmap.mmap(-1, 32 * PAGE)                    # MAP_SHARED|MAP_ANONYMOUS: shmem
    fill_pages(mm, 32)
    send_all(core, mm, 32)
    assert not any(resident_pages(mm))


@pytest.mark.parametrize("kind", ["anon", "memfd"])
def test_nothing_is_released_when_the_write_fails(core, kind):
    if kind == "anon":
        mm, fd = private_anon(64 * PAGE), None
    else:
        fd, mm = memfd_region(64 * PAGE)
    fill_pages(mm, 64)
    before = bytes(mm)
    r, w = os.pipe()
    os.close(r)                                       # the reader is gone: EPIPE
    f = core.fdopen(w, "wb", **SEED)
    f.save_pages(mm, may_free=True, idstr="ram")
    with pytest.raises(BrokenPipeError):
        f.close()
    assert all(resident_pages(mm))
    assert bytes(mm) == before                        # not a byte lost
    assert f.released_bytes == 0
    if fd is not None:
        assert memfd_blocks(fd) >= 64 * PAGE
        mm.close()
        os.close(fd)


def test_pages_stay_until_their_batch_is_written(core):
    mm = private_anon(16 * PAGE)
    fill_pages(mm, 16)
    ch = RecordingChannel()
    f = core.QEMUFile(ch, "wb", **SEED)
    view = memoryview(mm)
    for i in range(8):
        f.put_be64(i)
        f.put_buffer_async(view[i * PAGE:(i + 1) * PAGE], may_free=True)
    assert ch.writes == [] and all(resident_pages(mm))
    f.flush()
    assert resident_pages(mm) == [False] * 8 + [True] * 8


def test_only_whole_pages_inside_a_range_are_released(core):
    mm = private_anon(4 * PAGE)
    fill_pages(mm, 4)
    before = bytes(mm)
    f = core.buffer_file()
    f.put_buffer_async(memoryview(mm)[100:3 * PAGE + 100], may_free=True)
    f.flush()
    assert resident_pages(mm) == [True, False, False, True]
    assert mm[:PAGE] == before[:PAGE] and mm[3 * PAGE:] == before[3 * PAGE:]
    assert f.released_bytes == 2 * PAGE


def test_zero_pages_sent_as_zero_records_are_released_too(core):
    mm = private_anon(8 * PAGE)
    for i in range(8):
        mm[i * PAGE] = 0                             # touched, all zero
    assert all(resident_pages(mm))
    f = core.buffer_file()
    pages, zeros, _ = f.save_pages(mm, may_free=True, idstr="ram")
    f.flush()
    assert (pages, zeros) == (0, 8) and not any(resident_pages(mm))


def test_releases_are_batched_into_large_runs(core):
    npages = 2048                                     # 8 MiB
    mm = private_anon(npages * PAGE)
    fill_pages(mm, npages)
    tuned, _ = send_all(core, mm, npages)
    mm2 = private_anon(npages * PAGE)
    fill_pages(mm2, npages)
    seed, _ = send_all(core, mm2, npages, **SEED)
    assert tuned.released_bytes == seed.released_bytes == npages * PAGE
    assert tuned.release_calls <= 5                   # >= 2 MiB per madvise
    assert seed.release_calls >= npages // 32         # QEMU: one per 64-iovec flush


def test_queued_memory_cannot_be_closed_under_the_file(core):
    mm = private_anon(4 * PAGE)
    fill_pages(mm, 4)
    f = core.buffer_file()
    f.put_buffer_async(mm)
    with pytest.raises(BufferError):
        mm.close()
    f.flush()
    mm.close()                                        # written: the export is gone


def test_an_open_release_run_keeps_its_memory_exported_until_flush(core):
    # Internal flushes leave a short run open (it coalesces with the next batch); the
    # memory stays exported so a released address can never belong to a new mapping.
    mm = private_anon(64 * PAGE)
    fill_pages(mm, 64)
    ch = RecordingChannel()
    f = core.QEMUFile(ch, "wb", iov_max=4, release_min=1 << 30)
    view = memoryview(mm)
    for i in range(8):
        f.put_be64(i)
        f.put_buffer_async(view[i * PAGE:(i + 1) * PAGE], may_free=True)
    del view
    assert ch.writes and f.pending_iovecs < 4
    assert f.released_bytes == 0 and f.pending_pins > 0
    with pytest.raises(BufferError):
        mm.close()
    f.flush()
    assert f.released_bytes == 8 * PAGE and f.pending_pins == 0
    mm.close()


def test_a_failed_batch_gives_its_exports_back(core):
    mm = private_anon(4 * PAGE)
    fill_pages(mm, 4)
    r, w = os.pipe()
    os.close(r)
    f = core.fdopen(w, "wb")
    f.put_buffer_async(mm, may_free=True)
    with pytest.raises(BrokenPipeError):
        f.flush()
    assert f.pending_pins == 0
    mm.close()
    with pytest.raises(BrokenPipeError):
        f.close()


def test_a_region_stays_exported_while_its_page_loop_runs(core):
    # flushes inside the loop give pins back; the loop's own export must still hold the
    # region, or another thread could unmap it under the running loop
    import threading
    import time
    mm = private_anon(1024 * PAGE)
    fill_pages(mm, 1024)
    r, w = os.pipe()
    drain = Drain(r, delay_per_read=0.001, chunk=65536)
    f = core.fdopen(w, "wb", pipe_size=None, **SEED)
    t = threading.Thread(target=f.save_pages, args=(mm,), kwargs={"idstr": "ram"})
    t.start()
    refused = 0
    while t.is_alive():
        try:
            mm.close()
        except BufferError:
            refused += 1
        time.sleep(0.001)
    t.join()
    assert refused > 0 and not mm.closed
    f.close()
    drain.result()
    os.close(r)
    mm.close()
