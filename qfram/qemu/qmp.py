"""A QMP client: commands to a running QEMU over its monitor socket, replies checked.

QEMU is a local process the user pointed us at, but its replies are still input: every
line must be JSON with a ``return`` or an ``error``, and every wait is bounded.
"""
from __future__ import annotations

import array
import json
import socket
import time
from typing import Any, Optional

from qfram.errors import QMPError



class QMP:
    """A connected QMP monitor (``-qmp unix:PATH,server=on,wait=off``): the greeting is
    read and capabilities negotiated on connect (retried until ``timeout``)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(path)
                break
            except OSError as exc:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"{path}: no QMP monitor answers ({exc.strerror})") \
                        from None
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rw")
        greeting = self._line("the greeting")
        if "QMP" not in greeting:
            raise QMPError(f"{path}: not a QMP monitor (greeting {str(greeting)[:80]!r})")
        self.version = greeting["QMP"].get("version", {}).get("qemu", {})
        self.cmd("qmp_capabilities")

    def _line(self, what: str) -> dict:
        try:
            line = self.file.readline()
        except OSError as exc:
            raise QMPError(f"QMP {what}: {exc}") from None
        if not line:
            raise QMPError(f"QEMU closed its monitor during {what}")
        try:
            reply = json.loads(line)
        except ValueError:
            raise QMPError(f"QMP {what}: not JSON: {line[:80]!r}") from None
        if not isinstance(reply, dict):
            raise QMPError(f"QMP {what}: not an object: {line[:80]!r}")
        return reply

    def cmd(self, name: str, arguments: Optional[dict] = None, *, fd: int = -1) -> Any:
        """Run ``name`` with ``arguments`` (QMP spells them with dashes); ``fd``: pass
        this file descriptor along (for getfd).  Returns the command's ``return``."""
        msg = json.dumps({"execute": name, **({"arguments": arguments} if arguments else {})})
        if fd >= 0:
            self.file.flush()
            self.sock.sendmsg([(msg + "\n").encode()],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        else:
            self.file.write(msg + "\n")
            self.file.flush()
        while True:
            reply = self._line(name)
            if "error" in reply:
                error = reply["error"]
                raise QMPError(f"{name}: {error.get('desc', error) if isinstance(error, dict) else error}")
            if "return" in reply:
                return reply["return"]
            # anything else is an asynchronous event: not what we wait for

    def set_capabilities(self, **caps: bool) -> None:
        """migrate-set-capabilities, e.g. ``postcopy_ram=True``."""
        self.cmd("migrate-set-capabilities",
                 {"capabilities": [{"capability": k.replace("_", "-"), "state": v}
                                   for k, v in caps.items()]})

    def migration_status(self) -> str:
        status = self.cmd("query-migrate").get("status", "none")
        return status if isinstance(status, str) else "none"

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass                    # QEMU is gone: nothing left to say to it
        finally:
            self.sock.close()
