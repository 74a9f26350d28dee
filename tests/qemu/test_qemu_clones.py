"""QEMU clones from one host page server: four unmodified QEMUs resumed at once by four
`qfram restore-qemu --server`, each with every byte of the snapshot, each knowing it is a
clone (its VM generation ID, `-device vmgenid,guid=auto`, differs from every other's)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from qfram._testing.qmp import Guest, find_qemu

PY = sys.executable
MEM = 64 << 20
PATTERN_ADDR = 16 << 20
HOLE = (0xA0000, 0x100000)     # VGA/SMRAM window and ROM shadows: pmemsave differs there
VMGENID = ["-device", "vmgenid,guid=auto"]

pytestmark = pytest.mark.skipif(find_qemu() is None, reason="qemu-system-x86_64 is not "
                                "installed (scripts/test.sh installs it)")


def qfram(*args) -> list:
    return [PY, "-m", "qfram", *args]


def test_four_qemu_clones_from_one_server_each_whole_each_its_own_generation(tmp_path):
    pattern = os.urandom(1 << 20) + b"qfram clone pattern " * 1000
    (tmp_path / "pattern.bin").write_bytes(pattern)
    loader = ["-device", f"loader,file={tmp_path / 'pattern.bin'},addr={PATTERN_ADDR},"
                         f"force-raw=on"]
    with Guest(extra=loader + VMGENID) as guest:
        guest.pmemsave(str(tmp_path / "truth.bin"), MEM)
        saved_id = guest.cmd("query-vm-generation-id")["guid"]
        guest.migrate_to_file(str(tmp_path / "stream.bin"))
    snap = str(tmp_path / "snap.chk")
    subprocess.run(qfram("rewrite", str(tmp_path / "stream.bin"), snap, "--layout",
                         "chunked"), check=True, capture_output=True)
    truth = (tmp_path / "truth.bin").read_bytes()
    sock = str(tmp_path / "pages.sock")
    server = subprocess.Popen(qfram("serve", snap, "--socket", sock, "--json"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    guests = []
    try:
        while not os.path.exists(sock):
            assert server.poll() is None, server.stderr.read()
            time.sleep(0.01)
        guests = [Guest(incoming="defer", extra=VMGENID).__enter__() for _ in range(4)]
        restores = [subprocess.Popen(qfram("restore-qemu", snap, "--server", sock, "--qmp",
                                           g.spare_qmp_path, "--json"),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True) for g in guests]
        ids = set()
        for k, (guest, proc) in enumerate(zip(guests, restores)):
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err + guest.output()
            stats = json.loads(out)
            assert stats["postcopy_active_ms"] is not None
            assert guest.cmd("query-migrate")["status"] == "completed"
            guest.pmemsave(str(tmp_path / f"after{k}.bin"), MEM)
            after = (tmp_path / f"after{k}.bin").read_bytes()
            assert after[:HOLE[0]] == truth[:HOLE[0]] and after[HOLE[1]:] == truth[HOLE[1]:]
            assert after[PATTERN_ADDR:PATTERN_ADDR + len(pattern)] == pattern
            ids.add(guest.cmd("query-vm-generation-id")["guid"])
        assert len(ids) == 4 and saved_id not in ids
    finally:
        for g in guests:
            g.__exit__(None, None, None)
        server.terminate()
        out, _ = server.communicate(timeout=30)
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["clients"] == 4 and stats["misses"] == stats["chunks_decoded"]
