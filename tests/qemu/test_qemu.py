"""Against a real QEMU: qfram reads the streams QEMU writes, and QEMU loads the streams
qfram writes.  scripts/test.sh installs qemu-system-x86 when it is missing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from qfram import snapshot
from qfram.qemu import streams
from qfram._testing.qmp import Guest, find_qemu, qemu_command
from qfram.ram import RAMBlock, RAMList

MEM = 64 << 20
PATTERN_ADDR = 16 << 20
# pmemsave reads 0xA0000-0xFFFFF through the VGA/SMRAM window and the ROM shadows, which
# pc.ram holds as plain RAM: compare everything else
HOLE = (0xA0000, 0x100000)

pytestmark = pytest.mark.skipif(
    find_qemu() is None and shutil.which("apt-get") is None,
    reason="qemu-system-x86_64 is not installed and cannot be (no apt-get)")


@pytest.fixture(scope="module")
def qemu_ready():
    if find_qemu() is None:
        out = subprocess.run(["apt-get", "install", "-y", "-qq", "qemu-system-x86"],
                             capture_output=True, text=True)
        if find_qemu() is None:
            pytest.skip(f"qemu-system-x86 could not be installed: {out.stderr[-500:]}")


def same_ram(a: bytes, b: bytes) -> bool:
    return a[:HOLE[0]] == b[:HOLE[0]] and a[HOLE[1]:] == b[HOLE[1]:]


@pytest.fixture(scope="module")
def migrated(qemu_ready, tmp_path_factory):
    """A stopped guest with a known pattern in its RAM, its pmemsave ground truth, and
    its migration stream."""
    work = tmp_path_factory.mktemp("qemu")
    pattern = os.urandom(1 << 20) + b"qfram test pattern " * 1000
    (work / "pattern.bin").write_bytes(pattern)
    with Guest(extra=["-device", f"loader,file={work / 'pattern.bin'},addr={PATTERN_ADDR},"
                                 f"force-raw=on"]) as guest:
        guest.pmemsave(str(work / "truth.bin"), MEM)
        guest.migrate_to_file(str(work / "stream.bin"))
    return work, pattern


def test_extract_reproduces_the_guest_ram(migrated, tmp_path):
    work, pattern = migrated
    result = streams.extract(str(work / "stream.bin"), str(tmp_path / "out"))
    names = {b["name"] for b in result["blocks"]}
    assert {"pc.ram", "pc.bios", "pc.rom"} <= names
    ram = (tmp_path / "out" / "pc.ram").read_bytes()
    truth = (work / "truth.bin").read_bytes()
    assert len(ram) == MEM and same_ram(ram, truth)
    assert ram[PATTERN_ADDR:PATTERN_ADDR + len(pattern)] == pattern
    # names with '/' become folders, inside the output directory
    assert (tmp_path / "out" / "rom@etc" / "acpi" / "tables").is_file()


def test_info_lists_machine_blocks_and_devices(migrated):
    work, _ = migrated
    info = snapshot.inspect(str(work / "stream.bin"))
    assert info.machine.startswith("pc-i440fx-")
    blocks = {b.name: b for b in info.blocks}
    ram = blocks["pc.ram"]
    assert ram.used_length == MEM
    assert ram.pages + ram.zero_pages == MEM // 4096 and ram.pages >= 256
    names = [d.name for d in info.devices]
    assert "cpu" in names and "globalstate" in names and info.vmdescription
    # device byte ranges tile the stream from the end of RAM to EOF
    for a, b in zip(info.devices, info.devices[1:]):
        assert a.end == b.offset
    assert info.devices[-1].end == info.eof_offset


def test_extraction_does_not_need_the_vmdescription(migrated, tmp_path):
    work, pattern = migrated
    data = (work / "stream.bin").read_bytes()
    eof = snapshot.inspect(str(work / "stream.bin")).eof_offset
    (tmp_path / "bare.bin").write_bytes(data[:eof + 1])          # as a postcopy stream
    streams.extract(str(tmp_path / "bare.bin"), str(tmp_path / "out"))
    ram = (tmp_path / "out" / "pc.ram").read_bytes()
    assert ram[PATTERN_ADDR:PATTERN_ADDR + len(pattern)] == pattern


def load_in_qemu(stream_path, tmp_path) -> bytes:
    with Guest(incoming=f"exec:cat {stream_path}") as guest:
        status = guest.wait_status("inmigrate")
        assert status in ("paused", "prelaunch"), guest.output()
        guest.pmemsave(str(tmp_path / "loaded.bin"), MEM)
    return (tmp_path / "loaded.bin").read_bytes()


@pytest.mark.parametrize("devices", ["left-out", "carried-over"])
def test_qemu_loads_a_stream_qfram_wrote(migrated, tmp_path, devices):
    work, _ = migrated
    streams.extract(str(work / "stream.bin"), str(tmp_path / "out"))
    ram = bytearray((tmp_path / "out" / "pc.ram").read_bytes())
    ram[32 << 20:(32 << 20) + 8192] = b"written by qfram" * 512
    ram[PATTERN_ADDR:PATTERN_ADDR + 4096] = bytes(4096)       # and a page zeroed
    state = streams.device_state(str(work / "stream.bin")) if devices == "carried-over" else None
    ours = tmp_path / "ours.bin"
    snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", ram)]), str(ours),
                  machine="pc-i440fx-7.2", devices=state)
    loaded = load_in_qemu(ours, tmp_path)
    assert same_ram(loaded, bytes(ram))


def test_qemu_loads_a_rewritten_stream(migrated, tmp_path):
    work, _ = migrated
    streams.extract(str(work / "stream.bin"), str(tmp_path / "out"))
    ram = bytearray((tmp_path / "out" / "pc.ram").read_bytes())
    ram[48 << 20:(48 << 20) + 4096] = b"R" * 4096
    (tmp_path / "new.ram").write_bytes(ram)
    out = subprocess.run([sys.executable, "-m", "qfram", "rewrite", str(work / "stream.bin"),
                          str(tmp_path / "re.bin"), "--set", f"pc.ram={tmp_path / 'new.ram'}",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["devices"] > 0
    loaded = load_in_qemu(tmp_path / "re.bin", tmp_path)
    assert same_ram(loaded, bytes(ram))


def test_a_qemu_stream_survives_a_round_trip_through_the_chunked_layout(migrated, tmp_path):
    # QEMU cannot load the chunked layout, so a user keeps the small file and rewrites it
    # back when QEMU needs it: the RAM and the device state must come back whole
    work, _ = migrated
    small, back = tmp_path / "vm.chunked", tmp_path / "vm.stream"
    for source, target, layout in ((work / "stream.bin", small, "chunked"),
                                   (small, back, "stream")):
        out = subprocess.run([sys.executable, "-m", "qfram", "rewrite", str(source),
                              str(target), "--layout", layout, "--json"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["devices"] > 0
    assert small.stat().st_size < (work / "stream.bin").stat().st_size
    loaded = load_in_qemu(back, tmp_path)
    assert same_ram(loaded, (work / "truth.bin").read_bytes())


def test_a_wrong_machine_type_is_refused_by_qemu(migrated, tmp_path):
    ram = RAMList([RAMBlock.from_buffer("pc.ram", bytearray(MEM))])
    ours = tmp_path / "wrong.bin"
    snapshot.save(ram, str(ours), machine="pc-q35-7.2")
    # QEMU's refusal is its exit: no QMP, just its status and its message
    proc = subprocess.Popen(qemu_command(incoming=f"exec:cat {ours}"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("QEMU accepted a stream of another machine type and kept running")
    assert proc.returncode != 0
    assert "Machine type received is 'pc-q35-7.2'" in output, output


# -- mapped-ram, with a newer QEMU (scripts/fetch_qemu_backports.sh) -------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEWER = os.path.join(ROOT, ".cache", "qemu-backports", "root")


@pytest.fixture(scope="module")
def newer_qemu():
    from qfram._testing.qmp import qemu_version
    for qemu_bin, firmware in ((find_qemu(), None),
                               (os.path.join(NEWER, "usr/bin/qemu-system-x86_64"),
                                os.path.join(NEWER, "usr/share/qemu"))):
        if qemu_bin and os.path.exists(qemu_bin) and qemu_version(qemu_bin) >= (9, 0):
            return qemu_bin, firmware
    failed = os.path.join(ROOT, ".cache", "qemu-backports.failed")
    why = open(failed).read().strip() if os.path.exists(failed) else "not fetched"
    pytest.skip(f"mapped-ram needs QEMU 9.0+; the system has 7.x and fetching a newer "
                f"one (scripts/fetch_qemu_backports.sh) failed: {why}")


def machine_of(qemu_bin) -> str:
    from qfram._testing.qmp import qemu_version
    major, minor = qemu_version(qemu_bin)
    return f"pc-i440fx-{major}.{minor}"


def test_qfram_reads_qemus_mapped_ram_files(newer_qemu, tmp_path):
    qemu_bin, firmware = newer_qemu
    pattern = os.urandom(1 << 20)
    (tmp_path / "pattern.bin").write_bytes(pattern)
    with Guest(qemu=qemu_bin, firmware=firmware,
               extra=["-device", f"loader,file={tmp_path / 'pattern.bin'},"
                                 f"addr={PATTERN_ADDR},force-raw=on"]) as guest:
        guest.pmemsave(str(tmp_path / "truth.bin"), MEM)
        guest.migrate_to_file(str(tmp_path / "mapped.bin"), mapped=True)
    info = snapshot.inspect(str(tmp_path / "mapped.bin"))
    assert info.layout == "mapped" and "mapped-ram" in info.capabilities
    assert info.machine == machine_of(qemu_bin)
    ram = {b.name: b for b in info.blocks}["pc.ram"]
    assert ram.pages + ram.zero_pages == MEM // 4096 and ram.pages >= 256
    streams.extract(str(tmp_path / "mapped.bin"), str(tmp_path / "out"))
    got = (tmp_path / "out" / "pc.ram").read_bytes()
    assert same_ram(got, (tmp_path / "truth.bin").read_bytes())
    assert got[PATTERN_ADDR:PATTERN_ADDR + len(pattern)] == pattern


def test_qemu_loads_a_mapped_ram_file_qfram_wrote(newer_qemu, tmp_path):
    qemu_bin, firmware = newer_qemu
    ram = bytearray(MEM)
    ram[PATTERN_ADDR:PATTERN_ADDR + (1 << 20)] = os.urandom(1 << 20)
    ram[40 << 20:(40 << 20) + 4096] = b"mapped by qfram " * 256
    path = tmp_path / "ours.mapped"
    snapshot.save(RAMList([RAMBlock.from_buffer("pc.ram", ram)]), str(path), layout="mapped",
                  machine=machine_of(qemu_bin))
    with Guest(qemu=qemu_bin, firmware=firmware, incoming="defer") as guest:
        guest.migrate_incoming(f"file:{path}", mapped_ram=True)
        guest.pmemsave(str(tmp_path / "loaded.bin"), MEM)
    assert same_ram((tmp_path / "loaded.bin").read_bytes(), bytes(ram))


def test_a_qemu_source_with_tls_creds_reaches_qfram_receive(qemu_ready, tmp_path):
    """One tls-init directory serves QEMU and qfram: a QEMU source migrating with
    tls-creds completes the TLS handshake with `qfram receive` (both ends verified) and
    its whole RAM goes through; qfram stops at QEMU's first device section (precopy
    device state is not something qfram can place), never at TLS."""
    import socket
    import time
    creds = str(tmp_path / "tls")
    subprocess.run([sys.executable, "-m", "qfram", "tls-init", creds], check=True,
                   capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recv = subprocess.Popen([sys.executable, "-m", "qfram", "receive", "--listen",
                             f"127.0.0.1:{port}", "--tls-creds", creds, "--no-preempt",
                             "--timeout", "20", "--deadline", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    with Guest(extra=["-object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client"]) \
            as guest:
        guest.cmd("migrate-set-parameters", **{"tls-creds": "tls0",
                                                "tls-hostname": "localhost"})
        guest.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        out, err = recv.communicate(timeout=120)
    assert recv.returncode == 1
    assert "dropped a connection" not in err and "TLS" not in err, err
    assert "device section" in err, err
