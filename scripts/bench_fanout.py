#!/usr/bin/env python3
"""One snapshot, many restores: N concurrent lazy restores of one chunked snapshot, each
on its own (`qfram load --lazy`) against all of them fed by one host page server
(`qfram serve` + `qfram load --lazy --server`), in the same run.

Each case runs in a memory cgroup of its own (v1 or v2, whichever has the memory
controller), after the page cache is dropped (root): wall time from the first process
started to the last clone done, and the cgroup's peak memory — the server and its
clones, or the standalone clones, with the page cache they read.  Every clone runs the
built-in workload and verifies its RAM against the snapshot's checksums; the server
reports how many chunks it decoded (each once, against the snapshot's non-zero chunks).

With --qemu, the same for QEMU: a test guest saved by QEMU with a VM generation ID
device, made chunked, restored by one `qfram restore-qemu --server` and then by
--qemu-clones at once: each clone's time to postcopy-active, its RAM compared with the
saved one (pmemsave), and the clones' generation IDs (all different).

    scripts/bench_fanout.py [--size 1G] [--clones 8] [--repeat 1] [--qemu] [--json]
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchlib import ROOT, arguments, emit, note, parse_size  # noqa: E402

QFRAM = str(ROOT / ".venv" / "bin" / "qfram")
PY = str(ROOT / ".venv" / "bin" / "python")


class MemoryCgroup:
    """A memory cgroup for one case; processes join it as they start."""

    def __init__(self) -> None:
        name = f"qfram-fanout-{uuid.uuid4().hex[:8]}"
        v1 = Path("/sys/fs/cgroup/memory")
        v2 = Path("/sys/fs/cgroup/unified")
        if (v1 / "memory.max_usage_in_bytes").exists():
            self.path, self.peak_file = v1 / name, "memory.max_usage_in_bytes"
        elif "memory" in (v2 / "cgroup.controllers").read_text() if \
                (v2 / "cgroup.controllers").exists() else False:
            self.path, self.peak_file = v2 / name, "memory.peak"
        else:
            raise SystemExit("bench_fanout: no memory cgroup controller here (needs root)")
        self.path.mkdir()

    def join(self) -> None:                     # a preexec_fn: runs in the child
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        return int((self.path / self.peak_file).read_text())

    def close(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        note("  (not root: the page cache stays warm)")


def clone_cmd(snap: str, sock: str = None) -> list:
    cmd = [QFRAM, "load", snap, "--lazy", "--json", "--no-record", "--no-prefetch"]
    return cmd + ["--server", sock] if sock else cmd


def run_case(snap: str, clones: int, served: bool, work: str) -> dict:
    drop_caches()
    group = MemoryCgroup()
    server = None
    try:
        t0 = time.perf_counter()
        sock = None
        if served:
            sock = os.path.join(work, f"pages-{uuid.uuid4().hex[:6]}.sock")
            server = subprocess.Popen([QFRAM, "serve", snap, "--socket", sock, "--json"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, preexec_fn=group.join)
            while not os.path.exists(sock):
                if server.poll() is not None:
                    raise SystemExit(f"qfram serve failed: {server.stderr.read()}")
                time.sleep(0.002)
        procs = [subprocess.Popen(clone_cmd(snap, sock), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, preexec_fn=group.join)
                 for _ in range(clones)]
        results = []
        for p in procs:
            out, err = p.communicate(timeout=900)
            if p.returncode != 0:
                raise SystemExit(f"a clone failed: {err.strip()[-800:]}")
            results.append(json.loads(out))
        wall = time.perf_counter() - t0
        peak = group.peak()
        row = {"wall_s": round(wall, 3), "peak_bytes": peak,
               "verified": all(r["verified"] for r in results),
               "clone_seconds_p50": round(statistics.median(r["seconds"] for r in results), 3)}
        if server is not None:
            server.terminate()
            out, err = server.communicate(timeout=60)
            stats = json.loads(out.strip().splitlines()[-1])
            row.update(chunks_decoded=stats["chunks_decoded"], hits=stats["hits"],
                       joined=stats["joined"], misses=stats["misses"])
        return row
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        group.close()


def nonzero_chunks(snap: str) -> int:
    out = subprocess.run([QFRAM, "info", snap, "--json"], capture_output=True, text=True,
                         check=True)
    info = json.loads(out.stdout)
    return info["chunks"]["compressed"] + info["chunks"]["raw"]


def med(rows, key):
    values = [r[key] for r in rows]
    return round(statistics.median(values), 3), [round(min(values), 3),
                                                  round(max(values), 3)]


def bench_files(args, work: str) -> dict:
    size = parse_size(args.size)
    snap = os.path.join(work, "snap.chk")
    note(f"saving a {args.size} demo RAM, chunked (lz4, 64K)")
    subprocess.run([QFRAM, "save", "--demo", args.size, snap, "--layout", "chunked"],
                   check=True, capture_output=True)
    cases = {"standalone_1": (1, False), f"standalone_{args.clones}": (args.clones, False),
             "served_1": (1, True), f"served_{args.clones}": (args.clones, True)}
    rows = {name: [] for name in cases}
    for run in range(args.repeat):
        for name, (n, served) in cases.items():
            rows[name].append(run_case(snap, n, served, work))
            note(f"  run {run} {name}: {rows[name][-1]}")
    report = {"ram_bytes": size, "clones": args.clones, "repeat": args.repeat,
              "nonzero_chunks": nonzero_chunks(snap), "cases": {}}
    for name, rs in rows.items():
        wall, wall_spread = med(rs, "wall_s")
        peak, peak_spread = med(rs, "peak_bytes")
        report["cases"][name] = dict(wall_s=wall, wall_spread=wall_spread,
                                     peak_gib=round(peak / 2**30, 3),
                                     peak_spread_gib=[round(x / 2**30, 3) for x in peak_spread],
                                     verified=all(r["verified"] for r in rs),
                                     **({"chunks_decoded": rs[-1]["chunks_decoded"]}
                                        if "chunks_decoded" in rs[-1] else {}))
    one, many = report["cases"]["served_1"], report["cases"][f"served_{args.clones}"]
    alone = report["cases"][f"standalone_{args.clones}"]
    report["served_wall_ratio"] = round(many["wall_s"] / one["wall_s"], 2)
    report["served_peak_bound_gib"] = round(2 * one["peak_gib"] + 0.25, 3)
    report["standalone_wall_ratio"] = round(
        alone["wall_s"] / report["cases"]["standalone_1"]["wall_s"], 2)
    report["each_chunk_decoded_once"] = many.get("chunks_decoded") == report["nonzero_chunks"]
    report["targets"] = {
        "wall <= 3x one clone": report["served_wall_ratio"] <= 3,
        "peak <= 2x one clone + 0.25 GiB": many["peak_gib"] <= report["served_peak_bound_gib"],
        "each chunk decoded once": report["each_chunk_decoded_once"],
    }
    return report


def bench_qemu(args, work: str) -> dict:
    """restore-qemu --server: one clone, then --qemu-clones at once."""
    sys.path.insert(0, str(ROOT))
    from qfram._testing.qmp import Guest
    vmgenid = ["-device", "vmgenid,guid=auto"]
    with Guest(extra=vmgenid) as guest:
        guest.pmemsave(os.path.join(work, "truth.bin"), 64 << 20)
        guest.migrate_to_file(os.path.join(work, "vm.stream"))
    snap = os.path.join(work, "vm.chk")
    subprocess.run([QFRAM, "rewrite", os.path.join(work, "vm.stream"), snap, "--layout",
                    "chunked"], check=True, capture_output=True)
    truth = Path(work, "truth.bin").read_bytes()
    hole = (0xA0000, 0x100000)

    def restore_many(n: int) -> list:
        sock = os.path.join(work, f"qemu-{uuid.uuid4().hex[:6]}.sock")
        server = subprocess.Popen([QFRAM, "serve", snap, "--socket", sock],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        guests = []
        try:
            while not os.path.exists(sock):
                time.sleep(0.002)
            guests = [Guest(incoming="defer", extra=vmgenid).__enter__() for _ in range(n)]
            procs = [subprocess.Popen([QFRAM, "restore-qemu", snap, "--server", sock,
                                       "--qmp", g.spare_qmp_path, "--json", "--no-record"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for g in guests]
            out = []
            for k, (g, p) in enumerate(zip(guests, procs)):
                o, e = p.communicate(timeout=300)
                if p.returncode != 0:
                    raise SystemExit(f"restore-qemu failed: {e[-800:]}")
                g.pmemsave(os.path.join(work, f"after{k}.bin"), 64 << 20)
                after = Path(work, f"after{k}.bin").read_bytes()
                same = after[:hole[0]] == truth[:hole[0]] and after[hole[1]:] == truth[hole[1]:]
                out.append({"postcopy_active_ms": json.loads(o)["postcopy_active_ms"],
                            "ram_equal": same,
                            "generation": g.cmd("query-vm-generation-id")["guid"]})
            return out
        finally:
            for g in guests:
                g.__exit__(None, None, None)
            server.terminate()
            server.communicate(timeout=30)

    singles, many = [], []
    for run in range(args.repeat):
        singles += restore_many(1)
        many.append(restore_many(args.qemu_clones))
        note(f"  qemu run {run}: single {singles[-1]['postcopy_active_ms']} ms, "
             f"{args.qemu_clones} at once {[c['postcopy_active_ms'] for c in many[-1]]} ms")
    single = statistics.median(s["postcopy_active_ms"] for s in singles)
    worst = statistics.median(max(c["postcopy_active_ms"] for c in run) for run in many)
    return {"clones": args.qemu_clones, "single_postcopy_active_ms": round(single, 2),
            "clones_worst_postcopy_active_ms": round(worst, 2),
            "ratio": round(worst / single, 2),
            "ram_equal": all(c["ram_equal"] for run in many for c in run),
            "generation_ids_differ": all(len({c["generation"] for c in run}) == len(run)
                                         for run in many),
            "target_within_2x": worst <= 2 * single}


def main() -> int:
    parser = arguments(__doc__, size="1G", repeat=1)
    parser.add_argument("--clones", type=int, default=8)
    parser.add_argument("--qemu", action="store_true", help="also QEMU clones")
    parser.add_argument("--qemu-clones", type=int, default=4)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="qfram-fanout-", dir=os.environ.get("QFRAM_BENCH_DIR"))
    try:
        report = bench_files(args, work)
        if args.qemu:
            report["qemu"] = bench_qemu(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    c = report["cases"]
    lines = [f"{name:16} wall {r['wall_s']:7.3f} s  peak {r['peak_gib']:6.3f} GiB"
             + (f"  decoded {r['chunks_decoded']}" if "chunks_decoded" in r else "")
             for name, r in c.items()]
    lines.append(f"served: {args.clones} clones take {report['served_wall_ratio']}x one "
                 f"clone's time (standalone: {report['standalone_wall_ratio']}x); peak "
                 f"{c[f'served_{args.clones}']['peak_gib']} GiB (bound "
                 f"{report['served_peak_bound_gib']}); chunks decoded once: "
                 f"{report['each_chunk_decoded_once']}")
    if "qemu" in report:
        q = report["qemu"]
        lines.append(f"qemu: {q['clones']} clones at once reach postcopy-active after "
                     f"{q['clones_worst_postcopy_active_ms']} ms vs "
                     f"{q['single_postcopy_active_ms']} ms for one ({q['ratio']}x); RAM "
                     f"equal {q['ram_equal']}; generation IDs differ "
                     f"{q['generation_ids_differ']}")
    emit(args, report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
