"""The store as a hostile peer: a fake S3 endpoint that drips, goes silent, fails with
5xx, truncates, alters or loses chunks.  Every restore from it ends with a reason that
names the chunk and the snapshot, within its bounds, and leaves no target behind; a lazy
restore whose store dies mid-run ends too — no thread stays blocked in a fault."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from qfram import snapshot
from qfram.lab.demo import fill_demo
from qfram.ram import RAMBlock, RAMList

PY = sys.executable
MiB = 1 << 20
BOUNDS = ["--store-timeout", "1", "--store-deadline", "3"]


def qfram(*args) -> list:
    return [PY, "-m", "qfram", *args]


@pytest.fixture
def pushed(fake_s3, tmp_path):
    """A snapshot pushed to the fake store while it was honest."""
    ram = RAMList([RAMBlock.anonymous("pc.ram", 8 * MiB, huge=False)])
    fill_demo(ram["pc.ram"].region, seed=7, zero_percent=0)
    snapshot.save(ram, str(tmp_path / "a.snap"), layout="chunked")
    ram.close()
    out = subprocess.run(qfram("push", str(tmp_path / "a.snap"), "s3://qfram/a",
                               "--chunk-size", "256K"),
                         capture_output=True, text=True, timeout=120, env=fake_s3.env)
    assert out.returncode == 0, out.stderr
    return "s3://qfram/a"


@pytest.mark.parametrize("mode,reason", [
    ("drip", "no complete answer within 3 s"),
    ("slowhead", "no complete answer within 3 s"),
    ("silent", "no complete answer within 3 s"),
    ("5xx", "SlowDown"),
    ("truncate", "cut short"),
    ("alter", "does not decode"),
    ("missing", "NoSuchKey"),
])
def test_an_eager_restore_from_a_lying_store_ends_with_a_reason(fake_s3, pushed, tmp_path,
                                                                 mode, reason):
    fake_s3.mode(mode)
    target = tmp_path / "ram.bin"
    t0 = time.monotonic()
    out = subprocess.run(qfram("load", pushed, str(target), "--cache", str(tmp_path / "c"),
                               *BOUNDS), capture_output=True, text=True, timeout=120,
                         env=fake_s3.env)
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr
    assert reason in out.stderr and "s3://qfram/a" in out.stderr and "chunk" in out.stderr
    assert "Traceback" not in out.stderr
    assert not target.exists()                   # whole or nothing
    assert took < 60
    # nothing it sent was kept in this host's cache
    assert not [f for _, _, files in os.walk(tmp_path / "c") for f in files]


def test_a_lazy_restore_whose_store_dies_mid_run_ends_with_a_reason(fake_s3, pushed,
                                                                     tmp_path):
    fake_s3.mode("die:6")                        # a few chunks, then nothing at all
    t0 = time.monotonic()
    out = subprocess.run(qfram("load", pushed, "--lazy", "--touches", "2000",
                               "--cache", str(tmp_path / "c"), "--timeout", "10", *BOUNDS),
                         capture_output=True, text=True, timeout=120, env=fake_s3.env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "page server" in out.stderr or "chunk" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 90


def test_a_store_that_answers_nothing_at_all_ends_a_push_with_a_reason(fake_s3, tmp_path):
    ram = RAMList([RAMBlock.anonymous("pc.ram", 4 * MiB, huge=False)])
    fill_demo(ram["pc.ram"].region, seed=8)
    snapshot.save(ram, str(tmp_path / "a.snap"))
    ram.close()
    fake_s3.stop()                               # nobody listens any more
    out = subprocess.run(qfram("push", str(tmp_path / "a.snap"), "s3://qfram/a", *BOUNDS),
                         capture_output=True, text=True, timeout=120, env=fake_s3.env)
    assert out.returncode == 1
    assert "s3://qfram" in out.stderr and "Traceback" not in out.stderr


def test_a_manifest_that_is_not_one_is_refused(fake_s3, tmp_path):
    from qfram.store.client import ObjectStore
    from qfram.store.url import Endpoint
    store = ObjectStore("qfram", Endpoint(fake_s3.endpoint, "x", "x"))
    store.put("liar", b'{"qfram_store_manifest": 1, "hash": "sha256", "chunk_bytes": 1048576, '
                      b'"codec": "zstd", "blocks": [{"name": "pc.ram", "used_length": 4096, '
                      b'"chunks": "zz"}]}')
    out = subprocess.run(qfram("load", "s3://qfram/liar", *BOUNDS), capture_output=True,
                         text=True, timeout=60, env=fake_s3.env)
    assert out.returncode == 1 and "hex digits" in out.stderr
    assert "Traceback" not in out.stderr
