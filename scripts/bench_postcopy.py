#!/usr/bin/env python3
"""Postcopy over loopback TCP, beside precopy-only migration of the same RAM and the core's
own TCP throughput, in the same run.

* postcopy: `qfram send --rounds 0` (every page after the switch) to `qfram receive
  --workload read`: a random-read workload starts at the switch, so its first touches
  are faults served while the background stream runs.
* precopy-only: `qfram send --precopy-only --rounds 1` of the same RAM.
* postcopy over TLS: the same, every channel TLS 1.3 with both ends verified
  (`--tls-creds`, certificates from `qfram tls-init`).
* core TCP: the core's save_pages streaming the same RAM into a TCP connection drained by
  the C reference's reader — the bar for the background stream.

    scripts/bench_postcopy.py [--size 1G] [--repeat 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import arguments, build_cref, emit, note, parse_size  # noqa: E402

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrate(size: str, send_extra, recv_extra) -> tuple:
    port = free_port()
    address = f"127.0.0.1:{port}"
    recv = subprocess.Popen([PY, "-m", "qfram", "receive", "--listen", address, "--json",
                             *recv_extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(0.5)
    t0 = time.perf_counter()
    send = subprocess.run([PY, "-m", "qfram", "send", "--demo", size, "--to", address,
                           "--json", *send_extra], capture_output=True, text=True, timeout=600)
    out, err = recv.communicate(timeout=600)
    wall = time.perf_counter() - t0
    if send.returncode or recv.returncode:
        raise SystemExit(f"migration failed:\n{send.stderr[-2000:]}\n{err[-2000:]}")
    return json.loads(send.stdout), json.loads(out), wall


def child_core_tcp(port: int, size: int) -> None:
    from qfram.io import channel
    from qfram.lab.demo import demo_ram
    region = demo_ram(size)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = channel.socket_file(sock, "wb")
    t0 = time.perf_counter()
    f.save_pages(region, idstr="pc.ram")
    f.close()
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": size}))


def core_tcp(size: int) -> float:
    cref = build_cref()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    writer = subprocess.Popen([PY, __file__, "--child-core-tcp", str(port), str(size)],
                              stdout=subprocess.PIPE, text=True)
    conn, _ = server.accept()
    drain = subprocess.Popen([str(cref), "drain", str(conn.fileno())], pass_fds=(conn.fileno(),))
    conn.close()
    server.close()
    out, _ = writer.communicate(timeout=600)
    drain.wait(timeout=600)
    r = json.loads(out)
    return r["bytes"] / r["seconds"] / 1e9


def main() -> int:
    parser = arguments(__doc__)
    parser.add_argument("--child-core-tcp", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_core_tcp:
        child_core_tcp(int(args.child_core_tcp[0]), int(args.child_core_tcp[1]))
        return 0
    size = parse_size(args.size)
    creds = tempfile.mkdtemp(prefix="qfram-bench-tls-")
    subprocess.run([PY, "-m", "qfram", "tls-init", creds], check=True, capture_output=True)
    tls = ["--tls-creds", creds]
    post, pre, core, secured = [], [], [], []
    for _ in range(args.repeat):
        src, dst, wall = migrate(args.size, ["--rounds", "0", "--release"],
                                 ["--workload", "read", "--workload-pause-us", "20"])
        post.append((src, dst, wall))
        note(f"  postcopy: fault {dst['fault_latency']}, background "
             f"{src['postcopy_gbps']} GB/s, {wall:.2f} s")
        src, dst, wall = migrate(args.size, ["--rounds", "0", "--release", *tls],
                                 ["--workload", "read", "--workload-pause-us", "20", *tls])
        secured.append((src, dst, wall))
        note(f"  postcopy over TLS ({src['tls']}): fault {dst['fault_latency']}, "
             f"background {src['postcopy_gbps']} GB/s")
        src, dst, wall = migrate(args.size, ["--precopy-only", "--rounds", "1"], [])
        pre.append((src, dst, wall))
        note(f"  precopy-only: {wall:.2f} s")
        core.append(core_tcp(size))
        note(f"  core over TCP: {core[-1]:.3f} GB/s")
    med = statistics.median
    lat = [d["fault_latency"] for _, d, _ in post]
    tls_lat = [d["fault_latency"] for _, d, _ in secured]

    def spread(values) -> list:
        values = list(values)
        return [min(values), max(values)]

    report = {
        "size": size, "repeat": args.repeat,
        "fault_p50_us": med(x["p50_us"] for x in lat),
        "fault_p99_us": med(x["p99_us"] for x in lat),
        "fault_max_us": med(x["max_us"] for x in lat),
        "faults": med(d["faults"] for _, d, _ in post),
        "background_gbps": med(s["postcopy_gbps"] for s, _, _ in post),
        "core_tcp_gbps": round(med(core), 3),
        "tls_background_gbps": med(s["postcopy_gbps"] for s, _, _ in secured),
        "tls_fault_p99_us": med(x["p99_us"] for x in tls_lat),
        "tls": secured[0][0]["tls"],
        "spread": {"fault_p99_us": spread(x["p99_us"] for x in lat),
                   "background_gbps": spread(s["postcopy_gbps"] for s, _, _ in post),
                   "tls_background_gbps": spread(s["postcopy_gbps"] for s, _, _ in secured),
                   "tls_fault_p99_us": spread(x["p99_us"] for x in tls_lat),
                   "core_tcp_gbps": spread(round(c, 3) for c in core)},
        "total_s": round(med(w for _, _, w in post), 3),
        "downtime_ms": med(s["downtime_source_ms"] + d["downtime_destination_ms"]
                           for s, d, _ in post),
        "precopy_only_total_s": round(med(w for _, _, w in pre), 3),
        "precopy_only_downtime_ms": med(s["downtime_source_ms"] for s, _, _ in pre),
        "verified": all(d["verified"] for _, d, _ in post + pre + secured),
    }
    report["background_ratio"] = round(report["background_gbps"] / report["core_tcp_gbps"], 3)
    report["tls_background_ratio"] = round(report["tls_background_gbps"]
                                           / report["core_tcp_gbps"], 3)
    emit(args, report, [
        f"RAM {size >> 20} MiB over loopback TCP, median of {args.repeat}; "
        f"verified: {report['verified']}",
        f"postcopy: fault latency p50 {report['fault_p50_us']} us, p99 "
        f"{report['fault_p99_us']} us, max {report['fault_max_us']} us "
        f"({report['faults']} faults); background {report['background_gbps']} GB/s = "
        f"{report['background_ratio']}x the core's TCP throughput "
        f"({report['core_tcp_gbps']} GB/s); total {report['total_s']} s; downtime "
        f"{report['downtime_ms']:.1f} ms",
        f"postcopy over TLS ({report['tls']}): fault p99 {report['tls_fault_p99_us']} us; "
        f"background {report['tls_background_gbps']} GB/s = "
        f"{report['tls_background_ratio']}x the core's TCP throughput",
        f"spread (min, max over {args.repeat} runs): {report['spread']}",
        f"precopy-only: total {report['precopy_only_total_s']} s; downtime "
        f"{report['precopy_only_downtime_ms']} ms (the program stopped for the last round)"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
