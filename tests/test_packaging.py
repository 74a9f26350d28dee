"""How qfram is built and chosen: the typed stub matches, the twin only on request,
a missing extension says how to build it, and nothing leaks."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PAGE, private_anon

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, env_extra=None, pythonpath=None, flags=()):
    env = dict(os.environ)
    env.pop("QFRAM_PURE_PYTHON", None)
    env.update(env_extra or {})
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True,
                          env=env, cwd=pythonpath or ROOT, timeout=120)


def test_the_stub_matches_the_extension():
    pytest.importorskip("mypy")
    out = subprocess.run([sys.executable, "-m", "mypy.stubtest", "qfram._fast"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_pure_python_twin_keeps_the_same_contract(tmp_path):
    """The twin is checked against the extension's own stub: every name, signature and
    default the same (only what a compiled module alone has is allowed to differ)."""
    pytest.importorskip("mypy")
    stubs = tmp_path / "stubs" / "qfram"
    stubs.mkdir(parents=True)
    (stubs / "__init__.pyi").write_text("")
    shutil.copy(ROOT / "qfram" / "_fast.pyi", stubs / "_pyfast.pyi")
    allow = tmp_path / "allowlist"
    allow.write_text("qfram._pyfast.__pyx_capi__\n"       # the C entry points
                     "qfram._pyfast.QEMUFile\n")          # a C type is a disjoint base
    out = subprocess.run([sys.executable, "-m", "mypy.stubtest", "qfram._pyfast",
                          "--allowlist", str(allow)], capture_output=True, text=True,
                         cwd=tmp_path, env=dict(os.environ, MYPYPATH=str(tmp_path / "stubs")),
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_contract_is_what_the_stub_declares():
    from qfram import backend
    stub = (ROOT / "qfram" / "_fast.pyi").read_text()
    declared = set(re.findall(r"^(?:def|class) ([A-Za-z]\w*)", stub, re.M))
    assert declared == set(backend.CONTRACT)


def test_the_compiled_core_is_the_default():
    out = run_python("import qfram; print(qfram.QEMUFile.__module__, qfram.PURE_PYTHON)")
    assert out.stdout.split() == ["qfram._fast", "False"], out.stderr


def test_the_pure_python_twin_is_chosen_only_by_the_environment():
    out = run_python("import qfram; print(qfram.QEMUFile.__module__, qfram.PURE_PYTHON)",
                     {"QFRAM_PURE_PYTHON": "1"})
    assert out.stdout.split() == ["qfram._pyfast", "True"], out.stderr


def test_a_missing_extension_is_an_import_error_that_says_how_to_build(tmp_path):
    shutil.copytree(ROOT / "qfram", tmp_path / "qfram",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    # -S: no site-packages, so the editable install of the real tree stays out of reach;
    # `import qfram` loads nothing compiled (the CLI starts without it): the first use of
    # the core is where a missing build must say how to make one
    for code in ("from qfram import QEMUFile", "import qfram; qfram.fdopen",
                 "import qfram.snapshot"):
        out = run_python(code, pythonpath=tmp_path, flags=("-S",))
        assert out.returncode != 0, code
        assert "ImportError" in out.stderr and "pip install -e ." in out.stderr, code
        assert "QFRAM_PURE_PYTHON=1" in out.stderr


def test_every_requirement_is_listed_once_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    names = lambda reqs: {re.split(r"[<>=!~\[ ]", r)[0].lower() for r in reqs}  # noqa: E731
    # pytest is started with --timeout: `pip install -e .[test]` must bring the plugin
    if "--timeout" in project["tool"]["pytest"]["ini_options"]["addopts"]:
        assert "pytest-timeout" in names(extras["test"])
    # scripts/setup.sh installs from pyproject.toml and names no package of its own
    setup = (ROOT / "scripts" / "setup.sh").read_text().lower()
    listed = (names(project["project"]["dependencies"]) | names(extras["test"])
              | names(extras["plot"]) | names(project["build-system"]["requires"]))
    assert not [n for n in listed if re.search(rf"\b{re.escape(n)}\b", setup)]
    # the version is written once, in the package
    assert "version" in project["project"]["dynamic"]
    assert "__version__" in (ROOT / "qfram" / "__init__.py").read_text()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def test_open_close_cycles_leak_neither_fds_nor_memory(core):
    mm = private_anon(16 * PAGE)
    mm[:] = b"\x01" * (16 * PAGE)

    def cycle():
        r, w = os.pipe()
        f = core.fdopen(w, "wb")
        f.save_pages(mm, idstr="ram")
        f.put_buffer(b"x" * 1000)
        try:
            f.close()
        except BrokenPipeError:
            pass
        g = core.fdopen(r, "rb")
        g.close()

    for _ in range(200):        # warm up allocators
        cycle()
    fds, mem = open_fds(), rss()
    for _ in range(2000):
        cycle()
    assert open_fds() == fds
    assert rss() - mem < 4 << 20


def test_every_test_the_readme_cites_for_a_guarantee_exists():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## What qfram guarantees"):]
    section = section[:section.index("\n## ", 10)]
    cited = set(re.findall(r"`(test_[a-z0-9_]+)`", section))
    assert len(cited) > 10
    sources = {p.stem: p.read_text() for p in (ROOT / "tests").rglob("test_*.py")}
    missing = [name for name in cited if name not in sources
               and not any(f"def {name}(" in text for text in sources.values())]
    assert not missing
