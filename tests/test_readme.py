"""The README's Python examples run as written (paths made private to the test): a moved
module or a renamed argument breaks the build, not a reader's first try."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def block(*words: str) -> str:
    found = [b for b in BLOCKS if all(w in b for w in words)]
    assert len(found) == 1, f"README has {len(found)} python blocks with {words}"
    return found[0]


def run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_core_example_runs(tmp_path):
    code = block("qfram.fdopen").replace("1 << 30", "16 << 20")
    # the pipe's reader: the example writes more than a pipe holds
    code = code.replace("r, w = os.pipe()", "r, w = os.pipe()\nimport threading\n"
                        "threading.Thread(target=lambda: [None for _ in iter(lambda: "
                        "os.read(r, 1 << 20), b'')], daemon=True).start()")
    out = run(code, tmp_path)
    assert out.returncode == 0, out.stderr


def test_the_snapshot_example_runs(tmp_path):
    shm = f"/dev/shm/qfram-readme-{os.getpid()}"
    with open(shm, "wb") as f:
        f.truncate(8 << 20)
    try:
        code = block("snapshot.save", "LazyRestore").replace("/dev/shm/guest-ram", shm)
        out = run(code + "\nassert stats.verified\n", tmp_path)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "guest.snap").exists()
    finally:
        os.unlink(shm)


def test_every_python_block_is_run_or_named_here():
    """A new example is run by a test above or said here to need more than one host."""
    two_hosts = [b for b in BLOCKS if "postcopy.send" in b]
    run_here = [block("qfram.fdopen"), block("snapshot.save", "LazyRestore")]
    assert sorted(BLOCKS) == sorted(two_hosts + run_here)


@pytest.mark.parametrize("words", [("postcopy.send", "postcopy.receive")])
def test_the_two_host_example_names_what_exists(words):
    """The postcopy example needs two hosts; what it calls must still exist."""
    from qfram import postcopy
    text = block(*words)
    for name in re.findall(r"postcopy\.(\w+)\(", text):
        assert hasattr(postcopy, name), name
    for keyword in re.findall(r"(\w+)=", text):
        assert keyword in ("tls_creds", "release", "workload"), keyword
