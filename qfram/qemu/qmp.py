"""A QMP client: commands to a running QEMU over its monitor socket, every reply checked.

QEMU is a local process the user pointed us at, but what its monitor says is still
input, and anything may listen on that path.  So:

* every wait has two bounds: ``read_timeout`` for each read (a silent monitor) and a
  deadline for the phase (greeting and negotiation are one phase, each command one,
  each wait for an event one): a monitor that drips a byte at a time, or floods events
  instead of answering, ends at the deadline;
* a message is at most :data:`MAX_MESSAGE` bytes, counted before it is parsed;
* every message passes one validating parser (:func:`parse_message`, :func:`check_reply`):
  a JSON object; a greeting with ``QMP.version`` and ``QMP.capabilities``; a reply with
  our command's id and exactly one of ``return`` and ``error``; an error with a string
  ``class`` and ``desc``; a ``return`` of the type the command has; an event with a
  string ``event`` and an object ``data``;
* events are kept in a bounded deque (the last :data:`MAX_EVENTS`);
* every failure is a :class:`QMPError` naming the command and what QEMU said; after a
  timeout or a message that breaks the protocol the monitor is unusable (a late reply
  must never be taken for the next command's), and every later call says why.

Why not QEMU's own ``qemu.qmp`` (PyPI qemu.qmp 0.0.6, measured against the same hostile
monitors): bounding it needs a wrapper that reaches into its private state (its legacy
``connect()`` takes no deadline, its event history is unbounded, real errors surface
only at ``disconnect()``, often as bare builtin exceptions); its synchronous API
(``legacy.py``) is GPLv2-only where qfram is MIT; it costs 67 ms more of imports
(asyncio, logging) and about twice the latency per command.
"""
from __future__ import annotations

import array
import collections
import json
import socket
import threading
import time
from typing import Any, Deque, Optional

from qfram.errors import QMPError

MAX_MESSAGE = 1 << 20          # bytes in one message: QEMU's replies are far smaller
MAX_EVENTS = 100               # events kept (the oldest go first)
READ_BYTES = 1 << 16


class QMPTimeout(QMPError):
    """The monitor was silent for a read timeout, or a phase's deadline passed."""


class QMPCommandError(QMPError):
    """QEMU answered a command with a well-formed error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc} ({error_class})")
        self.command, self.error_class, self.desc = command, error_class, desc


def _kind(value: Any) -> str:
    """A JSON value's kind, as a message names it."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value),
                                                                        type(value).__name__)


def _shown(data: Any, n: int = 120) -> str:
    """The start of what QEMU said, safe to put in a message."""
    if isinstance(data, (bytes, bytearray)):
        text = bytes(data[:n + 1]).decode("utf-8", "backslashreplace")
    elif isinstance(data, str):
        text = data
    else:
        text = json.dumps(data)
    return repr(text[:n]) + ("..." if len(text) > n else "")


def parse_message(line: bytes, what: str) -> dict:
    """One line from the monitor as a JSON object (QMPError otherwise)."""
    if len(line) > MAX_MESSAGE:
        raise QMPError(f"QMP {what}: a message of {len(line)} bytes, over the "
                       f"{MAX_MESSAGE}-byte limit")
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):        # RecursionError: nested too deep
        raise QMPError(f"QMP {what}: not JSON: {_shown(line)}") from None
    if not isinstance(message, dict):
        raise QMPError(f"QMP {what}: {_kind(message)}, not an object: {_shown(line)}")
    if "event" in message and (not isinstance(message["event"], str)
                               or not isinstance(message.get("data", {}), dict)):
        raise QMPError(f"QMP {what}: a malformed event: {_shown(line)}")
    return message


def check_greeting(message: dict, path: str) -> dict:
    """The version QEMU's greeting names ({} when it names none we can read)."""
    qmp = message.get("QMP")
    if not isinstance(qmp, dict) or not isinstance(qmp.get("version"), dict) \
            or not isinstance(qmp.get("capabilities"), list):
        raise QMPError(f"{path}: not a QMP monitor (its greeting: {_shown(message)})")
    qemu = qmp["version"].get("qemu")
    if isinstance(qemu, dict) and all(type(qemu.get(k)) is int
                                      for k in ("major", "minor", "micro")):
        return {k: qemu[k] for k in ("major", "minor", "micro")}
    return {}


def check_reply(message: dict, command: str, ident: str, returns: Any) -> Any:
    """The ``return`` of a reply to ``command`` (sent with id ``ident``): it must be of
    type ``returns`` (None: any).  QMPCommandError for a well-formed error, QMPError for
    anything else."""
    if message.get("id") != ident:
        # QEMU echoes the id; a reply to something else (or an id-less parse error)
        # means the two sides disagree on where they are
        raise QMPError(f"{command}: a reply that is not to it: {_shown(message)}")
    if ("return" in message) == ("error" in message):
        raise QMPError(f"{command}: a reply with "
                       f"{'both' if 'return' in message else 'neither'} 'return' and "
                       f"'error': {_shown(message)}")
    if "error" in message:
        error = message["error"]
        if not isinstance(error, dict) or not isinstance(error.get("class"), str) \
                or not isinstance(error.get("desc"), str):
            raise QMPError(f"{command}: a malformed error: {_shown(message)}")
        raise QMPCommandError(command, error["class"], error["desc"])
    value = message["return"]
    if returns is not None and not isinstance(value, returns) or \
            isinstance(value, bool) and returns in (int, float):
        raise QMPError(f"{command}: QEMU returned {_kind(value)} where {_kind(returns())} "
                       f"is due: {_shown(value)}")
    return value


class QMP:
    """A connected QMP monitor (``-qmp unix:PATH,server=on,wait=off``): the greeting is
    read and capabilities negotiated on connect, all within ``timeout`` (a monitor not
    listening yet is tried again until then).  ``timeout`` is also each command's
    deadline unless the command names its own; ``read_timeout`` (default: ``timeout``)
    bounds each read."""

    def __init__(self, path: str, timeout: float = 30.0, *,
                 read_timeout: Optional[float] = None) -> None:
        self.path = path
        self.timeout = timeout
        self.read_timeout = timeout if read_timeout is None else read_timeout
        self.version: dict = {}
        self.events: Deque[dict] = collections.deque(maxlen=MAX_EVENTS)
        self.events_seen = 0
        self.events_in_phase = self._heard_in_phase = 0
        self._phase_seconds = timeout
        self._buf = bytearray()
        self._ids = 0
        self._broken: Optional[str] = None
        self._lock = threading.Lock()
        deadline = self._begin(time.monotonic() + timeout)
        self.sock = self._connect(deadline)
        try:
            self.version = check_greeting(self._message("greeting", deadline), path)
            self._command("qmp_capabilities", None, -1, dict, deadline)
        except BaseException:
            self.close()
            raise

    def _connect(self, deadline: float) -> socket.socket:
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.01, min(self.read_timeout,
                                              deadline - time.monotonic())))
                sock.connect(self.path)
                return sock
            except OSError as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise QMPError(f"{self.path}: no QMP monitor answers within "
                                   f"{self.timeout:g} s ({exc.strerror or exc})") from None
                time.sleep(0.05)

    # -- reading ------------------------------------------------------------------------

    def _broke(self, error: QMPError) -> QMPError:
        """The monitor cannot be trusted to be where we think: every later call says
        why."""
        self._broken = str(error)
        return error

    def _begin(self, deadline: float) -> float:
        """A phase starts: it ends at ``deadline``."""
        self.events_in_phase = self._heard_in_phase = 0
        self._phase_seconds = deadline - time.monotonic()
        return deadline

    def _line(self, what: str, deadline: float) -> bytes:
        """The next line, at most MAX_MESSAGE bytes, by ``deadline``."""
        scanned = 0
        while True:
            end = self._buf.find(b"\n", scanned)
            if end >= 0:
                line = bytes(self._buf[:end + 1])
                del self._buf[:end + 1]
                return line
            scanned = len(self._buf)
            if scanned > MAX_MESSAGE:
                raise self._broke(QMPError(
                    f"QMP {what}: a message over the {MAX_MESSAGE}-byte limit ({scanned} "
                    f"bytes and no end yet)"))
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._broke(QMPTimeout(
                    f"QMP {what}: QEMU silent for {self._phase_seconds:.3g} s"
                    if not self._heard_in_phase else
                    f"QMP {what}: no answer within {self._phase_seconds:.3g} s "
                    f"({self._heard_in_phase} bytes came meanwhile: {self.events_in_phase} "
                    f"events and {len(self._buf)} bytes of an unfinished message)"))
            try:
                self.sock.settimeout(min(self.read_timeout, left))
                data = self.sock.recv(READ_BYTES)
            except socket.timeout:
                if deadline - time.monotonic() <= 0:
                    continue                # said as the phase's, above
                raise self._broke(QMPTimeout(
                    f"QMP {what}: QEMU silent for {self.read_timeout:g} s")) from None
            except OSError as exc:
                raise self._broke(QMPError(f"QMP {what}: {exc.strerror or exc}")) from None
            if not data:
                raise self._broke(QMPError(
                    f"QMP {what}: QEMU closed its monitor"
                    + (f" ({len(self._buf)} bytes of a message unfinished)"
                       if self._buf.strip() else "")))
            self._heard_in_phase += len(data)
            self._buf += data

    def _message(self, what: str, deadline: float) -> dict:
        while True:
            line = self._line(what, deadline)
            if line.strip():
                try:
                    return parse_message(line, what)
                except QMPError as exc:
                    raise self._broke(exc) from None

    def _event(self, message: dict) -> None:
        self.events_seen += 1
        self.events_in_phase += 1
        self.events.append(message)

    # -- commands -----------------------------------------------------------------------

    def _command(self, name: str, arguments: Optional[dict], fd: int, returns: Any,
                 deadline: float) -> Any:
        if self._broken is not None:
            raise QMPError(f"{name}: the monitor is unusable after an earlier failure "
                           f"({self._broken})")
        self._ids += 1
        ident = f"qfram-{self._ids}"
        message = {"execute": name, "id": ident}
        if arguments:
            message["arguments"] = arguments
        data = (json.dumps(message) + "\n").encode()
        try:
            self.sock.settimeout(max(0.001, min(self.read_timeout,
                                                deadline - time.monotonic())))
            if fd >= 0:
                data = data[self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                        array.array("i", [fd]))]):]
            self.sock.sendall(data)
        except OSError as exc:
            raise self._broke(QMPError(f"{name}: cannot send it to QEMU: "
                                       f"{exc.strerror or exc}")) from None
        while True:
            reply = self._message(name, deadline)
            if "event" in reply:
                self._event(reply)
                continue
            try:
                return check_reply(reply, name, ident, returns)
            except QMPCommandError:
                raise                       # a well-formed answer: the monitor is fine
            except QMPError as exc:
                raise self._broke(exc) from None

    def cmd(self, name: str, arguments: Optional[dict] = None, *, fd: int = -1,
            returns: Any = dict, timeout: Optional[float] = None) -> Any:
        """Run ``name`` with ``arguments`` (QMP spells them with dashes) and return its
        ``return``, which must be of type ``returns`` (None: any).  ``fd``: pass this
        file descriptor along (for getfd).  The whole exchange ends within ``timeout``
        (default: the monitor's)."""
        with self._lock:
            return self._command(name, arguments, fd, returns,
                                 self._begin(time.monotonic() + (self.timeout if timeout
                                                                 is None else timeout)))

    def wait_event(self, name: str, timeout: float) -> dict:
        """The first event ``name``, already received or arriving within ``timeout``."""
        with self._lock:
            for event in self.events:
                if event["event"] == name:
                    self.events.remove(event)
                    return event
            if self._broken is not None:
                raise QMPError(f"waiting for {name}: the monitor is unusable after an "
                               f"earlier failure ({self._broken})")
            deadline = self._begin(time.monotonic() + timeout)
            while True:
                try:
                    message = self._message(f"waiting for {name}", deadline)
                except QMPTimeout:
                    # no command is outstanding and what is buffered stays: still usable
                    self._broken = None
                    raise QMPTimeout(f"no {name} event within {timeout:g} s "
                                     f"({self.events_in_phase} other events)") from None
                if "event" not in message:
                    raise self._broke(QMPError(f"waiting for {name}: a message that is "
                                               f"no event: {_shown(message)}"))
                if message["event"] == name:
                    return message
                self._event(message)

    # -- what qfram asks ----------------------------------------------------------------

    def set_capabilities(self, timeout: Optional[float] = None, **caps: bool) -> None:
        """migrate-set-capabilities, e.g. ``postcopy_ram=True``."""
        self.cmd("migrate-set-capabilities",
                 {"capabilities": [{"capability": k.replace("_", "-"), "state": v}
                                   for k, v in caps.items()]}, timeout=timeout)

    def migration_status(self, timeout: Optional[float] = None) -> str:
        """query-migrate's status ("none" before any migration)."""
        status = self.cmd("query-migrate", timeout=timeout).get("status", "none")
        if not isinstance(status, str):
            raise QMPError(f"query-migrate: a status that is {_kind(status)}: "
                           f"{_shown(status)}")
        return status

    def shutdown(self) -> None:
        """Wake a thread waiting on the monitor (its read ends), from any thread."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "QMP":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
