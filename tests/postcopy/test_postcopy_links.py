"""Postcopy on a real network: TLS with both ends verified, strays and hostile peers
dropped or refused with a clear error, bounds (deadline, RAM, discards, requests), and
a link cut after the switch resumed.  Every test runs real `qfram` processes."""
from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import psutil
import pytest

from qfram import wire
from qfram.format import savevm
from qfram.postcopy import messages as msg
from qfram.ram import RAMBlock, RAMList

PY = sys.executable
HELPERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")


def qfram(*args) -> list:
    return [PY, "-m", "qfram", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Until something listens on the port (read from /proc: probing would connect)."""
    want = f":{port:04X} "
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open("/proc/net/tcp") as table:
            if any(want in line and line.split()[3] == "0A" for line in table):
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port}")


def receiver(address: str, *args) -> subprocess.Popen:
    recv = subprocess.Popen(qfram("receive", "--listen", address, "--json", *args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if address.startswith("127.0.0.1:"):
        wait_listening(int(address.rsplit(":", 1)[1]))
    else:
        wait_listening_unix(address)
    return recv


def wait_listening_unix(path: str, timeout: float = 10.0) -> None:
    """Until a unix socket listens at ``path`` (its __SO_ACCEPTCON flag, in /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open("/proc/net/unix") as table:
            for line in table:
                fields = line.split()
                if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                    return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens at {path}")


def send(address: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(qfram("send", "--to", address, "--json", *args),
                          capture_output=True, text=True, timeout=timeout)


def finish(recv: subprocess.Popen, timeout: float = 120):
    out, err = recv.communicate(timeout=timeout)
    return recv.returncode, out, err


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    """One tls-init directory, and a second one from another CA (an impostor's)."""
    base = tmp_path_factory.mktemp("tls")
    for name in ("good", "other"):
        subprocess.run(qfram("tls-init", str(base / name)), check=True, capture_output=True)
    return str(base / "good"), str(base / "other")


# -- TLS ------------------------------------------------------------------------------------


def test_tls_init_writes_qemus_layout_with_private_keys(creds, tmp_path):
    good, _ = creds
    assert sorted(os.listdir(good)) == ["ca-cert.pem", "client-cert.pem", "client-key.pem",
                                        "server-cert.pem", "server-key.pem"]
    for key in ("server-key.pem", "client-key.pem"):
        assert os.stat(os.path.join(good, key)).st_mode & 0o777 == 0o600
    again = subprocess.run(qfram("tls-init", good), capture_output=True, text=True)
    assert again.returncode == 1 and "exists" in again.stderr      # never overwritten
    # the files verify with OpenSSL as QEMU's would: both leaves chain to the CA
    for leaf in ("server-cert.pem", "client-cert.pem"):
        check = subprocess.run(["openssl", "verify", "-CAfile",
                                os.path.join(good, "ca-cert.pem"), os.path.join(good, leaf)],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_a_migration_over_tls_verifies_and_says_so(creds):
    good, _ = creds
    address = f"127.0.0.1:{free_port()}"
    recv = receiver(address, "--tls-creds", good, "--workload", "scan,read,write",
                    "--tls-authz", "CN=qfram client of localhost,O=qfram")
    sent = send(address, "--demo", "32M", "--rounds", "2", "--tls-creds", good)
    code, out, err = finish(recv)
    assert sent.returncode == 0 and code == 0, sent.stderr + err
    assert json.loads(out)["verified"] is True
    assert json.loads(out)["tls"].startswith("TLSv1.3")


def impostor(address: str, creds_dir: str, good_ca: str) -> str:
    """Connect with a certificate from another CA; return how it ended for us."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(good_ca)
    ctx.load_cert_chain(os.path.join(creds_dir, "client-cert.pem"),
                        os.path.join(creds_dir, "client-key.pem"))
    with socket.create_connection((host, int(port))) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"QEVM\x00\x00\x00\x03" + b"\x00" * 64)
                return "read " + repr(tls.recv(16))
        except (ssl.SSLError, OSError) as exc:
            return f"refused: {exc}"


def test_a_peer_from_another_ca_is_dropped_before_any_ram(creds):
    good, other = creds
    address = f"127.0.0.1:{free_port()}"
    recv = receiver(address, "--tls-creds", good)
    result = impostor(address, other, os.path.join(good, "ca-cert.pem"))
    assert result.startswith("refused") or result == "read b''"
    # a source speaking in the clear to a TLS listener: dropped too
    with socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1]))) as plain:
        plain.sendall(b"QEVM\x00\x00\x00\x03" + b"\x00" * 64)
        plain.settimeout(20)
        try:
            assert plain.recv(1 << 16) is not None
        except OSError:
            pass
    sent = send(address, "--demo", "16M", "--rounds", "1", "--tls-creds", good)
    code, out, err = finish(recv)
    assert sent.returncode == 0 and code == 0, sent.stderr + err
    assert json.loads(out)["verified"] is True
    assert err.count("dropped a connection") == 2, err


def test_a_source_outside_tls_authz_is_refused(creds):
    good, _ = creds
    address = f"127.0.0.1:{free_port()}"
    recv = receiver(address, "--tls-creds", good, "--tls-authz", "CN=someone else,O=qfram",
                    "--deadline", "4")
    sent = send(address, "--demo", "16M", "--rounds", "1", "--tls-creds", good,
                "--timeout", "5")
    code, out, err = finish(recv)
    assert sent.returncode == 1 and "Traceback" not in sent.stderr
    assert code == 1 and "not in --tls-authz" in err and "Traceback" not in err


def test_a_source_checks_the_destinations_name(creds):
    good, _ = creds
    address = f"127.0.0.1:{free_port()}"
    recv = receiver(address, "--tls-creds", good, "--deadline", "4")
    sent = send(address, "--demo", "16M", "--tls-creds", good, "--tls-hostname",
                "elsewhere.example", "--timeout", "5")
    finish(recv)
    assert sent.returncode == 1
    assert "TLS" in sent.stderr and "Traceback" not in sent.stderr


# -- strays and hostile peers -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_probes_squatters_and_garbage_are_dropped_and_the_source_gets_through(tmp_path, kind):
    address = str(tmp_path / "m.sock") if kind == "unix" else f"127.0.0.1:{free_port()}"
    recv = receiver(address, "--workload", "read")

    def dial() -> socket.socket:
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX)
            s.connect(address)
            return s
        return socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])))

    dial().close()                                  # a port scan: connect, close
    squatter = dial()                               # connects and says nothing
    garbage = dial()
    garbage.sendall(b"GET / HTTP/1.1\r\n\r\n")
    sent = send(address, "--demo", "16M", "--rounds", "1")
    code, out, err = finish(recv)
    squatter.close()
    garbage.close()
    assert sent.returncode == 0 and code == 0, sent.stderr + err
    assert json.loads(out)["verified"] is True
    assert "dropped a connection" in err


def squat(address: str, count: int) -> list:
    """``count`` connections that connect and never say a word."""
    squatters = []
    for _ in range(count):
        if address.startswith("127.0.0.1:"):
            s = socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])))
        else:
            s = socket.socket(socket.AF_UNIX)
            s.connect(address)
        squatters.append(s)
    return squatters


@pytest.mark.parametrize("kind, count", [("tcp", 20), ("tcp", 200), ("tls", 20),
                                         ("tls", 200), ("unix", 200)])
def test_squatters_never_keep_the_source_out(tmp_path, creds, kind, count):
    """Idle connections fill every slot before the source comes: the oldest idle one
    goes for each newcomer, so the source's two channels get through at once."""
    address = str(tmp_path / "m.sock") if kind == "unix" else f"127.0.0.1:{free_port()}"
    tls = ["--tls-creds", creds[0]] if kind == "tls" else []
    recv = receiver(address, "--timeout", "10", "--deadline", "30", *tls)
    squatters = squat(address, count)
    try:
        t0 = time.monotonic()
        sent = send(address, "--demo", "16M", "--rounds", "1", "--timeout", "10", *tls)
        took = time.monotonic() - t0
        code, out, err = finish(recv)
    finally:
        for s in squatters:
            s.close()
    assert sent.returncode == 0 and code == 0, sent.stderr + err
    assert json.loads(out)["verified"] is True
    assert "it was the oldest idle of" in err
    assert took < 8, took


def test_a_dripping_peer_is_bounded_by_the_deadline(tmp_path):
    address = str(tmp_path / "m.sock")
    recv = receiver(address, "--timeout", "2", "--deadline", "4")
    s = socket.socket(socket.AF_UNIX)
    s.connect(address)
    header = b"QEVM\x00\x00\x00\x03"
    t0 = time.time()
    stop = threading.Event()

    def drip() -> None:
        s.sendall(header)
        while not stop.is_set():
            try:
                s.sendall(b"\x07")      # a CONFIGURATION section, one byte at a time
            except OSError:
                return
            time.sleep(1.5)

    threading.Thread(target=drip, daemon=True).start()
    code, out, err = finish(recv, timeout=30)
    stop.set()
    assert code == 1 and time.time() - t0 < 15
    assert "deadline" in err and "Traceback" not in err


def fake_source(sock: socket.socket, blocks, commands=(), switch=False, pages=()) -> object:
    """A hand-written source: header, RAM setup for ``blocks`` (name, length), extra
    commands, optionally the switch, and page records (name, index, bytes)."""
    from qfram.io import channel
    f = channel.socket_file(sock, "wb")
    savevm.put_header(f, "pc-i440fx-7.2")
    savevm.put_command(f, wire.CMD_OPEN_RETURN_PATH)
    savevm.put_command(f, wire.CMD_POSTCOPY_ADVISE, msg.advise_payload(4096, 4096))
    ram = RAMList([RAMBlock.from_buffer(name, untouched(length)) for name, length in blocks])
    savevm.put_ram_setup(f, 2, list(ram))
    for cmd, payload in commands:
        savevm.put_command(f, cmd, payload)
    if switch:
        savevm.put_command(f, wire.CMD_POSTCOPY_LISTEN)
        savevm.put_command(f, wire.CMD_POSTCOPY_RUN)
    f.flush()
    return f


def untouched(length: int) -> mmap.mmap:
    """Memory that is only declared (never touched, never reserved)."""
    return mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                     | getattr(mmap, "MAP_NORESERVE", 0x4000))


def test_a_source_declaring_more_ram_than_the_machine_has_is_refused(tmp_path):
    address = str(tmp_path / "m.sock")
    recv = receiver(address, "--timeout", "5")
    s = socket.socket(socket.AF_UNIX)
    s.connect(address)
    before = psutil.virtual_memory().available
    fake_source(s, [(f"ram{i}", 8 << 30) for i in range(4)])
    code, out, err = finish(recv, timeout=30)
    s.close()
    assert code == 1 and "--max-ram" in err and "at byte" in err
    assert "Traceback" not in err
    assert psutil.virtual_memory().available > before - (1 << 30)


def test_max_ram_is_the_users_bound(tmp_path):
    address = str(tmp_path / "m.sock")
    recv = receiver(address, "--max-ram", "8M")
    sent = send(address, "--demo", "16M", "--rounds", "1", "--timeout", "5")
    code, out, err = finish(recv)
    assert code == 1 and "at most 8388608" in err
    assert sent.returncode == 1


def test_overlapping_discards_are_refused_at_once(tmp_path):
    address = str(tmp_path / "m.sock")
    recv = receiver(address, "--timeout", "5")
    s = socket.socket(socket.AF_UNIX)
    s.connect(address)
    size = 1 << 30
    # 4,000 ranges each naming the whole block: without the rule, 4,000 x a GiB of work
    payload = next(msg.discard_payloads("pc.ram", [(0, size)] * 4000))
    t0 = time.time()
    fake_source(s, [("pc.ram", size)], commands=[(wire.CMD_POSTCOPY_RAM_DISCARD, payload)])
    code, out, err = finish(recv, timeout=60)
    s.close()
    assert code == 1 and "not above the last one" in err and "at byte" in err
    assert time.time() - t0 < 20


def test_a_hostile_trailer_after_the_switch_ends_with_a_clear_error(tmp_path):
    address = str(tmp_path / "m.sock")
    recv = receiver(address, "--timeout", "5", "--no-preempt", "--workload", "read")
    s = socket.socket(socket.AF_UNIX)
    s.connect(address)
    npages = 64
    f = fake_source(s, [("pc.ram", npages * 4096)], switch=True)
    with savevm.ram_part(f, wire.RAM_SECTION_ID):
        f.save_pages(bytearray(b"\x01" * npages * 4096), 0, npages, 0,
                     wire.RAM_SAVE_FLAG_CONTINUE, idstr="pc.ram")
    f.put_byte(wire.SECTION_EOF)
    bad = b'{"page_size": 4096, "qfram": {"chunk_hashes": {"pc.ram": 7}}}'
    f.put_byte(wire.SECTION_VMDESCRIPTION)
    f.put_be32(len(bad))
    f.put_buffer(bad)
    f.flush()
    code, out, err = finish(recv, timeout=60)
    s.close()
    assert code == 1 and "VMDESCRIPTION" in err and "at byte" in err
    assert "Traceback" not in err


def test_listen_never_deletes_a_file_and_never_steals_a_live_socket(tmp_path):
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep me")
    refused = subprocess.run(qfram("receive", "--listen", str(precious)), capture_output=True,
                             text=True, timeout=30)
    assert refused.returncode == 1 and "not a socket" in refused.stderr
    assert precious.read_bytes() == b"keep me"
    live = str(tmp_path / "live.sock")
    first = receiver(live)
    second = subprocess.run(qfram("receive", "--listen", live), capture_output=True,
                            text=True, timeout=30)
    assert second.returncode == 1 and "another process listens" in second.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    # the first receiver's socket is stale now: a new receiver takes the path
    third = receiver(live)
    sent = send(live, "--demo", "8M", "--rounds", "1")
    code, out, err = finish(third)
    assert sent.returncode == 0 and code == 0, err
    for bad in ("127.0.0.1:99999", "127.0.0.1:http"):
        r = subprocess.run(qfram("receive", "--listen", bad), capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 1 and "port" in r.stderr and "Traceback" not in r.stderr


class FloodingDestination:
    """Accepts a source's channels, reads everything they send, and floods the return
    path with valid page requests for the same few pages; then says SHUT(0)."""

    def __init__(self, address: str, requests: int) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(address)
        self.server.listen(4)
        self.requests = requests
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        main, _ = self.server.accept()
        preempt, _ = self.server.accept()
        for c in (main, preempt):
            threading.Thread(target=self.drain, args=(c,), daemon=True).start()
        name = b"pc.ram"
        first = (wire.MIG_RP_MSG_REQ_PAGES_ID.to_bytes(2, "big") + (13 + len(name)).to_bytes(2, "big")
                 + (0).to_bytes(8, "big") + (4096).to_bytes(4, "big") + bytes([len(name)]) + name)
        again = (wire.MIG_RP_MSG_REQ_PAGES.to_bytes(2, "big") + (12).to_bytes(2, "big")
                 + (4096).to_bytes(8, "big") + (4096).to_bytes(4, "big"))
        batch = again * 4096
        try:
            for c in (main, preempt):
                c.sendall(first)
            main.sendall(first)
            for _ in range(self.requests // 4096):
                main.sendall(batch)
            time.sleep(1.0)
            main.sendall(wire.MIG_RP_MSG_SHUT.to_bytes(2, "big") + (4).to_bytes(2, "big")
                         + bytes(4))
        except OSError:
            pass

    @staticmethod
    def drain(c: socket.socket) -> None:
        try:
            while c.recv(1 << 20):
                pass
        except OSError:
            pass


def test_a_flooding_destination_costs_the_source_bounded_memory(tmp_path):
    address = str(tmp_path / "flood.sock")
    FloodingDestination(address, requests=3_000_000)
    source = subprocess.Popen(qfram("send", "--to", address, "--demo", "64M", "--rounds", "0",
                                    "--json", "--timeout", "60"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(source.pid)
    peak = 0
    while source.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out, err = source.communicate()
    assert source.returncode == 0, err
    stats = json.loads(out)
    assert stats["requests"] >= 1_000_000            # it read the flood...
    # ... and holds no queue for it: the 64 MiB of RAM and the core, little more
    # (measured: 144 MiB; 241 MiB when every request was queued and every resend made)
    assert peak < (64 << 20) + (128 << 20), f"peak RSS {peak >> 20} MiB"


# -- resume after a dropped link ------------------------------------------------------------


def start_proxy(listen_port: int, target_port: int, rate: float, count_file: str):
    proxy = subprocess.Popen([PY, os.path.join(HELPERS, "proxy.py"), str(listen_port),
                              str(target_port), str(rate), count_file])
    wait_listening(listen_port)
    return proxy


def forwarded(count_file: str) -> int:
    try:
        with open(count_file) as f:
            return int(f.read() or 0)
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
def test_a_link_cut_after_the_switch_is_resumed(tmp_path, creds, tls):
    dest_port, proxy_port = free_port(), free_port()
    tls_args = ["--tls-creds", creds[0]] if tls else []
    recv = receiver(f"127.0.0.1:{dest_port}", "--workload", "scan,read,write",
                    "--timeout", "30", *tls_args)
    count = str(tmp_path / "count")
    proxy = start_proxy(proxy_port, dest_port, 30e6, count)
    source = subprocess.Popen(qfram("send", "--to", f"127.0.0.1:{proxy_port}", "--json",
                                    "--demo", "128M", "--rounds", "0", "--timeout", "30",
                                    *tls_args),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while forwarded(count) < (20 << 20) and time.time() < deadline:
        time.sleep(0.01)
    proxy.kill()                                   # the network fails mid-postcopy
    proxy.wait()
    time.sleep(0.5)
    proxy = start_proxy(proxy_port, dest_port, 1e10, str(tmp_path / "count2"))
    try:
        s_out, s_err = source.communicate(timeout=120)
        code, r_out, r_err = finish(recv)
    finally:
        proxy.kill()
    assert source.returncode == 0 and code == 0, s_err + r_err
    src, dst = json.loads(s_out), json.loads(r_out)
    assert dst["verified"] is True
    assert src["resumes"] == 1 and dst["resumes"] == 1
    npages = (128 << 20) // 4096
    # only what the destination lacked went again (what was in flight when the link died)
    assert src["pages_sent"] < npages * 1.25, src


@pytest.mark.parametrize("tls", [False, True], ids=["clear", "tls"])
def test_a_link_that_never_comes_back_ends_send_with_the_reason(tmp_path, creds, tls):
    dest_port, proxy_port = free_port(), free_port()
    tls_args = ["--tls-creds", creds[0]] if tls else []
    recv = receiver(f"127.0.0.1:{dest_port}", "--workload", "read", "--timeout", "4",
                    *tls_args)
    count = str(tmp_path / "count")
    proxy = start_proxy(proxy_port, dest_port, 30e6, count)
    source = subprocess.Popen(qfram("send", "--to", f"127.0.0.1:{proxy_port}", "--demo",
                                    "64M", "--rounds", "0", "--timeout", "2", *tls_args),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while forwarded(count) < (8 << 20) and time.time() < deadline:
        time.sleep(0.01)
    proxy.kill()                                   # the network fails, for good
    proxy.wait()
    t0 = time.time()
    _, err = source.communicate(timeout=60)
    took = time.time() - t0
    finish(recv)
    assert source.returncode == 1, err
    assert "Traceback" not in err and "AttributeError" not in err, err
    assert "qfram send: could not resume the migration: " in err, err
    assert took < 10


def test_a_failed_tls_handshake_names_the_peers_address(creds):
    good, _ = creds
    address = f"127.0.0.1:{free_port()}"
    recv = receiver(address, "--tls-creds", good, "--deadline", "3")
    with socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1]))) as plain:
        port = plain.getsockname()[1]
        plain.sendall(b"QEVM\x00\x00\x00\x03" + b"\x00" * 64)     # no TLS at all
        plain.settimeout(10)
        try:
            plain.recv(1 << 16)
        except OSError:
            pass
    _, _, err = finish(recv)
    assert f"dropped a connection from 127.0.0.1:{port}: " in err, err
    assert "from ?" not in err
