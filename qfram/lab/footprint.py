"""Memory-footprint experiments: what moving RAM costs in memory, with and without
releasing sent pages.

A :class:`Sampler` thread records, 25 times a second, each watched process's RSS, USS, PSS,
shared and swap (psutil), the system's Shmem and MemAvailable (/proc/meminfo), and the
phase events the processes report.  A scenario runs a source and a destination as real
processes (each prints JSON event lines on stdout) and returns their time series.

What the counters can and cannot see (written into every report):

* RSS counts pages mapped in the process, anonymous and shared alike; USS the pages
  only this process maps; PSS shares each shared page among its mappers.
* memfd and /dev/shm pages are Shmem: a process's RSS shows only those it has touched,
  and they stay in Shmem until the file's pages are removed (MADV_REMOVE / hole punch)
  — MADV_DONTNEED on them lowers RSS but frees nothing, which only Shmem shows.
* Transparent huge pages are counted in RSS in 2 MiB steps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from qfram.errors import QFramError




def meminfo() -> Dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[name] = int(parts[0]) * (1024 if parts[-1] == "kB" else 1)
    return out


@dataclass
class Sample:
    t: float
    label: str
    rss: int
    uss: int
    pss: int
    shared: int
    swap: int
    shmem: int
    mem_available: int


@dataclass
class Series:
    """Samples and events of one run."""

    samples: List[Sample] = field(default_factory=list)
    events: List[dict] = field(default_factory=list)     # {"t", "label", "event", ...}
    t0: float = field(default_factory=time.monotonic)

    def by_label(self, label: str) -> List[Sample]:
        return [s for s in self.samples if s.label == label]

    def peak(self, label: str, counter: str = "uss") -> int:
        return max((getattr(s, counter) for s in self.by_label(label)), default=0)

    def final(self, label: str, counter: str = "uss") -> int:
        """The footprint once the process's work is done: the first sample at least
        0.1 s after its last event (processes hold still 0.3 s before they exit)."""
        mine = self.by_label(label)
        ends = [e["t"] for e in self.events if e["label"] == label]
        if not mine:
            return 0
        if ends:
            after = [s for s in mine if s.t >= max(ends) + 0.1]
            if after:
                return getattr(after[0], counter)
        return getattr(mine[-1], counter)

    def to_rows(self) -> List[dict]:
        return [dict(s.__dict__, t=round(s.t - self.t0, 4)) for s in self.samples]

    def write(self, stem: str) -> None:
        """stem.csv (the samples) and stem.json (samples and events)."""
        rows = self.to_rows()
        with open(stem + ".csv", "w") as f:
            f.write(",".join(Sample.__dataclass_fields__) + "\n")
            for r in rows:
                f.write(",".join(str(r[k]) for k in Sample.__dataclass_fields__) + "\n")
        with open(stem + ".json", "w") as f:
            json.dump({"samples": rows, "events": [dict(e, t=round(e["t"] - self.t0, 4))
                                                   for e in self.events]}, f)


class Sampler:
    """Samples processes (label -> pid) on a thread until stop()."""

    def __init__(self, hz: float = 25.0) -> None:
        self.interval = 1.0 / hz
        self.pids: Dict[str, int] = {}
        self.series = Series()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="qfram-sampler")
        self._lock = threading.Lock()

    def watch(self, label: str, pid: int) -> None:
        with self._lock:
            self.pids[label] = pid

    def event(self, label: str, event: str, t: Optional[float] = None, **data) -> None:
        with self._lock:
            self.series.events.append({"t": t if t is not None else time.monotonic(),
                                       "label": label, "event": event, **data})

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> Series:
        self._stop.set()
        self._thread.join()
        self.sample_once()
        return self.series

    def sample_once(self) -> None:
        import psutil
        info = meminfo()
        now = time.monotonic()
        with self._lock:
            pids = dict(self.pids)
        for label, pid in pids.items():
            try:
                m = psutil.Process(pid).memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.series.samples.append(Sample(now, label, m.rss, m.uss, getattr(m, "pss", 0),
                                              m.shared, getattr(m, "swap", 0),
                                              info.get("Shmem", 0),
                                              info.get("MemAvailable", 0)))

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.sample_once()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))


# ---------------------------------------------------------------------------------------
# scenarios: source and destination as real processes
# ---------------------------------------------------------------------------------------

SCENARIOS = {
    # name: (what it shows, runner kind, options)
    "snapshot-release": ("save with release (pages leave as they are written), then an "
                         "eager restore", "snapshot", {"release": True}),
    "snapshot-keep": ("the same save without release", "snapshot", {"release": False}),
    "postcopy-release": ("postcopy with release-ram: together the two sides hold about "
                         "one RAM", "postcopy", {"release": True}),
    "postcopy-keep": ("postcopy without release: the source keeps everything", "postcopy",
                      {"release": False}),
    "memfd-release": ("save with release of memfd RAM (shmem: freed by MADV_REMOVE)",
                      "snapshot", {"release": True, "kind": "memfd"}),
    "file-release": ("save with release of a /dev/shm file mapping", "snapshot",
                     {"release": True, "kind": "file"}),
    "thp-release": ("save with release of transparent-huge-page RAM", "snapshot",
                    {"release": True, "kind": "thp"}),
    "zero-heavy": ("save with release of RAM that is 90% zero pages", "snapshot",
                   {"release": True, "zero_percent": 90}),
    "random": ("save with release of RAM with no zero pages", "snapshot",
               {"release": True, "zero_percent": 0}),
    "lazy-restore": ("mapped snapshot restored lazily (userfaultfd) under a reading "
                     "workload", "snapshot", {"release": True, "layout": "mapped",
                                              "lazy": True}),
    "eager-restore": ("the same mapped snapshot restored eagerly", "snapshot",
                      {"release": True, "layout": "mapped"}),
}


def _child_command(role: str, **options) -> List[str]:
    return [sys.executable, "-m", "qfram.lab.footprint", "--child", role, json.dumps(options)]


def _pump(proc: subprocess.Popen, label: str, sampler: Sampler, lines: List[dict]) -> None:
    """Read a child's JSON event lines as they come."""
    for line in proc.stdout:                       # type: ignore[union-attr]
        line = line.strip()
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        lines.append(event)
        if "event" in event:
            sampler.event(label, event["event"], event.get("t"),
                          **{k: v for k, v in event.items() if k not in ("event", "t")})


def _run_children(children: Dict[str, List[str]], sampler: Sampler, timeout: float,
                  start_order: List[str], delay: float = 0.0) -> Dict[str, List[dict]]:
    procs = {}
    outputs: Dict[str, List[dict]] = {}
    pumps = []
    for label in start_order:
        proc = subprocess.Popen(children[label], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs[label] = proc
        outputs[label] = []
        sampler.watch(label, proc.pid)
        t = threading.Thread(target=_pump, args=(proc, label, sampler, outputs[label]),
                             daemon=True)
        t.start()
        pumps.append(t)
        if delay:
            time.sleep(delay)
    for label, proc in procs.items():
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise QFramError(f"{label} did not finish within {timeout} s")
        if proc.returncode:
            raise QFramError(f"{label} failed: {proc.stderr.read()[-2000:]}")  # type: ignore
    for t in pumps:
        t.join(5)
    return outputs


def run_scenario(name: str, size: int, workdir: str, hz: float = 25.0,
                 timeout: float = 600.0) -> dict:
    """Run one scenario; returns its series and a summary row."""
    what, kind, opts = SCENARIOS[name]
    sampler = Sampler(hz).start()
    t0 = time.monotonic()
    sampler.series.t0 = t0
    try:
        if kind == "snapshot":
            path = os.path.join(workdir, f"{name}.snap")
            save = _child_command("save", size=size, path=path, **opts)
            outputs = _run_children({"source": save}, sampler, timeout, ["source"])
            load = _child_command("load", path=path, **opts)
            outputs.update(_run_children({"destination": load}, sampler, timeout,
                                         ["destination"]))
            if os.path.exists(path):
                moved = os.path.getsize(path)
                os.unlink(path)
            else:
                moved = 0
        else:
            address = os.path.join(workdir, f"{name}.sock")
            recv = _child_command("receive", address=address, **opts)
            send = _child_command("send", address=address, size=size, **opts)
            outputs = _run_children({"destination": recv, "source": send}, sampler, timeout,
                                    ["destination", "source"], delay=0.5)
            result = next((o for o in outputs["source"] if "bytes_sent" in o), {})
            moved = result.get("bytes_sent", 0)
    finally:
        series = sampler.stop()
    summary = {"scenario": name, "what": what, "ram_bytes": size, "bytes_moved": moved,
               "seconds": round(time.monotonic() - t0, 3)}
    for label in ("source", "destination"):
        for counter in ("rss", "uss"):
            summary[f"{label}_peak_{counter}"] = series.peak(label, counter)
            summary[f"{label}_final_{counter}"] = series.final(label, counter)
    base = series.samples[0].shmem if series.samples else 0
    summary["shmem_peak"] = max((s.shmem - base for s in series.samples), default=0)
    return {"summary": summary, "series": series, "outputs": outputs}


# ---------------------------------------------------------------------------------------
# the child processes
# ---------------------------------------------------------------------------------------


def _emit(event: str, **data) -> None:
    print(json.dumps({"t": time.monotonic(), "event": event, **data}), flush=True)


def _make_ram(size: int, kind: str, zero_percent: int, workdir: str):
    from qfram.lab.demo import fill_demo
    from qfram.ram import RAMBlock, RAMList
    if kind == "memfd":
        block = RAMBlock.memfd("pc.ram", size)
    elif kind == "file":
        where = "/dev/shm" if os.path.isdir("/dev/shm") else workdir
        block = RAMBlock.map_file("pc.ram", os.path.join(where, f"qfram-ram-{os.getpid()}"),
                                  size, create=True)
    else:
        block = RAMBlock.anonymous("pc.ram", size, huge=kind == "thp")
    fill_demo(block.region, zero_percent=zero_percent)
    return RAMList([block])


def _child(role: str, o: dict) -> None:
    from qfram import snapshot
    kind = o.get("kind", "anonymous")
    if role == "save":
        workdir = os.path.dirname(o["path"])
        ram = _make_ram(o["size"], kind, o.get("zero_percent", 30), workdir)
        _emit("ram-ready")
        time.sleep(0.3)                              # a flat stretch before the save
        _emit("save-start")
        r = snapshot.save(ram, o["path"], layout=o.get("layout", "stream"),
                          release=o.get("release", False))
        _emit("save-end", bytes_moved=r.file_bytes, released=r.released_bytes)
        time.sleep(0.3)
        if kind == "file":
            os.unlink(ram["pc.ram"].path)
        ram.close()
    elif role == "load":
        _emit("load-start")
        if o.get("lazy"):
            from qfram.lazy import LazyRestore
            from qfram.lab import workloads
            with LazyRestore(o["path"]) as lazy:
                _emit("running")
                workloads.touch_workload(lazy.ram, 2000)
                stats = lazy.wait()
                _emit("load-end", faults=stats.faults, background=stats.background_pages)
                time.sleep(0.3)
        else:
            ram, result = snapshot.load(o["path"])
            _emit("load-end", verified=result.verified)
            time.sleep(0.3)
            ram.close()
    elif role == "send":
        from qfram import postcopy
        ram = _make_ram(o["size"], kind, o.get("zero_percent", 30), "/tmp")
        _emit("ram-ready")
        time.sleep(0.3)
        _emit("migration-start")
        stats = postcopy.send(ram, o["address"], release=o.get("release", False),
                              max_rounds=1)
        _emit("migration-end", bytes_sent=stats.bytes_sent,
              released_bytes=stats.released_bytes, precopy_rounds=stats.precopy_rounds)
        print(json.dumps(stats.as_dict()), flush=True)
        time.sleep(0.3)
    elif role == "receive":
        from qfram import postcopy
        factory = lambda r: postcopy.Workload(r, kinds=("read",), pause_us=50)  # noqa: E731
        ram, stats = postcopy.receive(o["address"], workload=factory)
        _emit("switch", t_switch=stats.downtime_destination_ms)
        _emit("received", faults=stats.faults, verified=stats.verified)
        time.sleep(0.3)
        ram.close()
    else:
        raise SystemExit(f"unknown role {role}")


# ---------------------------------------------------------------------------------------
# plots and reports (matplotlib: optional, imported only here)
# ---------------------------------------------------------------------------------------


def plot(series: Series, title: str, path: str) -> bool:
    """A PNG of USS and RSS over time for both processes, with the phase markers.
    False when matplotlib is not installed (pip install qfram[plot])."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    colors = {"source": "tab:blue", "destination": "tab:orange"}
    for label, color in colors.items():
        mine = series.by_label(label)
        if not mine:
            continue
        t = [s.t - series.t0 for s in mine]
        ax.plot(t, [s.uss / 2**20 for s in mine], color=color, label=f"{label} USS")
        ax.plot(t, [s.rss / 2**20 for s in mine], color=color, linestyle=":",
                label=f"{label} RSS")
    if series.samples:
        t = [s.t - series.t0 for s in series.samples]
        base = series.samples[0].shmem
        ax.plot(t, [(s.shmem - base) / 2**20 for s in series.samples], color="gray",
                linestyle="--", linewidth=0.8, label="system Shmem growth")
    for e in series.events:
        x = e["t"] - series.t0
        ax.axvline(x, color=colors.get(e["label"], "k"), alpha=0.3, linewidth=0.8)
        ax.text(x, ax.get_ylim()[1] * 0.98, e["event"], rotation=90, fontsize=7,
                va="top", ha="right")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


COUNTERS_NOTE = __doc__.split("What the counters can and cannot see")[1].split('"""')[0]


def report(rows: List[dict], command: str, machine: str) -> str:
    """A markdown table of the runs: peak and final footprint, bytes moved, time."""
    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    lines = ["# qfram memory footprint", "",
             f"Measured with `{command}` on {machine}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.  MiB; USS = memory "
             f"only that process holds.", "",
             "| scenario | run | RAM | source peak USS | source final USS | dest peak USS "
             "| dest final USS | Shmem growth | moved | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r.get('run', 1)} | {mib(r['ram_bytes'])} | "
                     f"{mib(r['source_peak_uss'])} | {mib(r['source_final_uss'])} | "
                     f"{mib(r['destination_peak_uss'])} | {mib(r['destination_final_uss'])} "
                     f"| {mib(r['shmem_peak'])} | {mib(r['bytes_moved'])} | {r['seconds']} |")
    lines += ["", "Scenarios:", ""]
    seen = set()
    for r in rows:
        if r["scenario"] not in seen:
            seen.add(r["scenario"])
            lines.append(f"* **{r['scenario']}**: {r['what']}")
    lines += ["", "What the counters can and cannot see:", COUNTERS_NOTE.rstrip(), ""]
    return "\n".join(lines)


def run_experiments(names: List[str], size: int, out: str, repeat: int = 1,
                    command: str = "qfram footprint",
                    progress: Callable[[str], None] = lambda line: None) -> List[dict]:
    """Run scenarios ``repeat`` times each; write per run ``NAME-RUN.csv/.json/.png`` and
    a ``report.md`` into ``out``.  Returns the summary rows."""
    import platform
    os.makedirs(out, exist_ok=True)
    rows = []
    for name in names:
        for run in range(1, repeat + 1):
            result = run_scenario(name, size, out)
            stem = os.path.join(out, f"{name}-{run}")
            result["series"].write(stem)
            plotted = plot(result["series"], f"{name} ({size >> 20} MiB): "
                                             f"{SCENARIOS[name][0]}", stem + ".png")
            row = dict(result["summary"], run=run, plot=plotted)
            rows.append(row)
            progress(f"{name} run {run}: source peak/final USS "
                     f"{row['source_peak_uss'] >> 20}/{row['source_final_uss'] >> 20} MiB, "
                     f"destination {row['destination_peak_uss'] >> 20}/"
                     f"{row['destination_final_uss'] >> 20} MiB, {row['seconds']} s")
    machine = (f"{platform.node()} ({os.cpu_count()} CPUs, "
               f"{meminfo().get('MemTotal', 0) >> 30} GiB, Linux {platform.release()})")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report(rows, command, machine))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1], json.loads(argv[2]))
        return 0
    raise SystemExit("use `qfram footprint` or scripts/experiments/footprint.py")


if __name__ == "__main__":
    sys.exit(main())
