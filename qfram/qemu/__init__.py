"""QEMU interoperability: its monitor (qmp), RAM and device state out of its streams
(streams: ``extract``, ``device_state``), and resuming an unmodified QEMU from a
snapshot as its postcopy source (restore)."""
from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    # qfram.qemu.extract() and device_state() as they were when this was one module
    if name in ("extract", "device_state"):
        return getattr(importlib.import_module("qfram.qemu.streams"), name)
    raise AttributeError(f"module 'qfram.qemu' has no attribute {name!r}")
