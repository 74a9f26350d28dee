"""The house keeps its floors: every qfram module imports only rooms on its own floor or
below (never a peer package on the same floor), nothing imports in a circle, and
ARCHITECTURE.md names every room that exists and nothing that does not.

The floors are ARCHITECTURE.md's, lowest first; a lower floor importing a higher one is
the defect this test exists to catch (it once hid a snapshot <-> chunked <-> journal
circle behind function-level imports).  Imports inside functions count like any other:
only the CLI imports lazily on purpose, and its imports go down too.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qfram"

# lowest first; rooms on one floor never import each other (each may import itself)
FLOORS: List[List[str]] = [
    ["qfram.errors"],
    ["qfram.wire", "qfram._util", "qfram.fileargs", "qfram._moved"],
    # "qfram" is the package's __init__ alone: the public names, loaded when used
    ["qfram", "qfram.results"],
    ["qfram.includes", "qfram._fast", "qfram._mapped", "qfram._pyfast", "qfram._chunks",
     "qfram._uffd", "qfram._pagescan", "qfram._shared", "qfram._sigbus", "qfram._tls",
     "qfram._requests", "qfram.backend"],
    ["qfram.ram"],
    ["qfram.io"],
    ["qfram.format"],
    ["qfram.snapshot"],
    ["qfram.lazy", "qfram.postcopy", "qfram.store"],
    ["qfram.qemu", "qfram.server"],
    ["qfram.lab", "qfram._testing"],
    ["qfram.cli"],
    ["qfram.__main__"],
]
# the compiled core's modules cimport each other (_uffd, _tls and _requests stand on
# _fast): one room
CORE = {"qfram._fast", "qfram._mapped", "qfram._pyfast", "qfram._chunks", "qfram._uffd",
        "qfram._pagescan", "qfram._shared", "qfram._sigbus", "qfram._tls", "qfram._requests",
        "qfram.backend", "qfram.includes"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> Dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".pyx", ".pxd", ".pxi") and "__pycache__" not in path.parts:
            found[module_name(path)] = path
    return found


MODULES = all_modules()


def resolve(name: str) -> str:
    """The most specific module a dotted import names (a.b.c where c may be a name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(path: Path) -> List[Tuple[str, int]]:
    """(module imported, line) for every qfram import, at any depth of the file."""
    found: List[Tuple[str, int]] = []
    text = path.read_text()
    if path.suffix == ".py":
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                found += [(a.name, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    else:                       # Cython: Python-level imports and cimports alike
        for k, line in enumerate(text.splitlines(), 1):
            m = re.match(r"\s*from\s+(qfram[\w.]*)\s+c?import\s+\(?([\w, ]+)", line)
            if m:
                found += [(f"{m.group(1)}.{n.strip()}", k) for n in m.group(2).split(",")
                          if n.strip()]
            m = re.match(r"\s*c?import\s+(qfram[\w.]*)", line)
            if m:
                found.append((m.group(1), k))
    return [(resolve(name), line) for name, line in found if name.startswith("qfram")]


def room_of(module: str) -> Tuple[int, str]:
    best = ("", -1)
    for floor, rooms in enumerate(FLOORS):
        for room in rooms:
            inside = module == room or (room != "qfram" and module.startswith(room + "."))
            if inside and len(room) > len(best[0]):
                best = (room, floor)
    if best[1] < 0:
        raise AssertionError(f"{module} is in no room of FLOORS: add it (and to "
                             f"ARCHITECTURE.md)")
    return best[1], best[0]


def graph() -> Dict[str, Set[str]]:
    """Who imports whom.  A package's __init__ importing its own modules (to re-export
    them) is left out: Python runs the __init__ first anyway, so that is no circle."""
    return {m: {t for t, _ in imports_of(p)
                if t and t != m and not t.startswith(m + ".")}
            for m, p in MODULES.items()}


def test_every_import_goes_down_or_stays_in_its_room():
    wrong = []
    for module, path in MODULES.items():
        floor, room = room_of(module)
        for target, line in imports_of(path):
            if not target or target == "qfram":
                continue
            t_floor, t_room = room_of(target)
            same_room = t_room == room or (room in CORE and t_room in CORE)
            if t_floor > floor or (t_floor == floor and not same_room):
                wrong.append(f"{path.relative_to(ROOT)}:{line} {module} ({room}, floor "
                             f"{floor}) imports {target} ({t_room}, floor {t_floor})")
    assert not wrong, "imports that climb or cross:\n" + "\n".join(wrong)


def test_nothing_imports_in_a_circle():
    edges = graph()
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    circles: List[List[str]] = []

    def visit(v: str) -> None:          # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for v in list(edges):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_layering_check_catches_a_lower_floor_importing_a_higher_one(tmp_path):
    """The check itself can fail: a planted upward import is found."""
    planted = tmp_path / "planted.py"
    planted.write_text("from qfram.cli import main\n")
    assert imports_of(planted) == [("qfram.cli", 1)]
    assert room_of("qfram.ram")[0] < room_of("qfram.cli")[0]


ARCH = ROOT / "ARCHITECTURE.md"


def named_in_architecture() -> Set[str]:
    """The modules and packages ARCHITECTURE.md's map names (`qfram/...` paths)."""
    names = set()
    for path in re.findall(r"qfram/[\w/]*(?:\.pyx|\.pxd|\.pxi|\.pyi|\.py|/)", ARCH.read_text()):
        names.add(path.rstrip("/"))
    return names


def test_architecture_names_every_room_and_only_rooms_that_exist():
    named = named_in_architecture()
    missing_files = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing_files, f"ARCHITECTURE.md names what does not exist: {missing_files}"
    packages = sorted(str(p.parent.relative_to(ROOT)) for p in PACKAGE.rglob("__init__.py")
                      if "__pycache__" not in p.parts)
    unnamed = [p for p in packages if p not in named and p != "qfram"]
    assert not unnamed, f"packages ARCHITECTURE.md does not name: {unnamed}"
    for floor in FLOORS:
        for room in floor:
            path = "qfram/__init__" if room == "qfram" else room.replace(".", "/")
            assert any(n == path or n.startswith(path + ".") or n == path + ".py"
                       for n in named), f"ARCHITECTURE.md does not name the room {room}"


def test_a_save_goes_down_to_the_file_without_climbing_back():
    """Everything qfram.snapshot reaches is on its floor or below: the path of a page
    from snapshot.save to the file only goes down."""
    edges = graph()
    top = room_of("qfram.snapshot")[0]
    seen: Set[str] = set()
    todo = [m for m in MODULES if m == "qfram.snapshot" or m.startswith("qfram.snapshot.")]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        assert room_of(m)[0] <= top, f"a save reaches {m}, above the snapshot floor"
        todo += list(edges.get(m, ()))
