# A snapshot mapped copy-on-write (a dirty-only reset's RAM, the pages restore-qemu
# sends) reads the file when a page is first touched; if the file was cut meanwhile, that
# touch is a SIGBUS, and the process died with status 135 and no word.  guard_mapping()
# notes each such mapping; a SIGBUS inside one says which snapshot, block and page, with
# write(2), and ends the process with status 1 (the thread that touched it cannot go on,
# and may hold the GIL) — as a lazy restore does when its file is cut.  A SIGBUS anywhere
# else goes to the handler that was there before.
# Included by _uffd.pyx.

from posix.signal cimport sigaction, sigaction_t, siginfo_t, sigemptyset, SA_SIGINFO

cdef extern from "<signal.h>" nogil:
    enum: SIGBUS

cdef enum:
    MAX_GUARDED = 256              # mappings noted at once (more: a new one is refused)
    GUARD_LABEL = 400              # bytes of a mapping's name kept for the message

cdef struct Guarded:
    uint64_t start
    uint64_t end                   # 0: a free slot
    char label[GUARD_LABEL]

cdef Guarded _guarded[MAX_GUARDED]
cdef sigaction_t _sigbus_before
cdef bint _sigbus_installed = False


cdef void _on_sigbus(int sig, siginfo_t *info, void *context) noexcept nogil:
    cdef uint64_t addr = <uint64_t>info.si_addr
    cdef char line[640]
    cdef int i, n
    for i in range(MAX_GUARDED):
        if _guarded[i].start <= addr < qf_load(&_guarded[i].end):
            n = snprintf(line, sizeof(line), "qfram: page %llu of %s is no longer in the "
                         "snapshot file (was it cut or replaced while in use?): ending "
                         "the process\n",
                         <unsigned long long>((addr - _guarded[i].start) // PAGE),
                         _guarded[i].label)
            write(2, line, n)
            _exit(1)
    # not ours: the handler from before, as if we had never been here (the faulting
    # instruction runs again and meets it)
    sigaction(SIGBUS, &_sigbus_before, NULL)


def guard_mapping(region, str label):
    """Note ``region`` (a mapping of a snapshot file) as ``label`` (e.g. the snapshot's
    path and block): a SIGBUS inside it ends the process with status 1 and a line on
    stderr saying so.  ``unguard_mapping`` before unmapping it."""
    global _sigbus_installed
    cdef Py_buffer view
    cdef sigaction_t action
    cdef int i
    cdef bytes name = label.encode("utf-8", "backslashreplace")[:GUARD_LABEL - 1]
    if not _sigbus_installed:
        memset(&action, 0, sizeof(action))
        action.sa_sigaction = _on_sigbus
        action.sa_flags = SA_SIGINFO
        sigemptyset(&action.sa_mask)
        if sigaction(SIGBUS, &action, &_sigbus_before) != 0:
            raise OSError(errno, "sigaction(SIGBUS)")
        _sigbus_installed = True
    PyObject_GetBuffer(region, &view, PyBUF_SIMPLE)
    try:
        for i in range(MAX_GUARDED):
            if qf_load(&_guarded[i].end) == 0:
                memcpy(_guarded[i].label, <const char *>name, len(name))
                _guarded[i].label[len(name)] = 0
                _guarded[i].start = <uint64_t>view.buf
                qf_store(&_guarded[i].end, <uint64_t>view.buf + <uint64_t>view.len)
                return
        raise OSError(EINVAL, f"more than {MAX_GUARDED} snapshot mappings at once")
    finally:
        PyBuffer_Release(&view)


def unguard_mapping(region):
    """Forget ``region`` (before it is unmapped; a closed one is forgotten already by
    whoever closed it)."""
    cdef Py_buffer view
    cdef int i
    try:
        PyObject_GetBuffer(region, &view, PyBUF_SIMPLE)
    except ValueError:
        return                          # closed: nothing there to guard
    for i in range(MAX_GUARDED):
        if _guarded[i].start == <uint64_t>view.buf and qf_load(&_guarded[i].end):
            qf_store(&_guarded[i].end, 0)
    PyBuffer_Release(&view)
