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
class LazyStats:
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

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ResetStats:
    pages: int                  # written since the last reset, now the snapshot's again
    runs: int                   # runs of adjacent pages among them
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)
