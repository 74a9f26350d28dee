"""What a migration did, each side's statistics as a declared record (JSON only at the
edge, through ``as_dict``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from qfram._util.latency import Latency


@dataclass
class SourceStats:
    """The sending side: rounds, pages, bytes, what was released, how requests were
    served, and the downtime it saw."""

    role: str = "source"
    ram_bytes: int = 0
    dirty_tracking: str = ""
    precopy_rounds: int = 0
    precopy_pages: int = 0
    dirty_at_switch: int = 0
    postcopy_pages: int = 0         # sent after the switch, requested ones included
    requested_pages: int = 0
    requests: int = 0
    pages_sent: int = 0
    bytes_sent: int = 0
    released_bytes: int = 0         # freed here once the destination confirmed them
    confirmations: int = 0
    preempt_channel: bool = False
    verify_s: float = 0.0           # hashing the RAM at the switch, for the destination
    request_service: Latency = field(default_factory=Latency)
    downtime_source_ms: Optional[float] = None
    postcopy_s: Optional[float] = None
    postcopy_gbps: Optional[float] = None
    postcopy_bytes: int = 0
    resumes: int = 0                # links lost after the switch and resumed
    tls: Optional[str] = None       # the channels' protocol and cipher (None: clear)
    prefetched_pages: int = 0       # the working set's, sent at the switch before the rest
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DestinationStats:
    """The receiving side: when it switched and ran, how faults were served, and
    whether the memory checked out against the source."""

    role: str = "destination"
    precopy_s: Optional[float] = None
    pages_at_switch: int = 0
    downtime_destination_ms: Optional[float] = None
    postcopy_s: Optional[float] = None
    faults: int = 0
    requests: int = 0
    requested_pages: int = 0
    received_pages: int = 0
    duplicate_pages: int = 0
    eexist: int = 0
    fault_latency: Latency = field(default_factory=Latency)
    workload_first_touch: Optional[Latency] = None
    verified: bool = False
    resumes: int = 0                # links lost after the switch and resumed
    tls: Optional[str] = None       # the channels' protocol and cipher (None: clear)
    working_set: str = ""           # what was recorded for the next migration, or why not
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)
