"""Where the modules of qfram's flat folder went when the house moved into rooms: the old
import paths keep working for a release, with a DeprecationWarning that names the new
one.  One table, one import hook; nothing in qfram itself uses the old paths."""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
import warnings
# typing is not imported at run time: it costs every command ~2 ms (see
# scripts/bench_cli_start.py); annotations are strings (PEP 563)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Tuple

# old module -> the modules its names now live in, searched in order
_TABLE = """
qfram.core                   qfram.backend
qfram.latency                qfram._util.latency
qfram.sched                  qfram._util.sched
qfram.channel                qfram.io.channel
qfram.outputs                qfram.io.outputs qfram._util.text
qfram.durable                qfram.io.durable qfram.errors
qfram.targets                qfram.io.targets
qfram.stream                 qfram.format.savevm qfram.errors
qfram.description            qfram.format.vmdesc
qfram.workingset             qfram.format.workingset
qfram.chunked                qfram.snapshot.chunked
qfram.journal                qfram.snapshot.journal
qfram.faults                 qfram.lazy.restore qfram.lab.workloads qfram.results
qfram.reset                  qfram.lazy.reset qfram.lab.workloads qfram.results
qfram.demo                   qfram.lab.demo
qfram.experiments            qfram.lab
qfram.experiments.footprint  qfram.lab.footprint
qfram.qmp                    qfram.qemu.qmp qfram.errors
qfram.restore_qemu           qfram.qemu.restore qfram.results
qfram.tlscreds               qfram.postcopy.tlscreds
qfram.postcopy.stats         qfram.results
"""
MOVED: Dict[str, Tuple[str, ...]] = {
    line.split()[0]: tuple(line.split()[1:]) for line in _TABLE.strip().splitlines()}


class _Alias(types.ModuleType):
    """An old module path: each name is looked up in the new homes, with a warning."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        homes = MOVED[self.__name__]
        warnings.warn(f"{self.__name__} moved to {' / '.join(homes)}: import {name} from "
                      f"there", DeprecationWarning, stacklevel=2)
        for home in homes:
            module = importlib.import_module(home)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"{self.__name__} (now {', '.join(homes)}) has no {name!r}")


class _Finder:
    """A meta path finder and loader for the old paths (no importlib.abc: importing it
    would cost every command several milliseconds)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        module = _Alias(spec.name)
        if spec.name == "qfram.experiments":
            module.__path__ = []            # a package: qfram.experiments.footprint
        return module

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
