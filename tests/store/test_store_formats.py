"""What a store sends back is checked before use: chunk objects against the hash that
names them, manifests field by field (fuzzed: any bytes give a manifest or a
FormatError, never another exception)."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qfram.errors import FormatError
from qfram.format import manifest as mf
from qfram.store import chunks


def test_a_chunk_that_decodes_to_other_bytes_is_refused():
    good = os.urandom(4096) + bytes(60 << 10)
    other = os.urandom(4096) + bytes(60 << 10)
    obj = chunks.encode(other, "zstd")                 # a valid chunk, of other bytes
    out = bytearray(len(good))
    with pytest.raises(FormatError, match="altered or damaged"):
        chunks.decode(obj, chunks.digest(good), memoryview(out), "chunk x")
    chunks.decode(chunks.encode(good, "lz4"), chunks.digest(good), memoryview(out), "x")
    assert bytes(out) == good


@pytest.mark.parametrize("damage", ["magic", "kind", "length", "cut"])
def test_a_chunk_object_with_a_broken_header_is_refused(damage):
    data = os.urandom(64 << 10)
    obj = bytearray(chunks.encode(data, "zstd"))
    if damage == "magic":
        obj[0] ^= 1
    elif damage == "kind":
        obj[5] = 9
    elif damage == "length":
        obj[8:12] = (1 << 30).to_bytes(4, "big")
    else:
        obj = obj[:6]
    with pytest.raises(FormatError):
        chunks.decode(bytes(obj), chunks.digest(data), memoryview(bytearray(len(data))), "x")


def manifest_bytes() -> bytes:
    return mf.Manifest("n", 1 << 20, "zstd",
                       [mf.ManifestBlock("pc.ram", 2 << 20, ["a" * 64, mf.ZERO])],
                       {"qfram": {}}).encode()


def test_a_manifest_round_trips():
    m = mf.parse(manifest_bytes(), "x")
    assert m.blocks[0].chunks == ["a" * 64, mf.ZERO] and m.digests() == {"a" * 64}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_give_a_manifest_or_a_format_error(data):
    try:
        mf.parse(data, "fuzz")
    except FormatError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_mutated_manifest_gives_a_manifest_or_a_format_error(data):
    raw = bytearray(manifest_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        m = mf.parse(bytes(raw), "fuzz")
    except FormatError:
        return
    for b in m.blocks:                             # what parses is within its bounds
        assert len(b.chunks) == -(-b.used_length // m.chunk_bytes)
        assert all(len(d) == 64 for d in b.chunks)


@pytest.mark.parametrize("name", ["", ".qfram/chunks/x", ".qfram", "a\x1b[31m"])
def test_names_that_cannot_be_a_snapshot_are_refused(name):
    with pytest.raises(FormatError):
        mf.check_name(name)
