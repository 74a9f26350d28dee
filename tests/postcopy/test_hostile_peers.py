"""`qfram send` and `qfram receive` against peers that lie, stall, flood or squat
(tests/helpers/hostile.py and idle sockets): every wait ends within its timeout or the
deadline, exit 1, with a reason that says what the peer last said — and unidentified
connections never keep the real source out."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

PY = sys.executable


def qfram(*args) -> list:
    return [PY, "-m", "qfram", *args]


def said(done, command: str = "send") -> str:
    """The one line of a failure, checked for what must never be there."""
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, \
        done.stderr
    assert f"qfram {command}: " in done.stderr
    return done.stderr


def send(address: str, *args, limit: float = 60):
    t0 = time.monotonic()
    done = subprocess.run(qfram("send", "--demo", "16M", "--to", address, *args),
                          capture_output=True, text=True, timeout=limit)
    return done, time.monotonic() - t0


@pytest.mark.parametrize("kind, words", [
    ("silent", ["the destination did not confirm within 1 s",
                "it said nothing on the return path"]),
    ("flood", ["the destination did not confirm within 1 s",
               "its last word on the return path: PONG"]),
    ("garbage", ["unknown return path message 57005 at byte 0"]),
    ("shut-error", ["the destination failed the migration (it ended with status 1)"]),
    ("deaf", ["the destination took nothing for 1 s"]),
    ("hangup", ["the destination hung up"]),
])
def test_a_destination_that_never_confirms_ends_send_with_what_it_said(hostile, kind, words):
    done, took = send(hostile(kind), "--timeout", "1", "--no-resume")
    err = said(done)
    assert all(word in err for word in words), err
    assert took < 10


def test_the_deadline_bounds_the_whole_send(hostile):
    """A destination that never reads: each write waits --timeout, the resume that
    follows tries again and again — the deadline ends it all."""
    done, took = send(hostile("deaf"), "--rounds", "0", "--timeout", "20", "--deadline", "2")
    err = said(done)
    assert "the migration did not finish within its deadline (2 s)" in err, err
    assert took < 10
