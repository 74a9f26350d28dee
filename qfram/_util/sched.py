"""Scheduling hints for the threads a page fault waits on.

On a machine whose cores are busy streaming (a postcopy source sending, a destination
placing), a thread woken to serve a fault waits for the running thread's slice to end:
milliseconds under EEVDF's default slice.  Linux 6.12+ lets a normal (SCHED_OTHER) thread
ask for a shorter slice — no privilege needed — so it runs sooner after it wakes.  The
bulk threads are niced instead.  Both are hints: where the kernel refuses, nothing else
changes.
"""
from __future__ import annotations

import ctypes
import os
import threading

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


def background(nice: int = 10) -> bool:
    """Lower the calling thread's priority (bulk work that must not delay faults)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        return True
    except OSError:
        return False
