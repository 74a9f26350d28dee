#!/usr/bin/env python3
"""Postcopy over loopback TCP, beside the references it is measured against, in the same
run.

Each repeat runs, one after the other:

* postcopy: `qfram send --rounds 0 --release` (every page after the switch) to `qfram
  receive --workload read`: a random-read workload starts at the switch, so its first
  touches are faults served while the background stream runs.
* postcopy over TLS: the same, every channel TLS 1.3 with both ends verified
  (`--tls-creds`, certificates from `qfram tls-init`).
* precopy-only: `qfram send --precopy-only --rounds 1` of the same RAM.
* core TCP: the core's save_pages streaming the same RAM into a TCP connection drained by
  the C reference's reader — the bar for the background stream.
* TLS limit: Python's `ssl` (OpenSSL, the cipher the migration negotiated) sending 1 MiB
  `sendall`s to a draining `ssl` reader in another process — the bar over TLS.
* restore-qemu: `qfram restore-qemu` of a RAM-only mapped snapshot of the same RAM into a
  real QEMU (-incoming defer): qfram sends, QEMU places the pages itself.  Skipped
  when QEMU is not installed.

background_gbps is the stream's own rate: every page placed after the switch, over the
time from RUN until the last one is in place (the destination's clock).  The source's
figure, from the switch until the destination's SHUT (its hash check of the whole RAM
included), is reported as switch_to_shut_gbps.  CPU seconds per GiB: the destination's
receiving threads, each whole process after the switch, the core's writer.

    scripts/bench_postcopy.py [--size 1G] [--repeat 5] [--pin] [--json | --markdown]

--pin puts the source (and every sending side) on CPU 0, the destination (and every
receiving side) on CPU 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import arguments, build_cref, emit, note, parse_size, pinner  # noqa: E402

PY = sys.executable
GIB = 1 << 30
SEND_CPU, RECEIVE_CPU = 0, 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrate(size: str, send_extra, recv_extra, pin: bool) -> tuple:
    port = free_port()
    address = f"127.0.0.1:{port}"
    recv = subprocess.Popen([PY, "-m", "qfram", "receive", "--listen", address, "--json",
                             *recv_extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=pinner(RECEIVE_CPU if pin else None))
    time.sleep(0.5)
    t0 = time.perf_counter()
    send = subprocess.run([PY, "-m", "qfram", "send", "--demo", size, "--to", address,
                           "--json", *send_extra], capture_output=True, text=True, timeout=600,
                          preexec_fn=pinner(SEND_CPU if pin else None))
    out, err = recv.communicate(timeout=600)
    wall = time.perf_counter() - t0
    if send.returncode or recv.returncode:
        raise SystemExit(f"migration failed:\n{send.stderr[-2000:]}\n{err[-2000:]}")
    return json.loads(send.stdout), json.loads(out), wall


def postcopy_row(src: dict, dst: dict) -> dict:
    """The figures of one postcopy migration."""
    gib = dst["received_pages"] * 4096 / GIB
    return {"background_gbps": dst["postcopy_gbps"],
            "switch_to_shut_gbps": src["postcopy_gbps"],
            "fault_p50_us": dst["fault_latency"]["p50_us"],
            "fault_p99_us": dst["fault_latency"]["p99_us"],
            "fault_max_us": dst["fault_latency"]["max_us"],
            "faults": dst["faults"],
            "receiver_cpu_s_per_gib": round(dst["receive_cpu_s"] / gib, 3),
            "destination_cpu_s_per_gib": round(dst["postcopy_cpu_s"] / gib, 3),
            "source_cpu_s_per_gib": round(src["postcopy_cpu_s"] / gib, 3),
            "placing_calls": dst["placing_calls"],
            "placement": dst["placement"],
            "placements_offered": dst["placements_offered"],
            "urgent_threads": dst.get("urgent_threads"),
            "verified": dst["verified"],
            "downtime_ms": src["downtime_source_ms"] + dst["downtime_destination_ms"],
            "tls": src["tls"]}


def child_core_tcp(port: int, size: int) -> None:
    from qfram.io import channel
    from qfram.lab.demo import demo_ram
    region = demo_ram(size)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = channel.socket_file(sock, "wb")
    t0, cpu = time.perf_counter(), time.thread_time()
    f.save_pages(region, idstr="pc.ram")
    f.close()
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": size,
                      "cpu_s": time.thread_time() - cpu}))


def core_tcp(size: int, pin: bool) -> dict:
    cref = build_cref()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    writer = subprocess.Popen([PY, __file__, "--child-core-tcp", str(port), str(size)],
                              stdout=subprocess.PIPE, text=True,
                              preexec_fn=pinner(SEND_CPU if pin else None))
    conn, _ = server.accept()
    drain = subprocess.Popen([str(cref), "drain", str(conn.fileno())], pass_fds=(conn.fileno(),),
                             preexec_fn=pinner(RECEIVE_CPU if pin else None))
    conn.close()
    server.close()
    out, _ = writer.communicate(timeout=600)
    drain.wait(timeout=600)
    r = json.loads(out)
    return {"gbps": r["bytes"] / r["seconds"] / 1e9,
            "cpu_s_per_gib": r["cpu_s"] / (r["bytes"] / GIB)}


# -- the TLS limit: Python's ssl, both ends in processes of their own ---------------------

def _ssl_context(creds: str, server: bool):
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    side = "server" if server else "client"
    ctx.load_cert_chain(f"{creds}/{side}-cert.pem", f"{creds}/{side}-key.pem")
    ctx.load_verify_locations(f"{creds}/ca-cert.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False
    return ctx


def child_tls_reader(creds: str) -> None:
    """Accept one TLS connection, read it to its end in 1 MiB reads, say what came."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    print(server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    tls = _ssl_context(creds, True).wrap_socket(conn, server_side=True)
    buf = bytearray(1 << 20)
    got = 0
    while True:
        n = tls.recv_into(buf)
        if not n:
            break
        got += n
    print(json.dumps({"bytes": got, "cipher": tls.cipher()[0]}), flush=True)
    tls.close()


def child_tls_writer(creds: str, port: int, size: int) -> None:
    """sendall 1 MiB at a time; done when the reader has read it all (it closes)."""
    tls = _ssl_context(creds, False).wrap_socket(socket.create_connection(("127.0.0.1", port)))
    chunk = os.urandom(1 << 20)
    t0 = time.perf_counter()
    for _ in range(size >> 20):
        tls.sendall(chunk)
    cipher = tls.cipher()[0]
    tls.shutdown(socket.SHUT_WR)
    while tls.recv(1 << 16):         # the reader's close: everything was read
        pass
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": size >> 20 << 20,
                      "cipher": cipher}))


def tls_limit(creds: str, cipher: str, size: int, pin: bool) -> float:
    """Python ssl, ``cipher`` forced through an OpenSSL configuration file."""
    conf = os.path.join(creds, "bench-openssl.cnf")
    with open(conf, "w") as f:
        f.write("openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n"
                "[ssl_sect]\nsystem_default = system_default_sect\n"
                f"[system_default_sect]\nCiphersuites = {cipher}\n")
    env = dict(os.environ, OPENSSL_CONF=conf)
    reader = subprocess.Popen([PY, __file__, "--child-tls-reader", creds], env=env,
                              stdout=subprocess.PIPE, text=True,
                              preexec_fn=pinner(RECEIVE_CPU if pin else None))
    port = reader.stdout.readline().strip()
    writer = subprocess.run([PY, __file__, "--child-tls-writer", creds, port, str(size)],
                            env=env, capture_output=True, text=True, timeout=600,
                            preexec_fn=pinner(SEND_CPU if pin else None))
    got, _ = reader.communicate(timeout=600)
    if writer.returncode or reader.returncode:
        raise SystemExit(f"TLS limit failed: {writer.stderr[-1000:]}")
    w, r = json.loads(writer.stdout), json.loads(got)
    if r["bytes"] != w["bytes"] or w["cipher"] != cipher:
        raise SystemExit(f"TLS limit: {r['bytes']} of {w['bytes']} bytes, cipher "
                         f"{w['cipher']} (wanted {cipher})")
    return w["bytes"] / w["seconds"] / 1e9


# -- restore-qemu: QEMU places the pages ----------------------------------------------------

def qemu_restore(snap: str, size: int, pin: bool) -> Optional[dict]:
    from qfram._testing.qmp import Guest, find_qemu
    if find_qemu() is None:
        return None
    with Guest(memory=f"{size >> 20}M", incoming="defer", timeout=120) as guest:
        if pin:                     # every thread QEMU has started
            for tid in os.listdir(f"/proc/{guest.proc.pid}/task"):
                os.sched_setaffinity(int(tid), {RECEIVE_CPU})
        out = subprocess.run([PY, "-m", "qfram", "restore-qemu", snap, "--qmp",
                              guest.spare_qmp_path, "--json", "--timeout", "300"],
                             capture_output=True, text=True, timeout=600,
                             preexec_fn=pinner(SEND_CPU if pin else None))
        if out.returncode:
            raise SystemExit(f"restore-qemu failed: {out.stderr[-1500:]}")
        stats = json.loads(out.stdout)
    return {"gbps": stats["postcopy_gbps"], "qemu": stats["qemu_version"]}


# -- the run --------------------------------------------------------------------------------

def spread(values) -> list:
    values = list(values)
    return [min(values), max(values)]


def summarise(rows: List[dict], keys) -> Dict[str, dict]:
    return {k: {"median": round(statistics.median(r[k] for r in rows), 3),
                "spread": spread(r[k] for r in rows)} for k in keys}


def load() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    parser = arguments(__doc__, repeat=5)
    parser.add_argument("--pin", action="store_true",
                        help="sending sides on CPU 0, receiving sides on CPU 1")
    parser.add_argument("--markdown", action="store_true", help="a REPORT.md section")
    parser.add_argument("--no-qemu", action="store_true", help="skip restore-qemu")
    parser.add_argument("--child-core-tcp", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-tls-reader", help=argparse.SUPPRESS)
    parser.add_argument("--child-tls-writer", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_core_tcp:
        child_core_tcp(int(args.child_core_tcp[0]), int(args.child_core_tcp[1]))
        return 0
    if args.child_tls_reader:
        child_tls_reader(args.child_tls_reader)
        return 0
    if args.child_tls_writer:
        creds, port, size = args.child_tls_writer
        child_tls_writer(creds, int(port), int(size))
        return 0
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="qfram-bench-postcopy-")
    creds = os.path.join(work, "creds")
    subprocess.run([PY, "-m", "qfram", "tls-init", creds], check=True, capture_output=True)
    snap = None
    if not args.no_qemu:
        snap = os.path.join(work, "demo.mapped")
        subprocess.run([PY, "-m", "qfram", "save", "--demo", args.size, snap, "--layout",
                        "mapped"], check=True, capture_output=True)
    tls = ["--tls-creds", creds]
    workload = ["--workload", "read", "--workload-pause-us", "20"]
    post, secured, pre, core, limit, qemu = [], [], [], [], [], []
    load_before = load()
    try:
        for i in range(args.repeat):
            src, dst, _ = migrate(args.size, ["--rounds", "0", "--release"], workload, args.pin)
            post.append(postcopy_row(src, dst))
            note(f"  [{i}] postcopy: {post[-1]}")
            src, dst, _ = migrate(args.size, ["--rounds", "0", "--release", *tls],
                                  workload + tls, args.pin)
            secured.append(postcopy_row(src, dst))
            note(f"  [{i}] postcopy over TLS: {secured[-1]}")
            src, dst, wall = migrate(args.size, ["--precopy-only", "--rounds", "1"], [],
                                     args.pin)
            pre.append({"total_s": wall, "downtime_ms": src["downtime_source_ms"],
                        "verified": dst["verified"]})
            note(f"  [{i}] precopy-only: {wall:.2f} s")
            core.append(core_tcp(size, args.pin))
            note(f"  [{i}] core over TCP: {core[-1]}")
            cipher = secured[-1]["tls"].split()[-1]
            limit.append(tls_limit(creds, cipher, size, args.pin))
            note(f"  [{i}] Python ssl ({cipher}): {limit[-1]:.3f} GB/s")
            if snap is not None:
                q = qemu_restore(snap, size, args.pin)
                if q is not None:
                    qemu.append(q)
                    note(f"  [{i}] restore-qemu into QEMU {q['qemu']}: {q['gbps']} GB/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    keys = ("background_gbps", "switch_to_shut_gbps", "fault_p50_us", "fault_p99_us",
            "fault_max_us", "faults", "receiver_cpu_s_per_gib", "destination_cpu_s_per_gib",
            "source_cpu_s_per_gib", "placing_calls", "downtime_ms")
    clear, over_tls = summarise(post, keys), summarise(secured, keys)
    report = {
        "size": size, "repeat": args.repeat, "pinned": args.pin,
        "load_average_before": load_before, "load_average_after": load(),
        "placement": post[0]["placement"], "placements_offered": post[0]["placements_offered"],
        "urgent_threads": post[0]["urgent_threads"],
        "tls": secured[0]["tls"],
        "background_gbps": clear["background_gbps"]["median"],
        "core_tcp_gbps": round(med(c["gbps"] for c in core), 3),
        "fault_p50_us": clear["fault_p50_us"]["median"],
        "fault_p99_us": clear["fault_p99_us"]["median"],
        "fault_max_us": clear["fault_max_us"]["median"],
        "faults": clear["faults"]["median"],
        "tls_background_gbps": over_tls["background_gbps"]["median"],
        "tls_limit_gbps": round(med(limit), 3),
        "tls_fault_p99_us": over_tls["fault_p99_us"]["median"],
        "receiver_cpu_s_per_gib": clear["receiver_cpu_s_per_gib"]["median"],
        "tls_receiver_cpu_s_per_gib": over_tls["receiver_cpu_s_per_gib"]["median"],
        "qemu_restore_gbps": round(med(q["gbps"] for q in qemu), 3) if qemu else None,
        "qemu_version": qemu[0]["qemu"] if qemu else None,
        "downtime_ms": clear["downtime_ms"]["median"],
        "precopy_only_total_s": round(med(p["total_s"] for p in pre), 3),
        "precopy_only_downtime_ms": med(p["downtime_ms"] for p in pre),
        "verified": all(r["verified"] for r in post + secured + pre),
        "clear": clear, "over_tls": over_tls,
        "spread": {"core_tcp_gbps": spread(round(c["gbps"], 3) for c in core),
                   "tls_limit_gbps": spread(round(x, 3) for x in limit),
                   "qemu_restore_gbps": spread(q["gbps"] for q in qemu) if qemu else None},
        "core_writer_cpu_s_per_gib": round(med(c["cpu_s_per_gib"] for c in core), 3),
        "runs": {"postcopy": post, "tls": secured, "core_tcp_gbps": [round(c["gbps"], 3)
                                                                    for c in core],
                 "tls_limit_gbps": [round(x, 3) for x in limit],
                 "qemu_restore_gbps": [q["gbps"] for q in qemu]},
    }
    report["background_ratio"] = round(report["background_gbps"] / report["core_tcp_gbps"], 3)
    report["tls_background_ratio"] = round(report["tls_background_gbps"]
                                           / report["tls_limit_gbps"], 3)
    # the same ratios repeat by repeat (each against the bar measured seconds from it):
    # on a machine shared with other work the bars move as much as the streams do
    per_repeat = {"background_ratio": [p["background_gbps"] / c["gbps"]
                                       for p, c in zip(post, core)],
                  "tls_background_ratio": [p["background_gbps"] / x
                                           for p, x in zip(secured, limit)]}
    report["per_repeat"] = {k: {"median": round(med(v), 3),
                                "spread": spread(round(x, 3) for x in v)}
                            for k, v in per_repeat.items()}
    if args.markdown:
        print(markdown(report))
        return 0
    emit(args, report, [
        f"RAM {size >> 20} MiB over loopback TCP, median of {args.repeat}"
        f"{' (pinned)' if args.pin else ''}; verified: {report['verified']}; load average "
        f"{load_before} -> {report['load_average_after']}",
        f"postcopy: background {report['background_gbps']} GB/s = "
        f"{report['background_ratio']}x the core's TCP writer ({report['core_tcp_gbps']} "
        f"GB/s); fault p50 {report['fault_p50_us']} us, p99 {report['fault_p99_us']} us; "
        f"receiver {report['receiver_cpu_s_per_gib']} CPU s/GiB; placement "
        f"{report['placement']}",
        f"over TLS ({report['tls']}): background {report['tls_background_gbps']} GB/s = "
        f"{report['tls_background_ratio']}x Python ssl ({report['tls_limit_gbps']} GB/s); "
        f"fault p99 {report['tls_fault_p99_us']} us",
        f"restore-qemu into QEMU {report['qemu_version']}: {report['qemu_restore_gbps']} GB/s",
        f"precopy-only: total {report['precopy_only_total_s']} s; downtime "
        f"{report['precopy_only_downtime_ms']} ms",
        f"per measure (median, [min, max]): clear {clear}; TLS {over_tls}"])
    return 0


def markdown(r: dict) -> str:
    """The report as a section of benchmarks/REPORT.md."""
    c, t = r["clear"], r["over_tls"]

    def m(group, key):
        return f"{group[key]['median']} ({group[key]['spread'][0]}-{group[key]['spread'][1]})"
    lines = [
        f"## Postcopy over loopback TCP (`bench_postcopy.py --size {r['size'] >> 20}M "
        f"--repeat {r['repeat']}{' --pin' if r['pinned'] else ''}`)\n",
        f"Medians of {r['repeat']} (lowest-highest).  Load average before / after: "
        f"{r['load_average_before']} / {r['load_average_after']}.  Placement: "
        f"{r['placement']} (the kernel offers {', '.join(r['placements_offered'])}); "
        f"fault-serving threads: {r['urgent_threads']}.  Memory verified in every run: "
        f"{r['verified']}.\n",
        "| measure | clear | TLS |", "|---|---|---|",
        f"| background GB/s (RUN -> last page placed) | {m(c, 'background_gbps')} | "
        f"{m(t, 'background_gbps')} |",
        f"| its bar, same run | core TCP writer {r['core_tcp_gbps']} "
        f"({r['spread']['core_tcp_gbps'][0]}-{r['spread']['core_tcp_gbps'][1]}) | Python ssl "
        f"{r['tls_limit_gbps']} ({r['spread']['tls_limit_gbps'][0]}-"
        f"{r['spread']['tls_limit_gbps'][1]}) |",
        f"| ratio of the medians (target ≥ 0.8) | {r['background_ratio']} | "
        f"{r['tls_background_ratio']} |",
        f"| median of each repeat's ratio | {m(r['per_repeat'], 'background_ratio')} | "
        f"{m(r['per_repeat'], 'tls_background_ratio')} |",
        f"| fault p50 / p99 µs (target p99 ≤ 1000 / 1500) | {c['fault_p50_us']['median']} / "
        f"{m(c, 'fault_p99_us')} | {t['fault_p50_us']['median']} / {m(t, 'fault_p99_us')} |",
        f"| receiver CPU s per GiB | {m(c, 'receiver_cpu_s_per_gib')} | "
        f"{m(t, 'receiver_cpu_s_per_gib')} |",
        f"| destination / source process CPU s per GiB | "
        f"{c['destination_cpu_s_per_gib']['median']} / {c['source_cpu_s_per_gib']['median']} | "
        f"{t['destination_cpu_s_per_gib']['median']} / {t['source_cpu_s_per_gib']['median']} |",
        f"| placing ioctls | {c['placing_calls']['median']} | {t['placing_calls']['median']} |",
        f"| switch -> SHUT GB/s (the destination's hash check included) | "
        f"{m(c, 'switch_to_shut_gbps')} | {m(t, 'switch_to_shut_gbps')} |",
        "",
        f"The core's TCP writer used {r['core_writer_cpu_s_per_gib']} CPU s per GiB.  "
        f"restore-qemu into QEMU {r['qemu_version']} (QEMU places the pages): "
        f"{r['qemu_restore_gbps']} GB/s "
        f"({(r['spread']['qemu_restore_gbps'] or [None, None])[0]}-"
        f"{(r['spread']['qemu_restore_gbps'] or [None, None])[1]}).  Precopy-only: "
        f"{r['precopy_only_total_s']} s in all, downtime {r['precopy_only_downtime_ms']} ms; "
        f"postcopy downtime {r['downtime_ms']} ms.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
