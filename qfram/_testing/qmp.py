"""A real QEMU guest driven over QMP: start it, stop it, dump its memory, migrate it to a
file, or start it incoming from one.  Used by the interoperability tests and
benchmarks; handy for moving a running QEMU's RAM into qfram too."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import List, Optional

from qfram.qemu.qmp import QMP, QMPError

__all__ = ["Guest", "QMPError", "find_qemu", "qemu_command", "qemu_version"]


def find_qemu() -> Optional[str]:
    return shutil.which("qemu-system-x86_64")


def qemu_version(qemu: str) -> tuple:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    return tuple(int(x) for x in out.split("version ")[1].split()[0].split(".")[:2])


def qemu_command(memory: str = "64M", *, qemu: Optional[str] = None,
                 firmware: Optional[str] = None, incoming: Optional[str] = None,
                 running: bool = False, extra: Optional[List[str]] = None,
                 accel: str = "tcg") -> List[str]:
    """The command line of a bare guest: machine pc, ``memory`` of RAM, no default
    devices, no display, ``accel`` (TCG by default); stopped at start unless
    ``running``."""
    qemu = qemu or find_qemu()
    if qemu is None:
        raise FileNotFoundError("qemu-system-x86_64 is not installed")
    args = [qemu, "-machine", "pc", "-m", memory, "-nodefaults", "-display", "none",
            "-accel", accel]
    if firmware:
        args += ["-L", firmware]
    if not running:
        args.append("-S")
    if incoming:
        args += ["-incoming", incoming]
    return args + (extra or [])


class Guest:
    """``qemu-system-x86_64 -machine pc -m MEM -nodefaults -display none`` (TCG, no
    disk, stopped at start unless ``running``) with a QMP socket."""

    def __init__(self, memory: str = "64M", extra: Optional[List[str]] = None,
                 incoming: Optional[str] = None, running: bool = False,
                 qemu: Optional[str] = None, firmware: Optional[str] = None,
                 timeout: float = 60.0, accel: str = "tcg") -> None:
        self.dir = tempfile.mkdtemp(prefix="qfram-qemu-")
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        args = qemu_command(memory, qemu=qemu, firmware=firmware, incoming=incoming,
                            running=running, extra=extra, accel=accel)
        # a second monitor for another client (a monitor serves one at a time)
        self.spare_qmp_path = os.path.join(self.dir, "spare-qmp.sock")
        args += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                 "-qmp", f"unix:{self.spare_qmp_path},server=on,wait=off"]
        self.log = open(os.path.join(self.dir, "qemu.log"), "w+")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.timeout = timeout
        try:
            self._connect()
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _connect(self) -> None:
        try:
            self.qmp = QMP(self.qmp_path, timeout=self.timeout)
        except QMPError as exc:
            # QEMU may exit before or while it greets (a refused incoming stream, say):
            # its exit status and output are the answer
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                raise QMPError(f"QMP failed ({exc}) and QEMU is still running: "
                               f"{self.output()}") from None
            raise QMPError(f"QEMU exited with {self.proc.returncode}: "
                           f"{self.output()}") from None

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def cmd(self, name: str, **arguments):
        """A QMP command; keyword arguments with dashes: ``**{"tls-creds": ...}``."""
        try:
            return self.qmp.cmd(name, arguments or None, returns=None)
        except QMPError as exc:
            raise QMPError(f"{exc}: {self.output()[-2000:]}") from None

    def wait_status(self, leave: str, timeout: Optional[float] = None) -> str:
        """Wait until the run state is no longer ``leave`` (e.g. 'inmigrate')."""
        deadline = time.time() + (timeout or self.timeout)
        while True:
            status = self.cmd("query-status")["status"]
            if status != leave:
                return status
            if time.time() > deadline:
                raise QMPError(f"still {leave} after {timeout or self.timeout} s")
            time.sleep(0.05)

    def set_capabilities(self, **caps: bool) -> None:
        self.qmp.set_capabilities(**caps)

    def migrate_to_file(self, path: str, mapped: bool = False,
                        timeout: Optional[float] = None) -> None:
        """``migrate "exec:cat > PATH"`` (or, ``mapped``, ``file:PATH`` with the
        mapped-ram capability, QEMU 9.0+) and wait for it to complete."""
        if mapped:
            self.set_capabilities(mapped_ram=True)
            self.cmd("migrate", uri=f"file:{path}")
        else:
            self.cmd("migrate", uri=f"exec:cat > {path}")
        self._wait_migration(timeout)

    def migrate_incoming(self, uri: str, timeout: Optional[float] = None, **caps: bool) -> None:
        """For a guest started with ``incoming="defer"``: set capabilities, load
        ``uri`` and wait until the guest has left 'inmigrate'."""
        if caps:
            self.set_capabilities(**caps)
        self.cmd("migrate-incoming", uri=uri)
        self.wait_status("inmigrate", timeout)

    def _wait_migration(self, timeout: Optional[float]) -> None:
        deadline = time.time() + (timeout or self.timeout)
        while True:
            status = self.cmd("query-migrate").get("status")
            if status == "completed":
                return
            if status == "failed":
                raise QMPError(f"migration failed: {self.cmd('query-migrate')}")
            if time.time() > deadline:
                raise QMPError(f"migration still {status} after {timeout or self.timeout} s")
            time.sleep(0.05)

    def pmemsave(self, path: str, size: int, start: int = 0) -> None:
        self.cmd("pmemsave", val=start, size=size, filename=path)

    def close(self) -> None:
        try:
            self.cmd("quit")
        except (QMPError, OSError, ValueError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.qmp.close()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
