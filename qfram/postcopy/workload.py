"""A built-in workload that touches guest RAM the way a guest does — a sequential scan,
random reads, random writes of a known pattern — and remembers what it wrote, so that
the end of a migration can be checked page by page.  It touches the memory with the GIL
released (a page that is not there yet blocks only its own thread)."""
from __future__ import annotations

import hashlib
import random
import threading
import time
from typing import Dict, List, Optional, Tuple

from qfram._uffd import read_memory, write_memory
from qfram.ram import RAMList
from qfram.wire import TARGET_PAGE_SIZE


def pattern(seed: int, block: str, page: int, generation: int) -> bytes:
    """The full page a workload write leaves (so it can be checked exactly)."""
    digest = hashlib.blake2b(f"{seed}:{block}:{page}:{generation}".encode(),
                             digest_size=64).digest()
    return digest * (TARGET_PAGE_SIZE // 64)


class Workload:
    """Runs ``kinds`` (a sequence of "scan", "read", "write") on threads over ``ram``
    until ``stop()`` or ``ops`` operations.  ``written`` maps (block, page) to the
    pattern it holds; ``touch_ns`` the time of each read of a page not touched before by
    this workload (first touches: on a postcopy destination, these are the faults)."""

    def __init__(self, ram: RAMList, kinds=("scan", "read", "write"), seed: int = 1,
                 ops: int = 0, pause_us: float = 0.0) -> None:
        self.ram = ram
        self.blocks = list(ram)
        self.kinds = list(kinds)
        self.seed = seed
        self.ops = ops
        self.pause = pause_us / 1e6
        self.written: Dict[Tuple[str, int], bytes] = {}
        self.originals: Dict[Tuple[str, int], bytes] = {}   # pages before the first write
        self.touch_ns: List[int] = []
        self.counts = {k: 0 for k in self.kinds}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._touched = set()
        self._generation = 0
        self.error: Optional[BaseException] = None

    def start(self) -> "Workload":
        for k, kind in enumerate(self.kinds):
            t = threading.Thread(target=self._run, args=(kind, k), daemon=True,
                                 name=f"qfram-workload-{kind}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.join(timeout)

    def join(self, timeout: Optional[float] = None) -> None:
        for t in self._threads:
            t.join(timeout)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _run(self, kind: str, k: int) -> None:
        rng = random.Random(self.seed * 7919 + k)
        done = 0
        try:
            if kind == "scan":
                for block in self.blocks:
                    for page in range(block.npages):
                        if self._stop.is_set() or (self.ops and done >= self.ops):
                            return
                        self._read(block, page)
                        done += 1
                return
            while not self._stop.is_set() and not (self.ops and done >= self.ops):
                block = rng.choice(self.blocks)
                page = rng.randrange(block.npages)
                if kind == "read":
                    self._read(block, page)
                else:
                    self._write(block, page)
                done += 1
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as exc:
            self.error = exc
        finally:
            with self._lock:
                self.counts[kind] += done

    def _read(self, block, page: int) -> None:
        key = (block.name, page)
        first = key not in self._touched
        t0 = time.perf_counter_ns()
        read_memory(block.region, page * TARGET_PAGE_SIZE, 1)
        if first:
            elapsed = time.perf_counter_ns() - t0
            with self._lock:
                if key not in self._touched:
                    self._touched.add(key)
                    self.touch_ns.append(elapsed)

    def _write(self, block, page: int) -> None:
        key = (block.name, page)
        if key not in self.originals:
            original = read_memory(block.region, page * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE)
        with self._lock:
            if key not in self.originals:
                self.originals[key] = original
            self._generation += 1
            data = pattern(self.seed, block.name, page, self._generation)
            # written under the lock: the last write to a page is the one remembered
            write_memory(block.region, page * TARGET_PAGE_SIZE, data)
            self.written[key] = data
            self._touched.add(key)
