"""A TCP forwarding process for tests that cut a migration's link: it listens on
LISTEN_PORT, joins every connection to TARGET_PORT on 127.0.0.1, and forwards both ways
at most RATE bytes a second per direction (so a test can cut the link mid-transfer).
It writes the bytes forwarded towards the target so far to COUNT_FILE.  Killing it (-9)
drops every link at once, as a failing network would.

usage: proxy.py LISTEN_PORT TARGET_PORT RATE COUNT_FILE
"""
import os
import socket
import sys
import threading
import time

CHUNK = 64 * 1024


def pump(src: socket.socket, dst: socket.socket, rate: float, counter: list) -> None:
    started = time.monotonic()
    moved = 0
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
            moved += len(data)
            if counter is not None:
                counter[0] += len(data)
            ahead = moved / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def report(counter: list, path: str) -> None:
    while True:
        tmp = path + ".tmp"
        with open(tmp, "w") as out:
            out.write(str(counter[0]))
        os.replace(tmp, path)
        time.sleep(0.02)


def main() -> None:
    listen_port, target_port, rate, count_file = (int(sys.argv[1]), int(sys.argv[2]),
                                                  float(sys.argv[3]), sys.argv[4])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(16)
    counter = [0]
    threading.Thread(target=report, args=(counter, count_file), daemon=True).start()
    while True:
        client, _ = server.accept()
        target = socket.create_connection(("127.0.0.1", target_port))
        for a, b, c in ((client, target, counter), (target, client, None)):
            threading.Thread(target=pump, args=(a, b, rate, c), daemon=True).start()


if __name__ == "__main__":
    main()
