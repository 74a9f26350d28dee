"""Hostile and broken peers, each a process of its own: QMP monitors and migration
destinations that lie, stall, drip or flood.  The tests start one, point a real `qfram`
process at it, and check that qfram ends within its bounds with a reason.

    python hostile.py KIND ADDRESS

ADDRESS is a unix socket path.  Prints "ready" once it listens, then serves every
connection (one thread each) until killed.

QMP monitors (`qfram restore-qemu --qmp ADDRESS`):
  qmp-silent          accepts, never says a word
  qmp-drip            a greeting one byte every 0.4 s, for ever
  qmp-events          greets and negotiates, then answers every command with an endless
                      stream of events and never the reply
  qmp-huge-greeting   a greeting line that never ends (bytes without a newline)
  qmp-reply:CASE      a good monitor until `query-status`, which it answers with CASE:
                      array-return ({"return": [1, 2, 3]}), array (a JSON array),
                      string-error ({"error": "..."}), deep ([ nested 400,000 deep),
                      huge (a 2 MiB reply), no-id (a reply without our id)
  qmp-qemu:STREAM     a good monitor that takes the fd of getfd and plays a QEMU
                      destination STREAM (below) on it; query-migrate says
                      postcopy-active
  qmp-bad-status      qmp-qemu:silent whose query-migrate status is a number

Migration destinations (`qfram send --to`, `qfram restore-qemu --to`):
  silent              reads everything, never answers
  flood               reads everything and floods PONG messages back
  garbage             reads the header, answers with bytes that are no message
  shut-error          reads the header, answers SHUT with status 1
  deaf                accepts and never reads
  hangup              accepts and hangs up at once
"""
from __future__ import annotations

import array
import json
import os
import socket
import sys
import threading
import time

SHUT, PONG = 1, 2


def message(kind: int, payload: bytes) -> bytes:
    return kind.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload


# -- destinations ---------------------------------------------------------------------------

def drain(conn: socket.socket) -> None:
    try:
        while conn.recv(1 << 20):
            pass
    except OSError:
        pass


def destination(kind: str, conn: socket.socket) -> None:
    if kind == "hangup":
        return
    if kind == "deaf":
        time.sleep(3600)
        return
    if kind == "silent":
        drain(conn)
        return
    if kind == "flood":
        pongs = message(PONG, (1).to_bytes(4, "big")) * 4096

        def flood() -> None:
            try:
                while True:
                    conn.sendall(pongs)
            except OSError:
                pass
        threading.Thread(target=flood, daemon=True).start()
        drain(conn)
        return
    conn.recv(4096)                                 # the header, at least its start
    if kind == "garbage":
        conn.sendall(b"\xde\xad\xbe\xef" * 64)
    elif kind == "shut-error":
        conn.sendall(message(SHUT, (1).to_bytes(4, "big")))
    drain(conn)


# -- QMP monitors -----------------------------------------------------------------------

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                "package": ""}, "capabilities": []}}


def send_json(conn: socket.socket, value) -> None:
    conn.sendall(json.dumps(value).encode() + b"\r\n")


def commands(conn: socket.socket):
    """Each command the client sends, with the fds that came with it."""
    buf = b""
    while True:
        while b"\n" not in buf:
            fds = array.array("i")
            data, anc, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(4 * fds.itemsize))
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
            if not data:
                return
            buf += data
            if fds:
                commands.fds.extend(fds)
        line, buf = buf.split(b"\n", 1)
        yield json.loads(line)


commands.fds = []


def bad_reply(case: str, ident):
    if case == "array-return":
        return json.dumps({"return": [1, 2, 3], "id": ident}).encode()
    if case == "array":
        return b"[1, 2, 3]"
    if case == "string-error":
        return json.dumps({"error": "no such thing", "id": ident}).encode()
    if case == "deep":
        return b"[" * 400_000
    if case == "huge":
        return json.dumps({"return": {"status": "x" * (2 << 20)}, "id": ident}).encode()
    if case == "no-id":
        return json.dumps({"return": {"status": "inmigrate"}}).encode()
    raise SystemExit(f"no reply case {case!r}")


def monitor(kind: str, conn: socket.socket) -> None:
    if kind == "qmp-silent":
        drain(conn)
        return
    if kind == "qmp-drip":
        for byte in json.dumps(GREETING).encode() * 1000:
            conn.sendall(bytes([byte]))
            time.sleep(0.4)
        return
    if kind == "qmp-huge-greeting":
        chunk = b" " * (1 << 16)
        while True:
            conn.sendall(chunk)
    send_json(conn, GREETING)
    for cmd in commands(conn):
        name, ident = cmd.get("execute"), cmd.get("id")
        if kind == "qmp-events" and name != "qmp_capabilities":
            event = json.dumps({"event": "STOP", "data": {}, "timestamp": {
                "seconds": 0, "microseconds": 0}}).encode() + b"\r\n"
            while True:
                conn.sendall(event * 256)
        if kind.startswith("qmp-reply:") and name == "query-status":
            conn.sendall(bad_reply(kind.split(":", 1)[1], ident) + b"\r\n")
            continue
        answer = {}
        if name == "query-status":
            answer = {"status": "inmigrate", "running": False}
        elif name == "query-migrate":
            answer = {"status": 5 if kind == "qmp-bad-status" else "postcopy-active"}
        elif name == "qom-get":
            answer = "pc-i440fx-7.2-machine"
        elif name == "migrate-incoming" and commands.fds:
            stream = socket.socket(fileno=commands.fds.pop())
            play = "silent" if kind == "qmp-bad-status" else kind.split(":", 1)[1]
            threading.Thread(target=_guard, args=(destination, play, stream),
                             daemon=True).start()
        send_json(conn, {"return": answer, "id": ident})


def main() -> None:
    kind, address = sys.argv[1], sys.argv[2]
    try:
        os.unlink(address)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX)
    server.bind(address)
    server.listen(64)
    print("ready", flush=True)
    serve = monitor if kind.startswith("qmp-") else destination
    while True:
        conn, _ = server.accept()
        threading.Thread(target=lambda c=conn: _guard(serve, kind, c), daemon=True).start()


def _guard(serve, kind: str, conn: socket.socket) -> None:
    try:
        serve(kind, conn)
    except OSError:
        pass                        # qfram hung up: that is its right
    finally:
        conn.close()


if __name__ == "__main__":
    main()
