"""The batch path: save_pages / load_pages emit and place RAM page records in C."""
from __future__ import annotations

import struct

import pytest

from conftest import PAGE, fill_pages, private_anon, resident_pages
from qfram import FormatError, StreamEnded

ZERO, PAGE_FLAG, EOS, CONT = 0x02, 0x08, 0x10, 0x20


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def test_page_records_are_byte_exact(core):
    # written by hand from the format: first record carries the block name, the rest
    # CONTINUE; an all-zero page is a ZERO record with one 0 byte
    mm = private_anon(3 * PAGE)
    mm[:PAGE] = b"A" * PAGE
    mm[2 * PAGE:] = b"C" * PAGE
    f = core.buffer_file()
    assert f.save_pages(mm, idstr="pc.ram") == (2, 1, 3)
    f.put_be64(EOS)
    f.flush()
    expected = (be64(0 | PAGE_FLAG) + b"\x06pc.ram" + b"A" * PAGE
                + be64(PAGE | CONT | ZERO) + b"\x00"
                + be64(2 * PAGE | CONT | PAGE_FLAG) + b"C" * PAGE
                + be64(EOS))
    assert f.channel.getvalue() == expected


def test_header_base_and_flags_place_a_sub_range(core):
    mm = private_anon(4 * PAGE)
    fill_pages(mm, 4)
    f = core.buffer_file()
    f.save_pages(mm, 2, 2, header_base=0x100000, flags=CONT)
    f.flush()
    data = f.channel.getvalue()
    assert data[:8] == be64((0x100000 + 2 * PAGE) | CONT | PAGE_FLAG)
    assert data[8:8 + PAGE] == mm[2 * PAGE:3 * PAGE]
    assert data[8 + PAGE:16 + PAGE] == be64((0x100000 + 3 * PAGE) | CONT | PAGE_FLAG)


def test_without_zero_detection_every_page_is_sent(core):
    mm = private_anon(4 * PAGE)
    f = core.buffer_file()
    assert f.save_pages(mm, flags=CONT, detect_zero=False) == (4, 0, 4)


def test_pages_round_trip_through_load_pages(core):
    n = 300
    src = private_anon(n * PAGE)
    for i in range(n):
        if i % 3:
            src[i * PAGE:(i + 1) * PAGE] = bytes([i % 200 + 1]) * PAGE
    f = core.buffer_file(buf_size=1000)         # pages straddle every refill
    f.save_pages(src, idstr="pc.ram")
    f.put_be64(EOS)
    f.flush()
    r = core.buffer_file(f.channel.getvalue(), buf_size=1000)
    header = r.get_be64()
    assert r.get_counted_string() == b"pc.ram"
    dst = private_anon(n * PAGE)
    assert r.load_pages(dst, header) == (EOS, 200, 100)
    assert dst[:] == src[:]


def test_zero_records_leave_untouched_memory_untouched(core):
    src = private_anon(64 * PAGE)
    src[10 * PAGE] = 1
    f = core.buffer_file()
    f.save_pages(src, idstr="b")
    f.put_be64(EOS)
    f.flush()
    r = core.buffer_file(f.channel.getvalue())
    dst = private_anon(64 * PAGE)
    touched = bytearray(8)                          # all 64 pages are new, zero memory
    received = bytearray(8)
    header = r.get_be64()
    r.get_counted_string()
    assert r.load_pages(dst, header, touched=touched, received=received) == (EOS, 1, 63)
    resident = resident_pages(dst)
    assert resident[10] and sum(resident) == 1     # zero pages never even read
    assert touched == (1 << 10).to_bytes(8, "little")   # only the data page was written
    assert received == b"\xff" * 8                  # every page is placed now


def test_zero_records_clear_a_dirty_target(core):
    f = core.buffer_file()
    f.save_pages(private_anon(2 * PAGE), idstr="b")
    f.put_be64(EOS)
    f.flush()
    r = core.buffer_file(f.channel.getvalue())
    dst = private_anon(2 * PAGE)
    dst[:] = b"\xff" * (2 * PAGE)
    header = r.get_be64()
    r.get_counted_string()
    r.load_pages(dst, header)
    assert dst[:] == bytes(2 * PAGE)


def test_the_dirty_bitmap_selects_pages_and_is_cleared(core):
    n = 200
    mm = private_anon(n * PAGE)
    fill_pages(mm, n)
    dirty = bytearray(n // 8)
    chosen = {3, 64, 65, 130, 199}
    for i in chosen:
        dirty[i >> 3] |= 1 << (i & 7)
    f = core.buffer_file()
    assert f.save_pages(mm, flags=CONT, dirty=dirty) == (5, 0, n)
    assert dirty == bytearray(n // 8)
    f.put_be64(EOS)
    f.flush()
    r = core.buffer_file(f.channel.getvalue())
    dst = private_anon(n * PAGE)
    assert r.load_pages(dst) == (EOS, 5, 0)
    for i in range(n):
        page = slice(i * PAGE, (i + 1) * PAGE)
        assert (dst[page] == mm[page]) == (i in chosen)


def test_a_rate_limited_loop_stops_and_resumes(core):
    mm = private_anon(10 * PAGE)
    fill_pages(mm, 10)
    f = core.buffer_file()
    f.set_rate_limit(3 * PAGE)
    pages, zeros, nxt = f.save_pages(mm, flags=CONT, stop_when_rate_limited=True)
    assert pages == nxt == 3                  # 3 records (3 x 4104 bytes) exceed 3 pages
    f.reset_rate_limit()
    f.set_rate_limit(0)
    assert f.save_pages(mm, nxt, flags=CONT) == (7, 0, 10)


def test_bad_arguments_are_refused_before_anything_is_sent(core):
    mm = private_anon(4 * PAGE)
    f = core.buffer_file()
    with pytest.raises(ValueError, match="outside"):
        f.save_pages(mm, 2, 3)
    with pytest.raises(ValueError, match="power of two"):
        f.save_pages(mm, page_size=3000)
    with pytest.raises(ValueError, match="below the page size"):
        f.save_pages(mm, flags=PAGE)
    with pytest.raises(ValueError, match="shorter"):
        f.save_pages(mm, dirty=bytearray(0))
    f.flush()
    assert f.channel.getvalue() == b"" and f.pending_pins == 0
    mm.close()                                # no export was left behind


# -- hostile streams --------------------------------------------------------------------------


def load(core, data: bytes, length: int = 4 * PAGE):
    r = core.buffer_file(data)
    dst = private_anon(length)
    dst[:] = b"\x5a" * length
    return r, dst


def test_a_page_past_the_block_is_refused_without_writing(core):
    data = be64(2 * PAGE | CONT | PAGE_FLAG) + b"x" * PAGE + be64(4 * PAGE | CONT | PAGE_FLAG)
    r, dst = load(core, data + b"y" * PAGE)
    with pytest.raises(FormatError) as info:
        r.load_pages(dst)
    assert info.value.offset == 8 + PAGE and "outside" in str(info.value)
    assert dst[2 * PAGE:3 * PAGE] == b"x" * PAGE
    assert dst[3 * PAGE:] == b"\x5a" * PAGE and dst[:2 * PAGE] == b"\x5a" * 2 * PAGE
    assert r.get_error() != 0


def test_an_offset_that_wraps_around_is_refused(core):
    header = ((1 << 64) - PAGE) | CONT | PAGE_FLAG
    r, dst = load(core, be64(header) + b"x" * PAGE)
    with pytest.raises(FormatError):
        r.load_pages(dst)
    assert dst[:] == b"\x5a" * (4 * PAGE)


def test_a_zero_record_must_fill_with_zero(core):
    r, dst = load(core, be64(PAGE | CONT | ZERO) + b"\x07")
    with pytest.raises(FormatError, match="fill byte") as info:
        r.load_pages(dst)
    assert info.value.offset == 8
    assert dst[:] == b"\x5a" * (4 * PAGE)


def test_a_stream_cut_inside_a_page_ends_with_streamended(core):
    r, dst = load(core, be64(CONT | PAGE_FLAG) + b"x" * 100)
    with pytest.raises(StreamEnded) as info:
        r.load_pages(dst)
    assert info.value.offset == 8 and info.value.got == 100


def test_other_records_are_handed_back_to_the_caller(core):
    # a new block (no CONTINUE) or any other flag stops the loop, payload unread
    for header in (PAGE | PAGE_FLAG, PAGE | CONT | 0x40, EOS, 0x04):
        r, dst = load(core, be64(header) + b"rest")
        assert r.load_pages(dst) == (header, 0, 0)
        assert r.get_buffer(4) == b"rest"


def test_counting_checks_records_without_a_target(core):
    src = private_anon(8 * PAGE)
    fill_pages(src, 4)
    f = core.buffer_file()
    f.save_pages(src, idstr="b")
    f.put_be64(EOS)
    f.flush()
    data = f.channel.getvalue()
    r = core.buffer_file(data)
    header = r.get_be64()
    r.get_counted_string()
    assert r.load_pages(8 * PAGE, header) == (EOS, 4, 4)
    r = core.buffer_file(data)
    header = r.get_be64()
    r.get_counted_string()
    with pytest.raises(FormatError, match="outside"):
        r.load_pages(4 * PAGE, header)              # the same records, a shorter block
