"""How long things waited: latency percentiles of faults and page requests."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable


@dataclass
class Latency:
    """p50 / p99 / max of a set of waits, in microseconds, and how many there were."""

    p50_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0
    count: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def percentiles(values_ns: Iterable[int]) -> Latency:
    """The percentiles of waits given in nanoseconds."""
    ordered = sorted(values_ns)
    if not ordered:
        return Latency()

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 1)

    return Latency(pick(0.50), pick(0.99), round(ordered[-1] / 1000, 1), len(ordered))
