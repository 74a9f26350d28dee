"""Property test: random sequences of puts give byte-identical streams, identical flush
points and identical read-back on the Cython core and its pure-Python twin."""
from __future__ import annotations

import random
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CORES, PAGE, RecordingChannel, private_anon

NPAGES = 24

ops = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 255)),
    st.tuples(st.just("be16"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("be32"), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("be64"), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("buffer"), st.integers(0, 20000), st.integers(0, 255)),
    st.tuples(st.just("async"), st.integers(0, NPAGES * PAGE - 1), st.integers(1, 3 * PAGE),
              st.booleans()),
    st.tuples(st.just("string"), st.binary(max_size=255)),
    st.tuples(st.just("compress"), st.binary(max_size=3000)),
    st.tuples(st.just("pages"), st.integers(0, NPAGES - 1), st.integers(0, 8), st.booleans(),
              st.booleans()),
    st.tuples(st.just("flush")),
    st.tuples(st.just("tell")),
)


def make_region(seed: int):
    rng = random.Random(seed)
    mm = private_anon(NPAGES * PAGE)
    for i in range(NPAGES):
        kind = rng.randrange(3)
        if kind == 1:
            mm[i * PAGE:(i + 1) * PAGE] = rng.randbytes(PAGE)
        elif kind == 2:
            mm[i * PAGE + rng.randrange(PAGE)] = rng.randrange(1, 256)
    return mm


def write(core, program, seed, params):
    mm = make_region(seed)
    original = bytes(mm)
    ch = RecordingChannel()
    f = core.QEMUFile(ch, "wb", **params)
    expected = []          # what a reader must get back, op by op
    tells = []
    freed = set()          # pages once queued may_free: gone (by design), not re-sent
    for op in program:
        kind = op[0]
        if kind in ("async", "pages"):
            if kind == "async":
                start, length = op[1], min(op[2], NPAGES * PAGE - op[1])
                touched = set(range(start // PAGE, (start + length - 1) // PAGE + 1))
            else:
                touched = set(range(op[1], op[1] + min(op[2], NPAGES - op[1])))
            if touched & freed:
                continue
            if op[3]:
                freed |= touched
        if kind == "byte":
            f.put_byte(op[1])
            expected.append(("byte", op[1]))
        elif kind in ("be16", "be32", "be64"):
            getattr(f, "put_" + kind)(op[1])
            expected.append((kind, op[1]))
        elif kind == "buffer":
            data = bytes([op[2]]) * op[1]
            f.put_buffer(data)
            expected.append(("raw", data))
        elif kind == "async":
            start, length = op[1], min(op[2], NPAGES * PAGE - op[1])
            f.put_buffer_async(memoryview(mm)[start:start + length], may_free=op[3])
            expected.append(("raw", original[start:start + length]))
        elif kind == "string":
            f.put_counted_string(op[1])
            expected.append(("string", op[1]))
        elif kind == "compress":
            f.put_compression_data(op[1])
            expected.append(("compress", op[1]))
        elif kind == "pages":
            first, count = op[1], min(op[2], NPAGES - op[1])
            idstr = "blk" if op[4] else None
            f.save_pages(mm, first, count, flags=0 if idstr else 0x20, may_free=op[3],
                         idstr=idstr)
            expected.append(("pages", first, count, original))
        elif kind == "flush":
            f.flush()
        elif kind == "tell":
            tells.append((f.tell_fast(), f.tell()))
    f.flush()
    return bytes(ch.data), ch.writes, tells, f.released_bytes, expected


def read_back(core, data, expected, buf_size):
    r = core.buffer_file(data, buf_size=buf_size)
    for item in expected:
        kind = item[0]
        if kind == "byte":
            assert r.get_byte() == item[1]
        elif kind in ("be16", "be32", "be64"):
            assert getattr(r, "get_" + kind)() == item[1]
        elif kind == "raw":
            assert r.get_buffer(len(item[1])) == item[1]
        elif kind == "string":
            assert r.get_counted_string() == item[1]
        elif kind == "compress":
            assert zlib.decompress(r.get_buffer(r.get_be32())) == item[1]
        elif kind == "pages":
            _, first, count, original = item
            for i in range(first, first + count):
                header = r.get_be64()
                assert header & ~0xFFF == i * PAGE
                if not header & 0x20:
                    assert r.get_counted_string() == b"blk"
                page = original[i * PAGE:(i + 1) * PAGE]
                if header & 0x02:
                    assert r.get_byte() == 0 and page == bytes(PAGE)
                else:
                    assert header & 0x08 and r.get_buffer(PAGE) == page
    assert r.tell() == len(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(ops, max_size=40), seed=st.integers(0, 1 << 30),
       iov_max=st.integers(1, 80), buf_size=st.integers(64, 5000),
       release_min=st.sampled_from([0, PAGE, 1 << 21]), read_buf=st.integers(64, 9000))
def test_both_cores_write_and_read_the_same_stream(program, seed, iov_max, buf_size,
                                                    release_min, read_buf):
    params = {"iov_max": iov_max, "buf_size": buf_size, "release_min": release_min}
    results = [write(core, program, seed, params) for core in CORES]
    fast, pure = results
    assert fast[0] == pure[0]          # byte-identical stream
    assert fast[1] == pure[1]          # identical flush points
    assert fast[2] == pure[2]          # identical positions
    assert fast[3] == pure[3]          # identical release
    for core in CORES:
        read_back(core, fast[0], fast[4], read_buf)
