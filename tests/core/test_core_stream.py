"""The QEMUFile API: every put has its get, QEMU's flush points, errors, state, hooks."""
from __future__ import annotations

import errno
import io
import os
import zlib

import pytest

from conftest import PAGE, SEED, RecordingChannel, private_anon
from qfram import FormatError, QFramError, StreamEnded, wire


def write_then_read(core, put, **params):
    f = core.buffer_file(**params)
    put(f)
    f.flush()
    data = f.channel.getvalue()
    return data, core.buffer_file(data, **params)


def test_every_put_reads_back_with_its_get(core):
    mm = private_anon(2 * PAGE)
    mm[:PAGE] = b"\xab" * PAGE

    def put(f):
        f.put_byte(0x1FF)            # the low 8 bits, as QEMU
        f.put_be16(0xBEEF)
        f.put_be32(0xDEADBEEF)
        f.put_be64(0x0123456789ABCDEF)
        f.put_buffer(b"copied")
        f.put_buffer_async(memoryview(mm)[:PAGE])
        f.put_counted_string("pc.ram")
        f.put_counted_string(b"")
        f.put_compression_data(b"squeeze me " * 300)

    data, r = write_then_read(core, put)
    assert r.get_byte() == 0xFF
    assert r.get_be16() == 0xBEEF
    assert r.get_be32() == 0xDEADBEEF
    assert r.get_be64() == 0x0123456789ABCDEF
    assert r.get_buffer(6) == b"copied"
    page = bytearray(PAGE)
    assert r.get_buffer_into(page) == PAGE and page == b"\xab" * PAGE
    assert r.get_counted_string() == b"pc.ram"
    assert r.get_counted_string() == b""
    n = r.get_be32()
    assert zlib.decompress(r.get_buffer(n)) == b"squeeze me " * 300
    assert r.tell() == len(data)
    with pytest.raises(StreamEnded):
        r.get_byte()


def test_integers_are_big_endian_on_the_wire(core):
    data, _ = write_then_read(core, lambda f: (f.put_be16(0x0102), f.put_be32(0x03040506),
                                               f.put_be64(0x0708090A0B0C0D0E)))
    assert data == bytes(range(1, 15))


def test_peek_does_not_consume_and_skip_does(core):
    _, r = write_then_read(core, lambda f: f.put_buffer(bytes(range(100))))
    assert r.peek_byte() == 0
    assert r.peek_byte(50) == 50
    assert r.peek_buffer(4, 10) == bytes([10, 11, 12, 13])
    r.skip(20)
    assert r.get_byte() == 20
    assert r.tell() == 21


def test_get_buffer_in_place_is_a_view_of_the_staging_buffer(core):
    _, r = write_then_read(core, lambda f: f.put_buffer(b"0123456789" * 10))
    view = r.get_buffer_in_place(10)
    assert view.readonly and bytes(view) == b"0123456789"
    big = r.get_buffer_in_place(90)
    assert bytes(big) == b"0123456789" * 9


def test_reads_bigger_than_the_buffer_span_refills(core):
    payload = os.urandom(200_000)
    _, r = write_then_read(core, lambda f: f.put_buffer(payload), buf_size=4096)
    assert r.get_buffer(len(payload)) == payload


def test_a_short_stream_is_reported_not_zero_filled(core):
    _, r = write_then_read(core, lambda f: f.put_buffer(b"abc"))
    with pytest.raises(StreamEnded) as info:
        r.get_be32()
    assert info.value.offset == 0 and info.value.wanted == 4 and info.value.got == 3
    assert isinstance(info.value, EOFError) and isinstance(info.value, OSError)
    assert isinstance(info.value, QFramError)
    assert r.get_error() == -errno.EIO          # sticky, as in QEMU
    with pytest.raises(StreamEnded):
        r.get_byte()


def test_get_buffer_into_reports_how_much_did_arrive(core):
    _, r = write_then_read(core, lambda f: f.put_buffer(b"x" * 10))
    buf = bytearray(16)
    with pytest.raises(StreamEnded) as info:
        r.get_buffer_into(buf)
    assert info.value.got == 10 and buf[:10] == b"x" * 10


def test_counted_strings_hold_at_most_255_bytes(core):
    f = core.buffer_file()
    f.put_counted_string("a" * 255)
    with pytest.raises(ValueError, match="255"):
        f.put_counted_string("a" * 256)
    f.flush()
    assert f.channel.getvalue() == b"\xff" + b"a" * 255


def test_mode_is_checked_like_qemu_file_mode_is_not_valid(core):
    for mode in ("r", "w", "rw", "wbx", "ab", "", "rb+"):
        with pytest.raises(ValueError, match="mode"):
            core.buffer_file(mode=mode)
    assert core.buffer_file().is_writable()
    assert not core.buffer_file(b"", mode="rb").is_writable()


def test_a_file_only_goes_one_way(core):
    w = core.buffer_file()
    with pytest.raises(io.UnsupportedOperation):
        w.get_byte()
    r = core.buffer_file(b"x")
    with pytest.raises(io.UnsupportedOperation):
        r.put_byte(1)


def test_closed_file_refuses_work(core):
    f = core.buffer_file()
    f.put_buffer(b"abc")
    f.close()
    assert f.closed and f.tell() == 3           # the count survives the file
    with pytest.raises(ValueError, match="closed"):
        f.put_byte(1)
    f.close()       # closing twice is harmless


# -- flush points ---------------------------------------------------------------------------


def test_a_buffer_exactly_full_is_flushed_at_once(core):
    ch = RecordingChannel()
    f = core.QEMUFile(ch, "wb", **SEED)
    f.put_buffer(b"\x01" * (32768 - 1))
    assert ch.writes == []
    f.put_byte(2)
    assert ch.writes == [32768]
    assert f.tell_fast() == 32768 and f.pending_iovecs == 0


def test_the_64th_iovec_flushes_the_batch(core):
    ch = RecordingChannel()
    f = core.QEMUFile(ch, "wb", **SEED)
    mm = private_anon(128 * PAGE)
    view = memoryview(mm)
    for i in range(63):                      # every other page: never adjacent
        f.put_buffer_async(view[2 * i * PAGE:(2 * i + 1) * PAGE])
    assert ch.writes == [] and f.pending_iovecs == 63
    f.put_buffer_async(view[126 * PAGE:127 * PAGE])
    assert ch.writes == [64 * PAGE] and ch.iovecs == [64]
    assert f.pending_iovecs == 0


def test_a_full_gather_list_can_flush_in_the_middle_of_a_header(core):
    # QEMU puts integers byte by byte: the byte that makes the 64th iovec flushes alone
    ch = RecordingChannel()
    f = core.QEMUFile(ch, "wb", **SEED)
    mm = private_anon(128 * PAGE)
    view = memoryview(mm)
    for i in range(63):
        f.put_buffer_async(view[2 * i * PAGE:2 * i * PAGE + 16])
    f.put_be64(0x1122334455667788)
    assert ch.writes == [63 * 16 + 1]
    f.flush()
    assert ch.writes == [63 * 16 + 1, 7]
    assert ch.data[-8:] == bytes.fromhex("1122334455667788")


def test_adjacent_iovecs_coalesce_only_when_may_free_agrees(core):
    ch = RecordingChannel()
    f = core.QEMUFile(ch, "wb", **SEED)
    mm = private_anon(8 * PAGE)
    view = memoryview(mm)
    f.put_buffer_async(view[0:PAGE])
    f.put_buffer_async(view[PAGE:2 * PAGE])                       # adjacent: merged
    assert f.pending_iovecs == 1
    f.put_buffer_async(view[2 * PAGE:3 * PAGE], may_free=True)    # adjacent, differs
    assert f.pending_iovecs == 2
    f.put_buffer_async(view[3 * PAGE:4 * PAGE], may_free=True)    # adjacent, agrees
    assert f.pending_iovecs == 2
    f.put_buffer_async(view[5 * PAGE:6 * PAGE], may_free=True)    # a gap
    assert f.pending_iovecs == 3
    f.flush()
    assert ch.iovecs == [3]


def test_small_puts_coalesce_in_the_staging_buffer(core):
    ch = RecordingChannel()
    f = core.QEMUFile(ch, "wb", **SEED)
    for i in range(1000):
        f.put_be32(i)
    assert f.pending_iovecs == 1
    f.flush()
    assert ch.writes == [4000] and ch.iovecs == [1]


def test_qfram_defaults_batch_more_but_send_the_same_bytes(core):
    def stream(**params):
        ch = RecordingChannel()
        f = core.QEMUFile(ch, "wb", **params)
        mm = private_anon(300 * PAGE)
        for i in range(300):
            mm[i * PAGE] = i % 255 + 1
        f.save_pages(mm, idstr="pc.ram")
        f.flush()
        return ch
    seed, tuned = stream(**SEED), stream()
    assert seed.data == tuned.data
    assert len(tuned.writes) < len(seed.writes)


# -- position, rate limiting, errors --------------------------------------------------------


def test_tell_flushes_and_tell_fast_counts_what_is_queued(core):
    ch = RecordingChannel()
    f = core.QEMUFile(ch, "wb")
    f.put_buffer(b"x" * 100)
    assert f.tell_fast() == 100 and ch.writes == []
    assert f.tell() == 100 and ch.writes == [100]
    f.update_position(4096)                 # bytes sent by other means
    assert f.tell() == 4196


def test_rate_limit_counts_every_put_byte(core):
    f = core.buffer_file()
    f.set_rate_limit(1000)
    assert f.get_rate_limit() == 1000
    f.put_buffer(b"x" * 999)
    f.put_byte(1)
    assert f.rate_limit_used == 1000 and not f.rate_limited()
    f.put_be16(1)
    assert f.rate_limited()
    f.reset_rate_limit()
    assert not f.rate_limited()
    f.acct_rate_limit(1001)
    assert f.rate_limited()
    f.set_rate_limit(0)                      # no limit
    assert not f.rate_limited()


def test_an_error_makes_the_file_rate_limited(core):
    f = core.buffer_file()
    f.set_error(-errno.EIO)
    assert f.rate_limited()


def test_the_first_error_wins_and_later_puts_are_no_ops(core):
    ch = RecordingChannel()
    f = core.QEMUFile(ch, "wb")
    f.put_byte(1)
    f.set_error(-errno.ENOSPC, "disk full")
    f.set_error(-errno.EPIPE)
    assert f.get_error() == -errno.ENOSPC
    f.put_buffer(b"ignored")
    f.put_be64(5)
    with pytest.raises(OSError) as info:
        f.flush()
    assert info.value.errno == errno.ENOSPC and "disk full" in str(info.value)
    with pytest.raises(OSError):
        f.close()
    assert ch.data == b""                    # the failed batch was dropped, as QEMU


def test_shutdown_sets_the_error_before_stopping_the_channel(core):
    f = core.buffer_file()
    assert f.shutdown() is False             # memory cannot be shut down...
    assert f.get_error() == -errno.EIO       # ...but the file is stopped anyway
    assert f.rate_limited()


# -- moving data between files ----------------------------------------------------------------


def test_put_qemu_file_moves_everything_queued(core):
    mm = private_anon(PAGE)
    mm[:] = b"p" * PAGE
    src = core.buffer_file()
    src.put_be32(7)
    src.put_buffer_async(mm, may_free=True)
    dst = core.buffer_file()
    dst.put_byte(1)
    assert dst.put_qemu_file(src) == 4 + PAGE
    assert src.pending_iovecs == 0 and src.tell_fast() == 0
    dst.flush()
    assert dst.channel.getvalue() == b"\x01\x00\x00\x00\x07" + b"p" * PAGE
    assert mm[:1] == b"p"                    # copied, so never released from src
    src.flush()
    assert src.channel.getvalue() == b""


def test_a_buffer_file_reads_back_through_its_return_path(core):
    f = core.buffer_file()
    f.put_counted_string("hello")
    f.flush()
    back = f.get_return_path()
    assert back.get_counted_string() == b"hello"


def test_an_object_channel_adapts_any_writer_and_reader(core):
    sink = io.BytesIO()
    f = core.object_file(sink, "wb")
    f.put_be32(42)
    f.put_buffer(b"abc")
    f.close()
    assert sink.getvalue() == b"\x00\x00\x00\x2aabc"
    r = core.object_file(io.BytesIO(sink.getvalue()), "rb")
    assert r.get_be32() == 42 and r.get_buffer(3) == b"abc"


def test_a_channel_error_is_sticky_and_raised_with_its_errno(core):
    class Full:
        fd = -1

        def writev(self, views):
            raise OSError(errno.ENOSPC, "no room")
    f = core.QEMUFile(Full(), "wb")
    f.put_buffer(b"x" * 10)
    with pytest.raises(OSError) as info:
        f.flush()
    assert info.value.errno == errno.ENOSPC
    assert f.get_error() == -errno.ENOSPC


def test_a_channel_bug_is_raised_not_swallowed(core):
    class Broken:
        fd = -1

        def writev(self, views):
            raise ZeroDivisionError("bug in the channel")
    f = core.QEMUFile(Broken(), "wb", iov_max=2)
    mm = private_anon(4 * PAGE)
    f.put_buffer_async(memoryview(mm)[:PAGE])
    with pytest.raises(ZeroDivisionError):
        f.put_buffer_async(memoryview(mm)[2 * PAGE:3 * PAGE])
    assert f.get_error() == -errno.EIO


# -- hooks ------------------------------------------------------------------------------------


def test_iterate_hooks_run_and_a_negative_result_sets_the_error(core):
    calls = []
    f = core.buffer_file()
    f.set_hooks(before_ram_iterate=lambda file, flags, data: calls.append(("before", flags)) or 0,
                after_ram_iterate=lambda file, flags, data: -errno.EPROTO)
    f.ram_control_before_iterate(wire.RAM_CONTROL_ROUND)
    assert calls == [("before", 1)] and f.get_error() == 0
    f.ram_control_after_iterate(wire.RAM_CONTROL_FINISH)
    assert f.get_error() == -errno.EPROTO


def test_a_hook_record_without_a_load_hook_is_an_error(core):
    f = core.buffer_file(b"", mode="rb")
    f.ram_control_load_hook(wire.RAM_CONTROL_ROUND)      # other flags: nothing to do
    assert f.get_error() == 0
    f.ram_control_load_hook(wire.RAM_CONTROL_HOOK)
    assert f.get_error() == -errno.EINVAL


def test_a_load_hook_receives_flags_and_data(core):
    seen = []
    f = core.buffer_file(b"", mode="rb")
    f.set_hooks(hook_ram_load=lambda file, flags, data: seen.append((flags, data)) or 0)
    f.ram_control_load_hook(wire.RAM_CONTROL_HOOK, "payload")
    assert seen == [(2, "payload")] and f.get_error() == 0


def test_save_page_hook_takes_pages_and_is_credited(core):
    taken = []

    def save_page(file, block_offset, offset, size):
        if offset == 0:
            return wire.RAM_SAVE_CONTROL_NOT_SUPP, 0    # let the file send it
        taken.append(offset)
        return 0, size                                        # sent by the hook

    f = core.buffer_file()
    f.set_hooks(save_page=save_page)
    mm = private_anon(3 * PAGE)
    mm[:] = b"\x05" * (3 * PAGE)
    pages, zeros, nxt = f.save_pages(mm, idstr="pc.ram")
    assert (pages, zeros, nxt) == (1, 0, 3) and taken == [PAGE, 2 * PAGE]
    assert f.rate_limit_used >= 3 * PAGE
    f.flush()
    assert f.tell() == len(f.channel.getvalue()) + 2 * PAGE


def test_a_failing_save_page_hook_sets_the_error(core):
    f = core.buffer_file()
    f.set_hooks(save_page=lambda *a: (-errno.EIO, 0))
    ret, sent = f.ram_control_save_page(0, 0, PAGE)
    assert ret == -errno.EIO and f.get_error() == -errno.EIO


def test_format_errors_are_value_errors_with_an_offset():
    err = FormatError("bad flags", 12)
    assert isinstance(err, ValueError) and err.offset == 12 and "byte 12" in str(err)
