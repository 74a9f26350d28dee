"""qfram: move guest RAM through file descriptors at memory speed.

``import qfram`` gives the core's :class:`QEMUFile` (Cython; the pure-Python twin only
with ``QFRAM_PURE_PYTHON=1``), the entry points that open one over an fd, a socket,
memory, or any Python object, and qfram's errors.  Nothing is loaded until it is used
(PEP 562), so ``import qfram`` — and the ``qfram`` command that starts with it — costs
next to nothing; the subsystems are packages of their own (``qfram.snapshot``,
``qfram.lazy``, ``qfram.postcopy``, ``qfram.qemu``; see ARCHITECTURE.md).
"""
from __future__ import annotations

import importlib
# typing is not imported at run time: it costs every command ~2 ms (see
# scripts/bench_cli_start.py); annotations are strings (PEP 563)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from qfram import _moved
from qfram.errors import FormatError, OptionError, QFramError, StreamEnded

__version__ = "0.1.0"

# the public names, and the module each one lives in (loaded on first use)
_LAZY = {
    "QEMUFile": "qfram.backend", "is_zero": "qfram.backend", "PURE_PYTHON": "qfram.backend",
    "SEED_PARAMS": "qfram.backend", "DEFAULT_PARAMS": "qfram.backend",
    "fdopen": "qfram.io.channel", "socket_file": "qfram.io.channel",
    "buffer_file": "qfram.io.channel", "object_file": "qfram.io.channel",
    "FdChannel": "qfram.io.channel", "SocketChannel": "qfram.io.channel",
    "BufferChannel": "qfram.io.channel", "ObjectChannel": "qfram.io.channel",
    **{name: "qfram.wire" for name in (
        "RAM_SAVE_FLAG_ZERO", "RAM_SAVE_FLAG_MEM_SIZE", "RAM_SAVE_FLAG_PAGE",
        "RAM_SAVE_FLAG_EOS", "RAM_SAVE_FLAG_CONTINUE", "RAM_SAVE_FLAG_XBZRLE",
        "RAM_SAVE_FLAG_HOOK", "RAM_SAVE_FLAG_COMPRESS_PAGE", "RAM_SAVE_FLAG_MULTIFD_FLUSH")},
}

__all__ = sorted(_LAZY) + ["QFramError", "FormatError", "OptionError", "StreamEnded"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qfram' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value          # once loaded, a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


_moved.install()
