"""Scheduling hints for the threads a page fault waits on.

On a machine whose cores are busy streaming (a postcopy source sending, a destination
placing) — or busy with anything else — a thread woken to serve a fault waits for a
core: milliseconds under EEVDF's default slice, more behind other processes.  The few
threads a fault waits on (they use little CPU) run real-time, SCHED_FIFO at the lowest
priority, where the process may (root, or an RLIMIT_RTPRIO): they then take a core the
moment they wake, whatever else runs.  Elsewhere they ask for a short EEVDF slice (Linux
6.12+, no privilege needed), and the bulk threads are niced so that they do not stand
in their way — which, on a machine shared with other work, also slows the bulk stream
down.  All hints: where the kernel refuses, nothing else changes.
"""
from __future__ import annotations

import ctypes
import os
import resource
import threading
from typing import Optional

_SYS_SCHED_SETATTR = 314          # x86_64
_libc = ctypes.CDLL(None, use_errno=True)


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
                ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
                ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64)]


def short_slice(microseconds: int = 100) -> bool:
    """Ask for a short scheduler slice for the calling thread (EEVDF, Linux 6.12+)."""
    attr = _SchedAttr(size=ctypes.sizeof(_SchedAttr), sched_policy=0,
                      sched_runtime=microseconds * 1000)
    return _libc.syscall(_SYS_SCHED_SETATTR, threading.get_native_id(),
                         ctypes.byref(attr), 0) == 0


_realtime: Optional[bool] = None


def realtime_allowed() -> bool:
    """May this process make a thread real-time?  Tried once (the calling thread is
    real-time for an instant, then as it was)."""
    global _realtime
    if _realtime is None:
        try:
            policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            os.sched_setscheduler(0, policy, param)
            _realtime = True
        except (AttributeError, OSError):
            _realtime = False
    return _realtime


def urgent() -> str:
    """The calling thread serves page faults: real-time (SCHED_FIFO, the lowest
    priority) where allowed, else a short slice.  Returns which: "fifo" or
    "short-slice" (or "default" where neither is possible)."""
    if realtime_allowed():
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            return "fifo"
        except (AttributeError, OSError):
            pass
    return "short-slice" if short_slice() else "default"


def background(nice: int = 10) -> bool:
    """The calling thread streams in bulk: where the fault-serving threads cannot be
    real-time, lower its priority (else a fault waits for its slice to end)."""
    if realtime_allowed():
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        return True
    except OSError:
        return False


def process_cpu() -> float:
    """CPU seconds the calling process has used so far (user + system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
