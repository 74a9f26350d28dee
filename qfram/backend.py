"""Which implementation of the core is in use — the Cython extension, or, only when
``QFRAM_PURE_PYTHON=1`` says so, its pure-Python twin — and the contract both keep."""
from __future__ import annotations

import importlib
import os
from typing import Any

from qfram import wire

PURE_PYTHON = os.environ.get("QFRAM_PURE_PYTHON", "") == "1"

# The backend contract: the names both twins provide, with the same signatures (each is
# checked against the typed stub, qfram/_fast.pyi, by mypy.stubtest in the tests).
CONTRACT = ("QEMUFile", "is_zero", "discard", "bitmap_runs", "write_pages_at",
            "read_pages_at", "diff_pages", "punch_hole", "start_writeback")

impl: Any
if PURE_PYTHON:
    impl = importlib.import_module("qfram._pyfast")
else:
    try:
        impl = importlib.import_module("qfram._fast")
    except ImportError as exc:  # pragma: no cover - depends on how qfram was installed
        raise ImportError(
            "qfram's compiled core (qfram._fast) is not built. Build it with "
            "`pip install -e .` (or `python setup.py build_ext --inplace`) from the "
            "source tree, which needs Cython and a C compiler; or set "
            "QFRAM_PURE_PYTHON=1 to run the slow pure-Python twin on purpose."
        ) from exc

QEMUFile = impl.QEMUFile
is_zero = impl.is_zero

SEED_PARAMS = {"iov_max": wire.SEED_IOV_MAX, "buf_size": wire.SEED_BUF_SIZE,
               "release_min": wire.SEED_RELEASE_MIN}
DEFAULT_PARAMS = {"iov_max": wire.DEFAULT_IOV_MAX, "buf_size": wire.DEFAULT_BUF_SIZE,
                  "release_min": wire.DEFAULT_RELEASE_MIN}
