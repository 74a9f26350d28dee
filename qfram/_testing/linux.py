"""A real Linux guest for tests and benchmarks: Debian's kernel (fetched by
scripts/fetch_guest_kernel.sh into .cache/guest-kernel) and an initramfs whose init is
tests/helpers/guest_init.c, built static.  The init fills ``qfram_mib`` MiB with a known
pattern, prints ``QFRAM READY <checksum>`` on the serial port, then walks the memory for
ever, printing ``QFRAM SUM <round> <checksum>`` after each walk."""
from __future__ import annotations

import os
import subprocess
import time
from typing import List, Tuple

from qfram.errors import NoGuest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNEL = os.path.join(ROOT, ".cache", "guest-kernel", "vmlinuz")
INIT_SOURCE = os.path.join(ROOT, "tests", "helpers", "guest_init.c")


def newc(entries) -> bytes:
    """A cpio archive in the kernel's initramfs format ("newc"): (name, mode, data)."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate(list(entries) + [("TRAILER!!!", 0, b"")]):
        raw = name.encode() + b"\0"
        fields = [ino + 1, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def guest_arguments(workdir: str, fill_mib: int) -> List[str]:
    """QEMU arguments that boot the guest (kernel, initramfs built in ``workdir``,
    command line); raises NoGuest when the kernel is missing or init will not build."""
    if not os.path.exists(KERNEL):
        failed = KERNEL.replace("/vmlinuz", ".failed")
        why = open(failed).read().strip() if os.path.exists(failed) else "not fetched"
        raise NoGuest(f"no guest kernel (scripts/fetch_guest_kernel.sh): {why}")
    init = os.path.join(workdir, "init")
    build = subprocess.run(["cc", "-static", "-O2", "-o", init, INIT_SOURCE],
                           capture_output=True, text=True)
    if build.returncode:
        raise NoGuest(f"cannot build a static init: {build.stderr[-300:]}")
    initramfs = os.path.join(workdir, "initramfs.cpio")
    with open(init, "rb") as f, open(initramfs, "wb") as out:
        out.write(newc([("dev", 0o040755, b""), ("init", 0o100755, f.read())]))
    return ["-kernel", KERNEL, "-initrd", initramfs,
            "-append", f"console=ttyS0 panic=-1 quiet qfram_mib={fill_mib}"]


def wait_line(path: str, prefix: str, after: int = 0,
              timeout: float = 120) -> Tuple[str, int]:
    """The first whole line starting with ``prefix`` in the serial log past byte
    ``after``, and where the log's whole lines ended then.  A line the guest is still
    writing (no newline yet) is not read: it would be cut short."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            with open(path, errors="replace") as log:
                text = log.read()
        except FileNotFoundError:
            text = ""
        whole = text[:text.rfind("\n") + 1]
        for line in whole[after:].splitlines():
            if line.startswith(prefix):
                return line, len(whole)
        time.sleep(0.002)
    raise TimeoutError(f"no {prefix!r} on the guest's serial port: {text[-2000:]}")
