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


def test_every_python_block_is_run_or_named_here():  # (and the store's sh block below)
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


def test_the_store_section_works_as_written(tmp_path):
    """The README's store commands, run by bash as they stand (a smaller demo RAM; no
    QEMU): a local SeaweedFS started and stopped by scripts/store.sh."""
    section = README[README.index("## A snapshot store for a fleet"):]
    script = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    script = "\n".join(line for line in script.splitlines() if "restore-qemu" not in line)
    script = script.replace("--demo 1G", "--demo 64M").replace("--idle-exit 60",
                                                              "--idle-exit 1")
    store = tmp_path / "store"
    script = script.replace("scripts/store.sh start", f"scripts/store.sh start {store}")
    script = script.replace("scripts/store.sh env", f"scripts/store.sh env {store}")
    script = script.replace("scripts/store.sh stop", f"scripts/store.sh stop {store}")
    env = dict(os.environ, PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    try:
        out = subprocess.run(["bash", "-e", "-c", script + "\nwait"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run([str(ROOT / "scripts" / "store.sh"), "stop", str(store)],
                       capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"chunks_uploaded"' in out.stdout and "checksums verified" in out.stdout
    assert "removed s3://qfram/vm" in out.stdout
