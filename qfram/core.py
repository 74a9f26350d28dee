"""Which implementation of the core is in use: the Cython extension, or, only when
``QFRAM_PURE_PYTHON=1`` says so, its pure-Python twin.  Never a silent fallback."""
from __future__ import annotations

import importlib
import os
from typing import Any

PURE_PYTHON = os.environ.get("QFRAM_PURE_PYTHON", "") == "1"

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

RAM_SAVE_FLAG_ZERO = impl.RAM_SAVE_FLAG_ZERO
RAM_SAVE_FLAG_MEM_SIZE = impl.RAM_SAVE_FLAG_MEM_SIZE
RAM_SAVE_FLAG_PAGE = impl.RAM_SAVE_FLAG_PAGE
RAM_SAVE_FLAG_EOS = impl.RAM_SAVE_FLAG_EOS
RAM_SAVE_FLAG_CONTINUE = impl.RAM_SAVE_FLAG_CONTINUE
RAM_SAVE_FLAG_XBZRLE = impl.RAM_SAVE_FLAG_XBZRLE
RAM_SAVE_FLAG_HOOK = impl.RAM_SAVE_FLAG_HOOK
RAM_SAVE_FLAG_COMPRESS_PAGE = impl.RAM_SAVE_FLAG_COMPRESS_PAGE
RAM_SAVE_FLAG_MULTIFD_FLUSH = impl.RAM_SAVE_FLAG_MULTIFD_FLUSH

SEED_PARAMS = {"iov_max": impl.SEED_IOV_MAX, "buf_size": impl.SEED_BUF_SIZE,
               "release_min": impl.SEED_RELEASE_MIN}
DEFAULT_PARAMS = {"iov_max": impl.DEFAULT_IOV_MAX, "buf_size": impl.DEFAULT_BUF_SIZE,
                  "release_min": impl.DEFAULT_RELEASE_MIN}
