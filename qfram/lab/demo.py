"""An embedded demo "guest RAM": a deterministic mix of zero, text and random pages.

Used by the demo, the benchmarks and the tests, so that every one of them streams the
same kind of memory: about 30% zero pages (touched, so they are resident like a
running guest's), the rest split between text-like pages (compressible) and random
pages (not).
"""
from __future__ import annotations

import mmap
import random

from qfram.wire import TARGET_PAGE_SIZE


_WORDS = (b"qemu migrates guest memory page by page; dirty pages are sent again while "
          b"the vcpus run, and postcopy faults fetch what is missing. ")


def page_kind(index: int, seed: int = 0, zero_percent: int = 30) -> str:
    """'zero', 'text' or 'random' for page ``index`` (a cheap, stable hash)."""
    h = ((index + seed) * 2654435761) & 0xFFFFFFFF
    pct = (h >> 8) % 100
    if pct < zero_percent:
        return "zero"
    return "text" if pct < zero_percent + (100 - zero_percent) // 2 else "random"


def fill_demo(region, seed: int = 0, zero_percent: int = 30, touch_zero: bool = True) -> dict:
    """Fill ``region`` (a writable buffer, whole pages) with the demo mix.
    Returns the page counts by kind."""
    view = memoryview(region).cast("B")
    npages = len(view) // TARGET_PAGE_SIZE
    rng = random.Random(seed)
    pool = rng.randbytes(4 << 20)
    text = (_WORDS * (TARGET_PAGE_SIZE // len(_WORDS) + 1))[:TARGET_PAGE_SIZE]
    counts = {"zero": 0, "text": 0, "random": 0}
    for i in range(npages):
        kind = page_kind(i, seed, zero_percent)
        counts[kind] += 1
        off = i * TARGET_PAGE_SIZE
        if kind == "zero":
            if touch_zero:
                view[off] = 0          # resident, as a running guest's zero pages are
        elif kind == "text":
            view[off:off + TARGET_PAGE_SIZE] = text
            view[off:off + 8] = i.to_bytes(8, "little")
        else:
            start = (i * 4099 * 16) % (len(pool) - TARGET_PAGE_SIZE)
            view[off:off + TARGET_PAGE_SIZE] = pool[start:start + TARGET_PAGE_SIZE]
    return counts


def demo_ram(size: int, seed: int = 0, zero_percent: int = 30) -> mmap.mmap:
    """Private anonymous memory of ``size`` bytes (rounded down to pages), filled."""
    size -= size % TARGET_PAGE_SIZE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fill_demo(region, seed, zero_percent)
    return region
