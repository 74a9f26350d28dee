"""What qfram's operations return: every result and stats type, each with ``as_dict()``
(the CLI's ``--json``), and the names a caller picks from (layouts, codecs).

The enums are ``str`` enums: ``Layout.MAPPED == "mapped"``, so a caller that passes or
compares plain strings keeps working, and JSON shows the string.
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from qfram._util.latency import Latency


class Layout(str, enum.Enum):
    """How a snapshot file lays out its pages."""

    STREAM = "stream"      # a QEMU migration stream: page records one after the other
    MAPPED = "mapped"      # QEMU's mapped-ram: every page at a fixed offset
    CHUNKED = "chunked"    # qfram's: compressed chunks with an index

    def __str__(self) -> str:
        return self.value


class Codec(str, enum.Enum):
    """How pages or chunks are compressed."""

    ZLIB = "zlib"          # QEMU's COMPRESS_PAGE (stream layout)
    LZ4 = "lz4"            # stream layout (a qfram extension) and chunked layout
    ZSTD = "zstd"          # chunked layout

    def __str__(self) -> str:
        return self.value


class Record:
    """A result: ``as_dict()`` is what ``--json`` prints."""

    def as_dict(self) -> dict:
        return asdict(self)              # type: ignore[call-overload]


class _Timed:
    """A result with ``ram_bytes`` moved in ``seconds``: JSON gets the rate too."""

    ram_bytes: int
    seconds: float

    def as_dict(self) -> dict:
        rate = round(self.ram_bytes / self.seconds / 1e9, 3) if self.seconds else None
        return dict(self.__dict__, gbps=rate)


@dataclass
class SaveResult(_Timed):
    path: str
    layout: str
    ram_bytes: int
    file_bytes: int
    pages: int
    zero_pages: int
    unchanged_pages: int
    seconds: float
    released_bytes: int
    checksums: Dict[str, str]
    compression: Optional[str] = None


@dataclass
class LoadResult(_Timed):
    path: str
    layout: str
    ram_bytes: int
    pages: int
    zero_pages: int
    seconds: float
    verified: bool
    blocks: List[dict] = field(default_factory=list)


@dataclass
class LazyStats(Record):
    faults: int
    fault_pages: int
    background_pages: int
    zero_pages: int
    eexist: int
    seconds: float
    verified: bool
    handler_latency: Latency
    prefetch_pages: int = 0         # placed from the recorded working set before use
    prefetch_seconds: float = 0.0
    working_set: str = ""           # what became of the working set (used, recorded, why not)


@dataclass
class ResetStats(Record):
    pages: int                  # written since the last reset, now the snapshot's again
    runs: int                   # runs of adjacent pages among them
    seconds: float


@dataclass
class SourceStats(Record):
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
    postcopy_cpu_s: Optional[float] = None      # this process's CPU time after the switch
    background_cpu_s: Optional[float] = None    # the background stream's thread's
    urgent_threads: str = ""        # how the request server runs: fifo, short-slice
    resumes: int = 0                # links lost after the switch and resumed
    tls: Optional[str] = None       # the channels' protocol and cipher (None: clear)
    prefetched_pages: int = 0       # the working set's, sent at the switch before the rest
    seconds: float = 0.0


@dataclass
class DestinationStats(Record):
    """The receiving side: when it switched and ran, how faults were served, and
    whether the memory checked out against the source."""

    role: str = "destination"
    precopy_s: Optional[float] = None
    pages_at_switch: int = 0
    downtime_destination_ms: Optional[float] = None
    postcopy_s: Optional[float] = None    # RUN -> every stream read and its pages placed
    postcopy_gbps: Optional[float] = None  # pages placed after RUN / postcopy_s
    faults: int = 0
    requests: int = 0
    requested_pages: int = 0
    received_pages: int = 0
    duplicate_pages: int = 0
    eexist: int = 0
    placement: str = ""             # how arrived pages were placed (userfaultfd ioctl)
    placements_offered: List[str] = field(default_factory=list)   # what the kernel has
    urgent_threads: str = ""        # how the threads a fault waits on run: fifo (real-time),
                                    # short-slice (EEVDF), default
    placing_calls: int = 0          # placing ioctls of the receivers (a run each)
    receive_cpu_s: Optional[float] = None     # CPU time of the receiving threads
    fault_cpu_s: Optional[float] = None       # of the fault thread
    postcopy_cpu_s: Optional[float] = None    # of this whole process, RUN -> all placed
    fault_latency: Latency = field(default_factory=Latency)
    workload_first_touch: Optional[Latency] = None
    verified: bool = False
    resumes: int = 0                # links lost after the switch and resumed
    tls: Optional[str] = None       # the channels' protocol and cipher (None: clear)
    working_set: str = ""           # what was recorded for the next migration, or why not
    seconds: float = 0.0


@dataclass
class RestoreStats(Record):
    """What a restore into QEMU did and how long the guest waited."""

    snapshot: str = ""
    machine: str = ""
    ram_bytes: int = 0
    device_bytes: int = 0
    postcopy_active_ms: Optional[float] = None   # start -> QEMU says postcopy-active
    completed_s: Optional[float] = None          # start -> QEMU says completed
    pages_pushed: int = 0
    pages_requested: int = 0
    postcopy_s: Optional[float] = None           # the switch -> QEMU's SHUT
    postcopy_gbps: Optional[float] = None        # every page over postcopy_s: QEMU places
    requests: int = 0
    request_service: Latency = field(default_factory=Latency)
    bytes_sent: int = 0
    qemu_version: str = ""
    pages_prefetched: int = 0     # the recorded working set, in place before the guest ran
    working_set: str = ""         # what became of it (used, recorded, why not)


@dataclass
class ServeStats(Record):
    """What a host page server did (``qfram serve --json``, at exit and on SIGUSR1)."""

    snapshot: str = ""
    socket: str = ""
    clients: int = 0              # identified clients, all told
    clients_now: int = 0
    refused: int = 0              # wrong user, or another snapshot named
    requests: int = 0
    hits: int = 0                 # chunks asked for that were in the cache
    misses: int = 0               # chunks decoded for a request
    joined: int = 0               # chunks asked for while their decode was under way
    chunks_decoded: int = 0       # each chunk once, unless it was evicted meanwhile
    chunks_cached: int = 0
    cache_bytes: int = 0
    evictions: int = 0
    bytes_served: int = 0         # the chunks answered READY, all told
    failures: int = 0             # chunks that could not be decoded
    seconds: float = 0.0


@dataclass
class PushStats(Record):
    """What ``qfram push`` did (``--json``)."""

    url: str = ""
    ram_bytes: int = 0
    chunks_total: int = 0         # every chunk of the RAM
    chunks_zero: int = 0          # never stored
    chunks_unique: int = 0        # distinct non-zero chunks
    chunks_uploaded: int = 0
    chunks_deduplicated: int = 0  # the store held them already
    bytes_uploaded: int = 0       # chunk objects, compressed
    manifest_bytes: int = 0
    seconds: float = 0.0


@dataclass
class FetchStats(Record):
    """What a restore from a store fetched (``qfram load/pull s3://... --json``)."""

    url: str = ""
    ram_bytes: int = 0
    chunks: int = 0               # non-zero chunks placed
    fetched: int = 0              # chunk objects that came from the store
    fetched_bytes: int = 0
    cache_hits: int = 0           # from this host's chunk cache
    requests: int = 0             # requests to the store
    seconds: float = 0.0
    verified: bool = False

    def as_dict(self) -> dict:
        d = asdict(self)
        d["gbps"] = round(self.ram_bytes / self.seconds / 1e9, 3) if self.seconds else None
        return d


@dataclass
class GCStats(Record):
    """What ``qfram gc`` found and removed (``--json``)."""

    url: str = ""
    snapshots: int = 0            # manifests read (each protects its chunks)
    other_objects: int = 0        # objects in the bucket that are not qfram's
    chunks: int = 0               # chunk objects found
    chunks_removed: int = 0       # named by no snapshot, older than the grace period
    chunks_young: int = 0         # named by none, but younger: kept this time
    bytes_removed: int = 0
    dry_run: bool = False
