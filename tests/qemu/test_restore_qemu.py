"""A real, unmodified QEMU resumed from a snapshot by `qfram restore-qemu`: its RAM
arrives over QEMU's own postcopy protocol, qfram being the source.  QEMU 7.2 (Debian's)
and 10.x (bookworm-backports, fetched by scripts/test.sh) where present."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from qfram import wire
from qfram._testing.qmp import Guest, find_qemu, qemu_version
from qfram.postcopy import messages as msg

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEWER = os.path.join(ROOT, ".cache", "qemu-backports", "root")
MEM = 64 << 20
PATTERN_ADDR = 16 << 20
HOLE = (0xA0000, 0x100000)     # VGA/SMRAM window and ROM shadows: pmemsave differs there

pytestmark = pytest.mark.skipif(
    find_qemu() is None and shutil.which("apt-get") is None,
    reason="qemu-system-x86_64 is not installed and cannot be (no apt-get)")


def qfram(*args) -> list:
    return [PY, "-m", "qfram", *args]


def qemus():
    """(id, binary, firmware dir) of every QEMU here: Debian's, and the newer one."""
    found = []
    if find_qemu():
        found.append(("qemu7", find_qemu(), None))
    newer = os.path.join(NEWER, "usr/bin/qemu-system-x86_64")
    if os.path.exists(newer):
        found.append(("qemu10", newer, os.path.join(NEWER, "usr/share/qemu")))
    return found


@pytest.fixture(params=["qemu7", "qemu10"])
def qemu_bin(request):
    for name, binary, firmware in qemus():
        if name == request.param:
            return binary, firmware
    pytest.skip(f"{request.param} is not here (scripts/test.sh fetches it)")


def same_ram(a: bytes, b: bytes) -> bool:
    return a[:HOLE[0]] == b[:HOLE[0]] and a[HOLE[1]:] == b[HOLE[1]:]


def saved_vm(tmp_path, qemu_bin, running: bool = False):
    """A guest with a known pattern in its RAM, saved by QEMU itself (a stream, made
    mapped by qfram rewrite); returns the snapshot path and pmemsave's truth."""
    binary, firmware = qemu_bin
    pattern = os.urandom(1 << 20) + b"qfram restore pattern " * 1000
    (tmp_path / "pattern.bin").write_bytes(pattern)
    with Guest(qemu=binary, firmware=firmware, running=running,
               extra=["-device", f"loader,file={tmp_path / 'pattern.bin'},"
                                 f"addr={PATTERN_ADDR},force-raw=on"]) as guest:
        if running:
            time.sleep(0.5)                       # the firmware runs, writes RAM
            guest.cmd("stop")
        guest.pmemsave(str(tmp_path / "truth.bin"), MEM)
        guest.migrate_to_file(str(tmp_path / "stream.bin"))
    subprocess.run(qfram("rewrite", str(tmp_path / "stream.bin"), str(tmp_path / "snap"),
                         "--layout", "mapped"), check=True, capture_output=True)
    return str(tmp_path / "snap"), (tmp_path / "truth.bin").read_bytes(), pattern


def restore(snap: str, guest: Guest, *extra, timeout: float = 120):
    return subprocess.run(qfram("restore-qemu", snap, "--qmp", guest.spare_qmp_path,
                                "--json", *extra), capture_output=True, text=True,
                          timeout=timeout)


def test_a_qemu_saved_vm_resumes_lazily_with_every_byte(tmp_path, qemu_bin):
    snap, truth, pattern = saved_vm(tmp_path, qemu_bin)
    binary, firmware = qemu_bin
    with Guest(qemu=binary, firmware=firmware, incoming="defer") as guest:
        done = restore(snap, guest)
        assert done.returncode == 0, done.stderr + guest.output()
        stats = json.loads(done.stdout)
        assert guest.cmd("query-migrate")["status"] == "completed"
        guest.pmemsave(str(tmp_path / "after.bin"), MEM)
    after = (tmp_path / "after.bin").read_bytes()
    assert same_ram(after, truth)
    assert after[PATTERN_ADDR:PATTERN_ADDR + len(pattern)] == pattern
    assert stats["postcopy_active_ms"] is not None
    assert stats["postcopy_active_ms"] <= stats["completed_s"] * 1000
    assert stats["pages_pushed"] + stats["pages_requested"] == stats["ram_bytes"] // 4096


def test_the_recorded_working_set_is_in_place_before_the_guest_runs(tmp_path, qemu_bin):
    # pages sent before the switch, while QEMU still loads as precopy: each exactly once
    # (QEMU fails on a page placed twice), and the RAM is the snapshot's to the byte
    from qfram import snapshot
    from qfram.format import workingset
    snap, truth, pattern = saved_vm(tmp_path, qemu_bin)
    info = snapshot.inspect(snap)
    ram_index = [b.name for b in info.blocks].index("pc.ram")
    hot = [(ram_index, PATTERN_ADDR // 4096 + 3 * i) for i in range(200)]
    fd = os.open(snap, os.O_RDONLY)
    workingset.save(snap, fd, info, workingset.WorkingSet(hot, 1, time.time()))
    os.close(fd)
    binary, firmware = qemu_bin
    with Guest(qemu=binary, firmware=firmware, incoming="defer") as guest:
        done = restore(snap, guest)
        assert done.returncode == 0, done.stderr + guest.output()
        stats = json.loads(done.stdout)
        guest.pmemsave(str(tmp_path / "after.bin"), MEM)
    assert stats["pages_prefetched"] == len(hot), stats["working_set"]
    assert stats["pages_prefetched"] + stats["pages_pushed"] + stats["pages_requested"] \
        == stats["ram_bytes"] // 4096
    assert same_ram((tmp_path / "after.bin").read_bytes(), truth)


def test_a_compressed_chunked_snapshot_resumes_a_vm_too(tmp_path, qemu_bin):
    # the chunks are decoded by a lazy restore in qfram as the pages go out
    snap, truth, pattern = saved_vm(tmp_path, qemu_bin)
    small = str(tmp_path / "vm.chunked")
    subprocess.run(qfram("rewrite", snap, small, "--layout", "chunked", "--codec", "zstd"),
                   check=True, capture_output=True)
    binary, firmware = qemu_bin
    with Guest(qemu=binary, firmware=firmware, incoming="defer") as guest:
        done = restore(small, guest)
        assert done.returncode == 0, done.stderr + guest.output()
        assert guest.cmd("query-migrate")["status"] == "completed"
        guest.pmemsave(str(tmp_path / "after.bin"), MEM)
    assert same_ram((tmp_path / "after.bin").read_bytes(), truth)
    assert json.loads(done.stdout)["device_bytes"] > 0


def test_a_running_guest_runs_on_from_the_snapshot(tmp_path, qemu_bin):
    """The guest runs from the moment QEMU switches, before its RAM is in (its touches
    become requests; the Linux guest test counts them)."""
    snap, truth, pattern = saved_vm(tmp_path, qemu_bin, running=True)
    binary, firmware = qemu_bin
    with Guest(qemu=binary, firmware=firmware, incoming="defer", running=True) as guest:
        done = restore(snap, guest)
        assert done.returncode == 0, done.stderr + guest.output()
        assert guest.cmd("query-status")["status"] == "running"
        guest.cmd("stop")
        guest.pmemsave(str(tmp_path / "after.bin"), MEM)
    after = (tmp_path / "after.bin").read_bytes()
    # the guest ran on: what it did not write is the snapshot's
    assert after[PATTERN_ADDR:PATTERN_ADDR + len(pattern)] == pattern


def test_a_ram_only_qfram_snapshot_restores_with_devices_at_reset(tmp_path, qemu_bin):
    binary, firmware = qemu_bin
    ram = os.urandom(1 << 20) * (MEM >> 20)
    (tmp_path / "pc.ram").write_bytes(ram)
    subprocess.run(qfram("save", f"pc.ram={tmp_path / 'pc.ram'}", str(tmp_path / "snap"),
                         "--layout", "mapped"), check=True, capture_output=True)
    with Guest(qemu=binary, firmware=firmware, incoming="defer") as guest:
        done = restore(str(tmp_path / "snap"), guest)
        assert done.returncode == 0, done.stderr + guest.output()
        guest.pmemsave(str(tmp_path / "after.bin"), MEM)
    assert same_ram((tmp_path / "after.bin").read_bytes(), ram)
    assert json.loads(done.stdout)["machine"] == \
        "pc-i440fx-{}.{}".format(*qemu_version(binary))


def test_a_stream_layout_snapshot_is_refused_with_the_way_out(tmp_path):
    subprocess.run(qfram("save", "--demo", "8M", str(tmp_path / "snap")), check=True,
                   capture_output=True)
    guest = Guest(incoming="defer")
    try:
        done = restore(str(tmp_path / "snap"), guest)
    finally:
        guest.close()
    assert done.returncode == 1 and "--layout mapped" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_qemu_not_waiting_for_a_migration_is_refused(tmp_path):
    subprocess.run(qfram("save", "--demo", "8M", str(tmp_path / "snap"), "--layout",
                         "mapped"), check=True, capture_output=True)
    with Guest() as guest:                          # no -incoming
        done = restore(str(tmp_path / "snap"), guest)
    assert done.returncode == 1 and "-incoming defer" in done.stderr


BIG = 256 << 20


@pytest.fixture(scope="module")
def big_snapshot(tmp_path_factory):
    """A RAM-only snapshot of 256 MiB of random bytes: its restore takes long enough to
    be cut."""
    work = tmp_path_factory.mktemp("big")
    with open(work / "pc.ram", "wb") as out:
        for _ in range(BIG >> 24):
            out.write(os.urandom(1 << 24))
    subprocess.run(qfram("save", f"pc.ram={work / 'pc.ram'}", str(work / "snap"),
                         "--layout", "mapped"), check=True, capture_output=True)
    os.unlink(work / "pc.ram")
    return str(work / "snap")


def wait_for_status(guest: Guest, wanted, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while True:
        status = guest.cmd("query-migrate").get("status", "none")
        if status in wanted or time.time() > deadline:
            return status
        time.sleep(0.001)


def test_killing_qfram_mid_restore_never_leaves_qemu_silently_wrong(big_snapshot, qemu_bin):
    binary, firmware = qemu_bin
    with Guest(qemu=binary, firmware=firmware, incoming="defer", memory="256M") as guest:
        proc = subprocess.Popen(qfram("restore-qemu", big_snapshot, "--qmp",
                                      guest.spare_qmp_path),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        status = wait_for_status(guest, ("postcopy-active", "completed"))
        proc.kill()
        proc.wait()
        assert status == "postcopy-active", status
        # QEMU knows: paused (waiting for a recovery) or failed, never "completed"
        status = wait_for_status(guest, ("postcopy-paused", "failed", "completed"))
        assert status in ("postcopy-paused", "failed"), status


def test_a_killed_qemu_ends_qfram_within_its_timeout(big_snapshot, qemu_bin):
    binary, firmware = qemu_bin
    guest = Guest(qemu=binary, firmware=firmware, incoming="defer", memory="256M")
    try:
        proc = subprocess.Popen(qfram("restore-qemu", big_snapshot, "--qmp",
                                      guest.spare_qmp_path, "--timeout", "5"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        status = wait_for_status(guest, ("postcopy-active", "completed"))
        t0 = time.time()
        guest.proc.kill()
        out, err = proc.communicate(timeout=60)
    finally:
        guest.close()
    assert status == "postcopy-active", status
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert time.time() - t0 < 15


class FakeQEMU:
    """A destination that speaks QEMU's postcopy just enough to ask for a page outside
    the RAM it was given (a hostile or broken peer)."""

    def __init__(self, path: str) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(path)
        self.server.listen(1)
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        conn, _ = self.server.accept()
        name = b"pc.ram"
        bad = (wire.MIG_RP_MSG_REQ_PAGES_ID.to_bytes(2, "big")
               + (13 + len(name)).to_bytes(2, "big") + (1 << 40).to_bytes(8, "big")
               + (4096).to_bytes(4, "big") + bytes([len(name)]) + name)
        try:
            conn.recv(4096)
            conn.sendall(bad)
            while conn.recv(1 << 16):
                pass
        except OSError:
            pass


def test_a_request_outside_the_ram_is_refused_clearly(tmp_path):
    subprocess.run(qfram("save", "--demo", "8M", str(tmp_path / "snap"), "--layout",
                         "mapped"), check=True, capture_output=True)
    address = str(tmp_path / "fake.sock")
    FakeQEMU(address)
    done = subprocess.run(qfram("restore-qemu", str(tmp_path / "snap"), "--to", address,
                                "--timeout", "10"), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "outside the RAM" in done.stderr and "at byte" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_discard_command_is_qemus(tmp_path):
    """RAM_DISCARD carries a NUL after the block name: QEMU refuses it without."""
    payload = next(msg.discard_payloads("pc.ram", [(0, 4096)]))
    assert payload == b"\x00\x06pc.ram\x00" + (0).to_bytes(8, "big") + (4096).to_bytes(8, "big")
    assert msg.parse_discard(payload, 0) == ("pc.ram", [(0, 4096)])


# -- a real Linux guest ----------------------------------------------------------------------

GUEST_MIB = 96


@pytest.fixture(scope="module")
def linux_guest(tmp_path_factory):
    """The QEMU arguments of a real Linux guest (qfram._testing.linux)."""
    from qfram._testing import linux
    try:
        return linux.guest_arguments(str(tmp_path_factory.mktemp("linux")), GUEST_MIB)
    except linux.NoGuest as exc:
        pytest.skip(str(exc))


def test_a_linux_guest_restored_lazily_keeps_running_with_its_memory(tmp_path, linux_guest,
                                                                       qemu_bin):
    """TCG unless QFRAM_TEST_ACCEL says otherwise: on these VMs /dev/kvm opens and QEMU
    enables it, but a Linux guest under it is still decompressing its kernel after a
    minute (nested virtualisation), while TCG reaches init in seconds."""
    from qfram._testing.linux import wait_line
    accel = os.environ.get("QFRAM_TEST_ACCEL", "tcg")
    binary, firmware = qemu_bin
    memory = f"{GUEST_MIB + 96}M"
    first_serial = str(tmp_path / "serial-1.log")
    with Guest(memory=memory, running=True, accel=accel, qemu=binary, firmware=firmware,
               extra=linux_guest + ["-serial", f"file:{first_serial}"]) as guest:
        ready, _ = wait_line(first_serial, "QFRAM READY")
        wait_line(first_serial, "QFRAM SUM")
        guest.cmd("stop")
        guest.migrate_to_file(str(tmp_path / "stream.bin"))
    want = ready.split()[2]
    subprocess.run(qfram("rewrite", str(tmp_path / "stream.bin"), str(tmp_path / "snap"),
                         "--layout", "mapped"), check=True, capture_output=True)
    runs = []
    for run in range(2):       # the second restore sends the first one's working set first
        serial = str(tmp_path / f"serial-restore-{run}.log")
        with Guest(memory=memory, running=True, accel=accel, incoming="defer", qemu=binary,
                   firmware=firmware,
                   extra=linux_guest + ["-serial", f"file:{serial}"]) as guest:
            done = restore(str(tmp_path / "snap"), guest)
            assert done.returncode == 0, done.stderr + guest.output()
            line, seen = wait_line(serial, "QFRAM SUM")
            line2, _ = wait_line(serial, "QFRAM SUM", after=seen)
            assert guest.cmd("query-status")["status"] == "running"
        assert line.split()[3] == want and line2.split()[3] == want, (line, line2, want)
        runs.append(json.loads(done.stdout))
    first, second = runs
    assert first["requests"] >= 1 and first["pages_requested"] >= 1, first
    assert "recorded" in first["working_set"], first["working_set"]
    assert second["pages_prefetched"] >= first["pages_requested"], second
    print("requests without / with the working set:", first["pages_requested"],
          second["pages_requested"], "prefetched", second["pages_prefetched"])
