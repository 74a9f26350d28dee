"""Postcopy migration between real processes: precopy rounds with dirty tracking, the
switch, demand paging over the return path with userfaultfd, release-ram, failures."""
from __future__ import annotations

import json
import mmap
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from qfram import wire
from qfram.format import savevm
from qfram.postcopy import messages as msg
from qfram.ram import RAMBlock, RAMList

PY = sys.executable


def qfram(*args) -> list:
    return [PY, "-m", "qfram", *args]


def migrate(tmp_path, send_args, recv_args, address=None, timeout=120):
    """Run `qfram receive` and `qfram send` as two processes; return both results."""
    address = address or str(tmp_path / "migration.sock")
    recv = subprocess.Popen(qfram("receive", "--listen", address, "--json", *recv_args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 10
    while "/" in address and not os.path.exists(address) and time.time() < deadline:
        time.sleep(0.02)
    if "/" not in address:
        time.sleep(0.5)
    send = subprocess.run(qfram("send", "--to", address, "--json", *send_args),
                          capture_output=True, text=True, timeout=timeout)
    r_out, r_err = recv.communicate(timeout=timeout)
    assert send.returncode == 0, send.stderr + f"\nthe receiver ({recv.returncode}): " + r_err
    assert recv.returncode == 0, r_err
    return json.loads(send.stdout), json.loads(r_out)


def test_precopy_rounds_then_postcopy_move_running_memory(tmp_path):
    # --converge-pages -1: never switch early (with 0, a round in which the workload
    # thread did not get the CPU — a loaded machine — left nothing dirty: the switch came
    # after one round)
    src, dst = migrate(tmp_path, ["--demo", "64M", "--workload", "--workload-pause-us", "0",
                                  "--rounds", "3", "--converge-pages", "-1"],
                       ["--workload", "scan,read,write"])
    assert src["dirty_tracking"] == "userfaultfd-wp-async+pagemap-scan"
    assert src["precopy_rounds"] == 3
    # pages the workload wrote during a round went again in the next one
    assert src["precopy_pages"] > (64 << 20) // 4096
    assert src["postcopy_pages"] == src["dirty_at_switch"]
    assert dst["verified"] is True               # every page as the source left it
    assert dst["downtime_destination_ms"] > 0 and src["downtime_source_ms"] > 0


def test_pure_postcopy_serves_faults_and_releases_the_source(tmp_path):
    src, dst = migrate(tmp_path, ["--demo", "128M", "--rounds", "0", "--release"],
                       ["--workload", "read", "--workload-pause-us", "50"])
    assert src["precopy_pages"] == 0 and src["postcopy_pages"] == (128 << 20) // 4096
    assert src["released_bytes"] == 128 << 20
    assert src["rss_after"] < src["rss_before"] - (64 << 20)
    assert dst["faults"] > 0 and dst["requested_pages"] > 0
    assert dst["fault_latency"]["count"] > 0 and dst["verified"] is True
    assert dst["eexist"] == 0                    # no page placed twice


def test_without_a_preempt_channel_requests_queue_on_the_main_one(tmp_path):
    src, dst = migrate(tmp_path, ["--demo", "64M", "--rounds", "0", "--no-preempt"],
                       ["--workload", "read", "--no-preempt"])
    assert src["preempt_channel"] is False and dst["verified"] is True
    assert dst["faults"] > 0


def test_precopy_only(tmp_path):
    src, dst = migrate(tmp_path, ["--demo", "64M", "--workload", "--precopy-only",
                                  "--rounds", "2"], [])
    assert src["postcopy_pages"] == 0 and dst["verified"] is True
    assert dst["faults"] == 0 and dst["downtime_destination_ms"] is None   # never switched


def test_over_tcp_loopback(tmp_path):
    port = free_port()
    src, dst = migrate(tmp_path, ["--demo", "32M", "--rounds", "1"], ["--workload", "read"],
                       address=f"127.0.0.1:{port}")
    assert dst["verified"] is True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- failures -------------------------------------------------------------------------------


def fake_source_that_dies_after_the_switch(sock: socket.socket, size: int) -> None:
    """A source that announces RAM, switches to postcopy, and vanishes: no pages."""
    from qfram.io import channel
    f = channel.socket_file(sock, "wb")
    savevm.put_header(f, "pc-i440fx-7.2")
    savevm.put_command(f, wire.CMD_OPEN_RETURN_PATH)
    savevm.put_command(f, wire.CMD_POSTCOPY_ADVISE, msg.advise_payload(4096, 4096))
    ram = RAMList([RAMBlock.from_buffer("pc.ram", bytearray(size))])
    savevm.put_ram_setup(f, 2, list(ram))
    savevm.put_command(f, wire.CMD_POSTCOPY_LISTEN)
    savevm.put_command(f, wire.CMD_POSTCOPY_RUN)
    f.flush()
    time.sleep(0.5)                          # the destination runs and faults
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_a_source_that_dies_ends_the_destination_with_an_error(tmp_path):
    address = str(tmp_path / "m.sock")
    recv = subprocess.Popen(qfram("receive", "--listen", address, "--no-preempt",
                                  "--workload", "read", "--timeout", "5"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not os.path.exists(address):
        time.sleep(0.02)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(address)
    t0 = time.time()
    fake_source_that_dies_after_the_switch(sock, 16 << 20)
    out, err = recv.communicate(timeout=60)
    assert recv.returncode != 0
    assert "postcopy failed" in err and time.time() - t0 < 30


def test_a_dead_destination_stops_the_source_and_keeps_its_ram(tmp_path):
    from qfram.postcopy import Source
    from qfram.snapshot import checksum
    from qfram.lab.demo import fill_demo
    a, b = socket.socketpair()
    block = RAMBlock.anonymous("pc.ram", 32 << 20, huge=False)
    fill_demo(block.region)
    before = checksum(block.region, block.used_length)

    def dying_destination():
        b.recv(1 << 16)                      # reads a little, then dies
        b.close()

    import threading
    threading.Thread(target=dying_destination, daemon=True).start()
    t0 = time.time()
    with pytest.raises(OSError):
        Source(RAMList([block]), a, timeout=5).run()
    assert time.time() - t0 < 20
    assert checksum(block.region, block.used_length) == before   # nothing released


def test_the_send_command_reports_a_refused_connection(tmp_path):
    out = subprocess.run(qfram("send", "--demo", "4M", "--to", str(tmp_path / "nobody")),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "qfram send:" in out.stderr and "Traceback" not in out.stderr


# -- across hosts ---------------------------------------------------------------------------


def netns_available() -> str:
    if shutil.which("ip") is None:
        return "iproute2 is not installed"
    probe = subprocess.run(["ip", "netns", "add", "qfram-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"network namespaces cannot be made here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "qfram-probe"])
    return ""


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: 10.213.0.1 and 10.213.0.2."""
    why = netns_available()
    if why:
        pytest.skip(why)
    names = [f"qfram-a-{os.getpid()}", f"qfram-b-{os.getpid()}"]
    cmds = [["ip", "netns", "add", names[0]], ["ip", "netns", "add", names[1]],
            ["ip", "link", "add", "qfa0", "netns", names[0], "type", "veth", "peer",
             "name", "qfb0", "netns", names[1]],
            ["ip", "-n", names[0], "addr", "add", "10.213.0.1/24", "dev", "qfa0"],
            ["ip", "-n", names[1], "addr", "add", "10.213.0.2/24", "dev", "qfb0"],
            ["ip", "-n", names[0], "link", "set", "qfa0", "up"],
            ["ip", "-n", names[1], "link", "set", "qfb0", "up"],
            ["ip", "-n", names[0], "link", "set", "lo", "up"],
            ["ip", "-n", names[1], "link", "set", "lo", "up"]]
    try:
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True)
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_migration_across_two_network_namespaces_over_tls(two_hosts, tmp_path):
    a, b = two_hosts
    creds = str(tmp_path / "tls")
    subprocess.run(qfram("tls-init", creds, "--host", "10.213.0.2"), check=True,
                   capture_output=True)
    recv = subprocess.Popen(["ip", "netns", "exec", b] + qfram(
        "receive", "--listen", "10.213.0.2:47000", "--json", "--workload", "scan,read",
        "--tls-creds", creds), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    send = subprocess.run(["ip", "netns", "exec", a] + qfram(
        "send", "--demo", "64M", "--to", "10.213.0.2:47000", "--rounds", "2", "--workload",
        "--release", "--json", "--tls-creds", creds), capture_output=True, text=True,
        timeout=120)
    r_out, r_err = recv.communicate(timeout=120)
    assert send.returncode == 0, send.stderr
    assert recv.returncode == 0, r_err
    assert json.loads(r_out)["verified"] is True
    assert json.loads(r_out)["tls"].startswith("TLSv1.3")
    assert json.loads(send.stdout)["tls"].startswith("TLSv1.3")
    assert json.loads(send.stdout)["released_bytes"] == 64 << 20


def test_a_receiver_beyond_loopback_needs_tls_or_insecure(two_hosts):
    a, b = two_hosts
    refused = subprocess.run(["ip", "netns", "exec", b] + qfram(
        "receive", "--listen", "10.213.0.2:47001"), capture_output=True, text=True,
        timeout=60)
    assert refused.returncode == 1
    assert "--tls-creds" in refused.stderr and "--insecure" in refused.stderr
    assert "Traceback" not in refused.stderr and "usage:" not in refused.stderr
    recv = subprocess.Popen(["ip", "netns", "exec", b] + qfram(
        "receive", "--listen", "10.213.0.2:47001", "--insecure", "--json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    send = subprocess.run(["ip", "netns", "exec", a] + qfram(
        "send", "--demo", "16M", "--to", "10.213.0.2:47001", "--rounds", "1", "--json"),
        capture_output=True, text=True, timeout=120)
    r_out, r_err = recv.communicate(timeout=120)
    assert send.returncode == 0 and recv.returncode == 0, send.stderr + r_err
    assert json.loads(r_out)["verified"] is True and json.loads(r_out)["tls"] is None


# -- pieces ---------------------------------------------------------------------------------


def test_dirty_tracking_sees_exactly_the_written_pages():
    from qfram._uffd import DirtyTracker
    region = mmap.mmap(-1, 256 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    tracker = DirtyTracker(region)
    for page in (0, 5, 64, 255):
        region[page * 4096 + 7] = 1
    bits = bytearray(32)
    assert tracker.collect(bits) == 4
    assert [i for i in range(256) if bits[i >> 3] >> (i & 7) & 1] == [0, 5, 64, 255]
    bits = bytearray(32)
    assert tracker.collect(bits) == 0            # re-armed
    region[9 * 4096] = 2
    assert tracker.collect(bits) == 1
    tracker.close()


def test_discard_and_request_messages_round_trip():
    ranges = [(0, 4096), (8192, 3 * 4096)] * 3000
    payloads = list(msg.discard_payloads("pc.ram", ranges))
    assert len(payloads) == 2 and all(len(p) < 65536 for p in payloads)
    decoded = []
    for p in payloads:
        name, part = msg.parse_discard(p, 0)
        assert name == "pc.ram"
        decoded += part
    assert decoded == ranges
    payload = struct_pack_request(4096 * 7, 4096 * 2, "pc.ram")
    assert msg.parse_page_request(wire.MIG_RP_MSG_REQ_PAGES_ID, payload, None) == \
        ("pc.ram", 4096 * 7, 8192)
    with pytest.raises(Exception):
        msg.parse_page_request(wire.MIG_RP_MSG_REQ_PAGES, payload[:12], None)


def struct_pack_request(start: int, length: int, name: str) -> bytes:
    import struct
    return struct.pack(">QI", start, length) + bytes([len(name)]) + name.encode()


def test_bitmap_ranges():
    bits = bytearray(4)
    for i in (0, 1, 2, 9, 31):
        bits[i >> 3] |= 1 << (i & 7)
    assert msg.bitmap_ranges(bits, 32, 4096) == [(0, 3 * 4096), (9 * 4096, 4096),
                                                 (31 * 4096, 4096)]


def test_the_destinations_working_set_goes_first_next_time(tmp_path):
    # the destination's program faults; its first touches are kept; the next migration
    # of the same RAM sends them before the switch, so they are in place when it runs
    ws = str(tmp_path / "ram.ws")
    send = ["--demo", "64M", "--rounds", "0", "--seed", "3"]
    recv = ["--workload", "read", "--workload-pause-us", "200", "--working-set", ws]
    src, dst = migrate(tmp_path, send, recv)
    assert dst["faults"] > 0 and "recorded" in dst["working_set"], dst["working_set"]
    src2, dst2 = migrate(tmp_path, send + ["--working-set", ws], recv,
                         address=str(tmp_path / "second.sock"))
    assert src2["prefetched_pages"] > 0 and dst2["verified"] is True
    assert dst2["pages_at_switch"] >= src2["prefetched_pages"]
    # a working set recorded for other RAM is not used
    src3, _ = migrate(tmp_path, ["--demo", "32M", "--rounds", "0", "--working-set", ws],
                      ["--workload", "read"], address=str(tmp_path / "third.sock"))
    assert src3["prefetched_pages"] == 0


def test_a_working_set_with_a_hostile_window_is_ignored_by_send(tmp_path):
    from qfram.format import workingset
    ws = str(tmp_path / "ram.ws")
    blocks = [("pc.ram", (16 << 20) // 4096)]
    workingset.write(ws, workingset.migration_identity(blocks), blocks,
                     workingset.WorkingSet([(0, 5), (0, 9)], 0, 0))    # a window of 0
    src, dst = migrate(tmp_path, ["--demo", "16M", "--rounds", "0", "--working-set", ws],
                       ["--workload", "read"])       # was: ZeroDivisionError, a traceback
    assert src["prefetched_pages"] == 0 and dst["verified"] is True


def test_resume_is_accepted_as_the_explicit_default(tmp_path):
    """QEMU users type --resume; it says what qfram does anyway (--no-resume stops it)."""
    src, dst = migrate(tmp_path, ["--demo", "16M", "--rounds", "1", "--resume"],
                       ["--resume"])
    assert dst["verified"] is True
    src, dst = migrate(tmp_path, ["--demo", "16M", "--rounds", "1", "--no-resume"],
                       ["--no-resume"], address=str(tmp_path / "second.sock"))
    assert dst["verified"] is True


def test_both_sides_say_how_pages_were_placed_served_and_what_it_cost(tmp_path):
    src, dst = migrate(tmp_path, ["--demo", "64M", "--rounds", "0", "--release"],
                       ["--workload", "read", "--workload-pause-us", "50"])
    assert dst["verified"] is True
    # placed in runs (a run is one ioctl), with what the kernel offered beside it
    assert dst["placement"] == "copy" and "copy" in dst["placements_offered"]
    assert 0 < dst["placing_calls"] < dst["received_pages"]
    assert dst["postcopy_gbps"] > 0 and dst["receive_cpu_s"] > 0
    assert dst["postcopy_cpu_s"] >= dst["receive_cpu_s"] and dst["fault_cpu_s"] >= 0
    assert src["postcopy_cpu_s"] > 0 and src["background_cpu_s"] > 0
    # the threads a fault waits on run real-time where allowed, else ask for a short slice
    for side in (src, dst):
        assert side["urgent_threads"] in ("fifo", "short-slice", "default")
    # requests answered on the preempt channel are counted and timed like before
    assert src["requests"] == dst["requests"] > 0
    assert src["request_service"]["count"] == src["requests"]
