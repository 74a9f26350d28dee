"""A small S3 endpoint that turns hostile on request — for tests only (the real engines,
SeaweedFS and Ceph RGW, are what the store is tested against; this one lies on purpose).

It keeps objects in memory and answers what qfram's client sends: HEAD/PUT/DELETE of a
bucket's keys (PUT with If-None-Match), GET (ranged too), ListObjectsV2.  Signatures are
not checked.  ``mode`` (set by POST /_mode with the mode as the body, or given at start)
applies to GETs of chunk objects (keys under .qfram/chunks/):

  ok        answer honestly
  drip      send the headers, then one byte of the body every 0.2 s
  slowhead  send the status line one byte every 0.2 s
  silent    read the request, never answer
  5xx       503 SlowDown for every request
  truncate  announce the whole body, send half, close
  alter     send the body with a byte changed (same length)
  missing   404 NoSuchKey
  die       like ok for the first N chunk GETs (N = the mode's argument, "die:N"), then
            close every connection at once

usage: python fake_s3.py PORT_FILE [MODE]   (listens on 127.0.0.1, a free port written
to PORT_FILE)
"""
from __future__ import annotations

import http.server
import socket
import sys
import threading
import time
import urllib.parse
from email.utils import formatdate
from xml.sax.saxutils import escape

OBJECTS = {}
STATE = {"mode": "ok", "chunk_gets": 0}
LOCK = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _split(self):
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.lstrip("/").split("/", 1)
        bucket = parts[0]
        key = urllib.parse.unquote(parts[1]) if len(parts) > 1 else ""
        return bucket, key, urllib.parse.parse_qs(url.query, keep_blank_values=True)

    def _reply(self, status: int, body: bytes = b"", headers=None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Date", formatdate(usegmt=True))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str) -> None:
        body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
        self._reply(status, body, {"Content-Type": "application/xml"})

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_POST(self) -> None:
        bucket, key, query = self._split()
        if "delete" in query:                 # DeleteObjects
            import re
            keys = re.findall(rb"<Key>(.*?)</Key>", self._body())
            with LOCK:
                for k in keys:
                    OBJECTS.pop((bucket, k.decode()), None)
            body = ("<DeleteResult>" + "".join(f"<Deleted><Key>{escape(k.decode())}</Key>"
                                               f"</Deleted>" for k in keys)
                    + "</DeleteResult>").encode()
            self._reply(200, body, {"Content-Type": "application/xml"})
            return
        if self.path.startswith("/_mode"):
            mode = self._body().decode()
            with LOCK:
                STATE["mode"] = mode
                STATE["chunk_gets"] = 0
            self._reply(200)
            return
        self._error(400, "InvalidRequest")

    def do_PUT(self) -> None:
        bucket, key, _ = self._split()
        data = self._body()
        if not key:
            self._reply(200)
            return
        with LOCK:
            if self.headers.get("If-None-Match") == "*" and (bucket, key) in OBJECTS:
                self._error(412, "PreconditionFailed")
                return
            OBJECTS[(bucket, key)] = (data, time.time())
        self._reply(200, headers={"ETag": '"x"'})

    def do_DELETE(self) -> None:
        bucket, key, _ = self._split()
        with LOCK:
            OBJECTS.pop((bucket, key), None)
        self._reply(204)

    def do_HEAD(self) -> None:
        bucket, key, _ = self._split()
        if self._hostile(key, head=True):
            return
        if not key:
            self._reply(200)
            return
        with LOCK:
            found = OBJECTS.get((bucket, key))
        if found is None:
            self._reply(404)
            return
        data, written = found
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Last-Modified", formatdate(written, usegmt=True))
        self.send_header("Date", formatdate(usegmt=True))
        self.end_headers()

    def do_GET(self) -> None:
        bucket, key, query = self._split()
        if not key and "list-type" in query:
            self._list(bucket, query)
            return
        if self._hostile(key):
            return
        with LOCK:
            found = OBJECTS.get((bucket, key))
        if found is None:
            self._error(404, "NoSuchKey")
            return
        data = found[0]
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start, _, end = rng[6:].partition("-")
            data = data[int(start):int(end) + 1 if end else None]
        mode = STATE["mode"] if key.startswith(".qfram/chunks/") else "ok"
        if mode == "alter" and data:
            data = data[:-1] + bytes([data[-1] ^ 0x55])      # the payload, not the header
        if mode == "truncate":
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "drip":
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(0.2)
            return
        self._reply(200, data)

    def _hostile(self, key: str, head: bool = False) -> bool:
        """The modes that answer before looking at the object (True: answered)."""
        if not key.startswith(".qfram/chunks/"):
            return False
        with LOCK:
            mode = STATE["mode"]
            if not head:
                STATE["chunk_gets"] += 1
            count = STATE["chunk_gets"]
        if head:
            return False                      # pushes go on: only fetching turns hostile
        if mode == "5xx":
            self._error(503, "SlowDown")
            return True
        if mode == "missing":
            self._error(404, "NoSuchKey")
            return True
        if mode == "silent":
            time.sleep(3600)
            return True
        if mode == "slowhead":
            for ch in b"HTTP/1.1 200 OK\r\n" * 100:
                self.wfile.write(bytes([ch]))
                self.wfile.flush()
                time.sleep(0.2)
            return True
        if mode.startswith("die:") and count > int(mode[4:]):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return True
        return False

    def _list(self, bucket: str, query) -> None:
        prefix = query.get("prefix", [""])[0]
        with LOCK:
            keys = sorted((k, v) for (b, k), v in OBJECTS.items()
                          if b == bucket and k.startswith(prefix))
        items = "".join(
            f"<Contents><Key>{escape(k)}</Key><Size>{len(v[0])}</Size>"
            f"<LastModified>{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(v[1]))}"
            f"</LastModified></Contents>" for k, v in keys)
        body = (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>{bucket}'
                f"</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(keys)}</KeyCount>"
                f"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{items}"
                f"</ListBucketResult>").encode()
        self._reply(200, body, {"Content-Type": "application/xml"})


def main() -> None:
    port_file = sys.argv[1]
    if len(sys.argv) > 2:
        STATE["mode"] = sys.argv[2]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    import os
    os.rename(port_file + ".tmp", port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
