"""Built-in workloads: programs that touch restored memory the way a guest does on
wake-up — random first touches, a stable hot set, a sandbox's few writes between
resets — for the demo, the CLI and the benchmarks."""
from __future__ import annotations

import random
import threading
import time
from typing import List, Tuple

from qfram._util.latency import Latency, percentiles
from qfram.ram import RAMBlock, RAMList
from qfram.wire import TARGET_PAGE_SIZE


def touch_workload(ram: RAMList, touches: int = 2000, threads: int = 4,
                   seed: int = 1) -> Latency:
    """A workload that touches memory the way a guest would on wake-up: several threads
    reading random pages.  Returns the first-touch latency percentiles it saw."""
    blocks = list(ram)

    def pages_of(k: int) -> List[Tuple[RAMBlock, int]]:
        rng = random.Random(seed * 1000 + k)
        chosen = []
        for _ in range(touches // threads):
            block = rng.choice(blocks)
            chosen.append((block, rng.randrange(block.npages)))
        return chosen

    return _touch([pages_of(k) for k in range(threads)])


def hot_set_workload(ram: RAMList, pages: int = 4096, threads: int = 4,
                     seed: int = 1) -> Latency:
    """A program with a stable hot set: the same ``pages`` pages (chosen by ``seed``,
    scattered over the RAM in small clusters, as a program's data is) are read by
    ``threads`` threads, each page once, every time it runs."""
    rng = random.Random(seed)
    blocks = list(ram)
    weights = [b.npages for b in blocks]
    pages = min(pages, sum(weights))
    chosen: dict = {}                   # (block index, page) -> block, in order
    while len(chosen) < pages:
        k = rng.choices(range(len(blocks)), weights)[0]
        start = rng.randrange(blocks[k].npages)
        for p in range(start, min(blocks[k].npages, start + 4)):
            chosen.setdefault((k, p), blocks[k])
    hot = [(block, p) for (_, p), block in list(chosen.items())[:pages]]
    rng.shuffle(hot)
    return _touch([hot[k::threads] for k in range(threads)])


def _touch(shares: List[List[Tuple[RAMBlock, int]]]) -> Latency:
    """One thread per share reads one byte of each of its pages; the latencies seen."""
    latencies: List[int] = []
    lock = threading.Lock()

    def run(share: List[Tuple[RAMBlock, int]]) -> None:
        mine = []
        for block, page in share:
            t0 = time.perf_counter_ns()
            block.region[page * TARGET_PAGE_SIZE]
            mine.append(time.perf_counter_ns() - t0)
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=run, args=(share,)) for share in shares]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return percentiles(latencies)


def scribble(ram: RAMList, pages: int, seed: int) -> None:
    """Write one byte into each of ``pages`` random pages (a sandbox's run, for the
    demo and the benchmark)."""
    rng = random.Random(seed)
    blocks = list(ram)
    weights = [b.npages for b in blocks]
    for _ in range(pages):
        block = rng.choices(blocks, weights)[0]
        block.region[rng.randrange(block.npages) * TARGET_PAGE_SIZE] = seed & 0xFF | 1
