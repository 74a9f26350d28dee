"""The source's page-request server (qfram._requests): page requests read from the return
path and answered on the preempt channel without the GIL — each page sent once, the
faulting page once more at most, every request checked against the RAM."""
from __future__ import annotations

import mmap
import socket
import struct
import subprocess
import sys
import threading

import pytest

from qfram import wire
from qfram.errors import FormatError
from qfram.io import channel
from qfram.ram import bitmap_bytes

_requests = pytest.importorskip("qfram._requests")

PAGES = 64
SECTION = wire.RAM_SECTION_ID


def request(start_page: int, pages: int, name: str = None) -> bytes:
    body = struct.pack(">QI", start_page * 4096, pages * 4096)
    if name is not None:
        body += bytes([len(name)]) + name.encode()
        kind = wire.MIG_RP_MSG_REQ_PAGES_ID
    else:
        kind = wire.MIG_RP_MSG_REQ_PAGES
    return struct.pack(">HH", kind, len(body)) + body


PONG = struct.pack(">HHI", wire.MIG_RP_MSG_PONG, 4, 7)


class Link:
    """A source's preempt file and return path over socket pairs, with the server;
    ``dest`` writes requests, ``preempt`` reads what the source sent."""

    def __init__(self, release: bool = True) -> None:
        self.ram = mmap.mmap(-1, PAGES * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for i in range(PAGES):
            self.ram[i * 4096:(i + 1) * 4096] = bytes([i + 1]) * 4096
        self.ram[5 * 4096:6 * 4096] = bytes(4096)           # a zero page
        self.dirty = bytearray(b"\xff" * bitmap_bytes(PAGES))
        self.resent = bytearray(bitmap_bytes(PAGES))
        self.claimed = bytearray(bitmap_bytes(PAGES)) if release else None
        self.dest, rp_sock = socket.socketpair()
        pf_sock, self.preempt = socket.socketpair()
        self.rp = channel.socket_file(rp_sock, "rb")
        self.pf = channel.socket_file(pf_sock, "wb")
        self.server = _requests.RequestServer(
            self.pf, [("pc.ram", self.ram, PAGES * 4096, self.dirty, self.resent,
                       self.claimed)], SECTION)
        self.received = bytearray()

    def serve(self, *messages: bytes):
        """Send ``messages`` then a PONG; serve until the PONG comes back."""
        self.dest.sendall(b"".join(messages) + PONG)
        kind, payload, _ = self.server.serve(self.rp)
        assert (kind, payload) == (wire.MIG_RP_MSG_PONG, struct.pack(">I", 7))
        return self.server.take()

    def pages_sent(self):
        """The page records the preempt channel carried so far: [(page, kind)]."""
        self.preempt.setblocking(False)
        try:
            while True:
                self.received += self.preempt.recv(1 << 20)
        except BlockingIOError:
            pass
        out, pos, data = [], 0, bytes(self.received)
        while pos < len(data) and data[pos] == wire.SECTION_PART:
            pos += 5
            while True:
                header, = struct.unpack_from(">Q", data, pos)
                pos += 8
                flags = header & 4095
                if flags == wire.RAM_SAVE_FLAG_EOS:
                    break
                if not flags & wire.RAM_SAVE_FLAG_CONTINUE:
                    pos += 1 + data[pos]
                page = header // 4096
                if flags & wire.RAM_SAVE_FLAG_PAGE:
                    assert data[pos:pos + 4096] == self.ram[page * 4096:(page + 1) * 4096]
                    out.append((page, "page"))
                    pos += 4096
                else:
                    out.append((page, "zero"))
                    pos += 1
            assert data[pos] == wire.SECTION_FOOTER
            pos += 5
        return out

    def close(self) -> None:
        self.server.close()
        for each in (self.rp, self.pf):
            try:
                each.close()
            except OSError:
                pass                # the error a test provoked
        self.dest.close()
        self.preempt.close()


@pytest.fixture
def link():
    made = Link()
    yield made
    made.close()


def test_requested_pages_go_out_on_the_preempt_channel_once(link):
    served = link.serve(request(3, 3, "pc.ram"))
    assert link.pages_sent() == [(3, "page"), (4, "page"), (5, "zero")]
    assert [s[:4] for s in served] == [(0, 3, 3, 3)]
    assert served[0][-1] == [(3, 3)]             # what release-ram waits to hear about
    assert not any(link.dirty[0] & (1 << p) for p in (3, 4, 5))
    assert link.claimed == bytearray(len(link.claimed))     # handed over, cleared
    # of a window partly sent, the rest goes, and the faulting page once more (it may
    # still be on its way)
    served = link.serve(request(5, 3))
    assert link.pages_sent()[3:] == [(6, "page"), (7, "page"), (5, "zero")]
    assert served[0][3] == 2 and served[0][7] is True and served[0][-1] == [(6, 2)]


def test_the_faulting_page_goes_once_more_at_most(link):
    link.dirty[0] &= ~(1 << 2)                  # the background stream sent page 2
    first, again, third = (link.serve(request(2, 1, "pc.ram")), link.serve(request(2, 1)),
                           link.serve(request(2, 1)))
    assert link.pages_sent() == [(2, "page")]
    assert first[0][7:9] == (True, False)        # resent, not dropped
    assert again[0][7:9] == (False, True) and third[0][7:9] == (False, True)
    assert first[0][-1] == []                    # its release belongs to the main channel


def test_requests_outside_the_ram_or_the_protocol_are_refused(link):
    for bad, why in ((request(PAGES - 1, 2, "pc.ram"), "outside the RAM"),
                     (request(0, 1, "vga.vram"), "outside the RAM"),
                     (request(0, 0, "pc.ram"), "outside the RAM"),
                     (struct.pack(">HH", wire.MIG_RP_MSG_REQ_PAGES, 4) + bytes(4), "shorter"),
                     (request(0, 1, ""), "broken block name")):
        made = Link()
        try:
            made.dest.sendall(bad)
            with pytest.raises(FormatError, match=why):
                made.server.serve(made.rp)
            assert made.pages_sent() == []
        finally:
            made.close()


def test_a_request_naming_no_block_first_is_refused(link):
    link.dest.sendall(request(0, 1))
    with pytest.raises(FormatError, match="REQ_PAGES before any REQ_PAGES_ID"):
        link.server.serve(link.rp)


def test_after_the_end_of_the_stream_nothing_more_is_sent(link):
    link.server.finish()
    served = link.serve(request(1, 1, "pc.ram"))
    assert link.pages_sent() == []
    assert bytes(link.received) == bytes([wire.SECTION_EOF])
    assert served[0][8] is True                  # dropped
    assert link.dirty[0] & (1 << 1)              # still the background stream's to send


def test_a_return_path_that_ends_is_an_error_not_a_hang(link):
    link.dest.close()
    with pytest.raises(OSError):
        link.server.serve(link.rp)


def test_a_destination_asking_outside_the_ram_stops_the_source_clearly(tmp_path):
    """`qfram send` to a peer whose return path asks for pages past the RAM: it ends
    with status 1 and says why, no traceback."""
    address = str(tmp_path / "hostile.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(address)
    server.listen(4)

    def destination() -> None:
        main, _ = server.accept()
        preempt, _ = server.accept()
        for c in (main, preempt):           # read whatever the source sends
            threading.Thread(target=c.makefile("rb").read, daemon=True).start()
        main.sendall(request(1 << 30, 1, "pc.ram"))

    threading.Thread(target=destination, daemon=True).start()
    sent = subprocess.run([sys.executable, "-m", "qfram", "send", "--to", address, "--demo",
                           "16M", "--rounds", "0", "--timeout", "20"],
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 1
    assert "outside the RAM" in sent.stderr and "Traceback" not in sent.stderr
