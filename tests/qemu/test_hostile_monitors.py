"""`qfram restore-qemu` against monitors and "QEMUs" that lie, stall, drip or flood
(tests/helpers/hostile.py, each a process of its own): every one ends qfram within its
timeout or deadline, exit 1, with a reason that names the command and what was said —
never a traceback, never a hang.  The QMP client's parser is fuzzed."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qfram.errors import QMPError
from qfram.qemu import qmp

PY = sys.executable


def qfram(*args) -> list:
    return [PY, "-m", "qfram", *args]


@pytest.fixture(scope="module")
def snap(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("hostile") / "snap")
    subprocess.run(qfram("save", "--demo", "8M", path, "--layout", "mapped"), check=True,
                   capture_output=True)
    return path


def restore(snap: str, *args, limit: float = 60):
    """qfram restore-qemu, its result and how long it took."""
    t0 = time.monotonic()
    done = subprocess.run(qfram("restore-qemu", snap, *args), capture_output=True,
                          text=True, timeout=limit)
    return done, time.monotonic() - t0


def said(done) -> str:
    """The one line of a failure, checked for what must never be there."""
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, \
        done.stderr
    assert done.stderr.startswith("qfram restore-qemu: ")
    return done.stderr


def test_a_silent_monitor_ends_the_restore_within_the_timeout(snap, hostile):
    done, took = restore(snap, "--qmp", hostile("qmp-silent"), "--timeout", "1")
    assert "QMP greeting: QEMU silent for 1 s" in said(done)
    assert took < 8


def test_a_dripping_monitor_ends_at_the_deadline(snap, hostile):
    """One byte every 0.4 s keeps every read alive: only the deadline ends it."""
    done, took = restore(snap, "--qmp", hostile("qmp-drip"), "--deadline", "2")
    err = said(done)
    assert "within its deadline (2 s)" in err and "QMP greeting" in err, err
    assert took < 8


def test_a_monitor_flooding_events_ends_at_the_deadline(snap, hostile):
    done, took = restore(snap, "--qmp", hostile("qmp-events"), "--deadline", "2")
    err = said(done)
    assert "within its deadline (2 s)" in err and "query-status" in err
    assert "events" in err
    assert took < 8


def test_restore_qemu_documents_its_deadline():
    shown = subprocess.run(qfram("restore-qemu", "--help"), capture_output=True,
                           text=True).stdout
    assert "--deadline SECONDS" in shown and "default: 120 s" in " ".join(shown.split())


@pytest.mark.parametrize("case, words", [
    ("array-return", ["query-status", "an array where an object is due", "[1, 2, 3]"]),
    ("array", ["query-status", "an array, not an object"]),
    ("string-error", ["query-status", "a malformed error", "no such thing"]),
    ("deep", ["query-status", "not JSON"]),
    ("no-id", ["query-status", "a reply that is not to it"]),
])
def test_a_reply_of_the_wrong_shape_is_a_reason_naming_the_command(snap, hostile, case,
                                                                   words):
    done, took = restore(snap, "--qmp", hostile(f"qmp-reply:{case}"), "--timeout", "5")
    err = said(done)
    assert all(word in err for word in words), err
    assert took < 10


def peak_rss_of(argv) -> tuple:
    """Run argv from a small fresh process (a child forked from pytest would count
    pytest's pages); its exit status, stderr and peak RSS in bytes."""
    code = ("import json, resource, subprocess, sys; "
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(json.dumps([p.returncode, p.stderr, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    out = subprocess.run([PY, "-c", code, *argv], capture_output=True, text=True,
                         timeout=60)
    code, err, peak_kib = json.loads(out.stdout)
    return code, err, peak_kib * 1024


@pytest.mark.parametrize("kind", ["qmp-huge-greeting", "qmp-reply:huge"])
def test_a_message_over_a_mebibyte_is_refused_and_costs_no_more(snap, hostile, kind):
    code, err, peak = peak_rss_of(qfram("restore-qemu", snap, "--qmp", hostile(kind),
                                        "--timeout", "5"))
    assert code == 1 and "Traceback" not in err
    assert "over the 1048576-byte limit" in err, err
    assert peak < 64 << 20          # qfram itself takes ~26 MiB


@pytest.mark.parametrize("via", ["to", "qmp"])
@pytest.mark.parametrize("kind, words", [
    ("silent", ["QEMU did not confirm within 1 s", "it said nothing on the return path"]),
    ("flood", ["QEMU did not confirm within 1 s", "its last word on the return path: PONG"]),
    ("garbage", ["unknown return path message 57005 at byte 0"]),
    ("shut-error", ["QEMU failed the migration (it ended with status 1)"]),
    ("deaf", ["QEMU took nothing for 1 s"]),
    ("hangup", ["QEMU hung up"]),
])
def test_a_qemu_that_never_confirms_ends_the_restore_with_what_it_said(snap, hostile, via,
                                                                       kind, words):
    peer = hostile(kind if via == "to" else f"qmp-qemu:{kind}")
    done, took = restore(snap, f"--{via}", peer, "--timeout", "1")
    err = said(done)
    assert all(word in err for word in words), err
    assert took < 10


def test_a_monitor_that_breaks_during_the_restore_is_told_not_a_traceback(snap, hostile):
    """The watcher thread's failure (a status that is no string) reaches the main
    thread, with the stream's own end."""
    done, took = restore(snap, "--qmp", hostile("qmp-bad-status"), "--timeout", "1")
    err = said(done)
    assert "its monitor: query-migrate: a status that is a number" in err, err
    assert took < 10


# -- the parser, fuzzed ------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
REPLY = st.dictionaries(st.sampled_from(["return", "error", "id", "event", "data", "QMP",
                                         "class", "desc"]), JSON, max_size=4)


@settings(max_examples=150, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(line=st.one_of(st.binary(max_size=200), REPLY.map(lambda d: json.dumps(d).encode()),
                      JSON.map(lambda v: json.dumps(v).encode())),
       returns=st.sampled_from([dict, list, str, int, None]))
def test_the_qmp_parser_says_why_for_anything_that_is_no_reply(line, returns):
    try:
        message = qmp.parse_message(line, "fuzz")
    except QMPError as exc:
        assert str(exc).startswith("QMP fuzz: ")
        return
    assert isinstance(message, dict)
    try:
        value = qmp.check_reply(message, "query-fuzz", "qfram-1", returns)
    except QMPError as exc:
        assert "query-fuzz" in str(exc)
        return
    assert returns is None or isinstance(value, returns)
    try:
        qmp.check_greeting(message, "fuzz.sock")
    except QMPError:
        pass


@settings(max_examples=25, deadline=3000, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.one_of(st.binary(max_size=64),
                                 REPLY.map(lambda d: json.dumps(d).encode() + b"\n")),
                       max_size=6))
def test_a_fuzzed_monitor_is_only_ever_a_qmp_error(tmp_path, chunks):
    """A real client on a real socket: a greeting, then whatever comes, then silence
    or the end; each command either returns what it must or raises QMPError, within its
    deadline."""
    path = str(tmp_path / f"fuzz{time.monotonic_ns()}.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def monitor() -> None:
        conn, _ = server.accept()
        with conn:
            try:
                conn.sendall(json.dumps({"QMP": {"version": {}, "capabilities": []}})
                             .encode() + b"\n")
                conn.recv(4096)                 # qmp_capabilities
                conn.sendall(b'{"return": {}, "id": "qfram-1"}\n')
                for chunk in chunks:
                    conn.sendall(chunk)
                time.sleep(0.1)
            except OSError:
                pass

    thread = threading.Thread(target=monitor, daemon=True)
    thread.start()
    t0 = time.monotonic()
    try:
        with qmp.QMP(path, timeout=2, read_timeout=0.05) as monitor_:
            for _ in range(3):
                try:
                    assert isinstance(monitor_.cmd("query-fuzz", timeout=0.2), dict)
                except QMPError:
                    pass
    finally:
        server.close()
        thread.join(2)
        os.unlink(path)
    assert time.monotonic() - t0 < 3
