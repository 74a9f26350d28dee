"""TLS 1.3 for the migration channels, in C (OpenSSL), under the GIL-free loops.

Kernel TLS is not available on these machines, and Python's ``ssl`` needs the GIL for
every record — which a thread faulting on missing guest memory may hold while it waits
for the very page the record carries.  So the channels speak TLS through OpenSSL here:
a :class:`TLSConnection` wraps a connected, non-blocking socket; its handshake verifies
the peer's certificate against the CA of a QEMU ``tls-creds-x509`` directory (both ways:
mutual TLS), and the host name or address the client asked for; after it, the
connection is a *transport* (``c_transport``) that the core's QEMUFile reads and writes
without the GIL, like an fd.

One connection carries a stream one way and its return path the other, from two
threads: every SSL call is made under the connection's lock, non-blocking, so neither
direction holds it while it waits.  Session tickets are off (nothing but the stream
flows after the handshake), which keeps reads from ever needing to write.
"""

from cpython.pycapsule cimport PyCapsule_New
from libc.errno cimport errno, EAGAIN, EPROTO, ETIMEDOUT, EPIPE
from libc.limits cimport INT_MAX
from libc.stdint cimport uint64_t
from libc.string cimport memset
from posix.unistd cimport close

from qfram.includes.system cimport pollfd, poll, POLLIN, POLLOUT, qf_set_errno, qf_now_ns
from qfram.includes.atomics cimport qf_add_int, qf_load_int, qf_relax
from qfram._fast cimport Transport

from qfram.errors import TLSError

import ipaddress
import os

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    enum:
        PTHREAD_MUTEX_ADAPTIVE_NP
        PTHREAD_PRIO_INHERIT
    int pthread_mutexattr_init(pthread_mutexattr_t *attr)
    int pthread_mutexattr_settype(pthread_mutexattr_t *attr, int kind)
    int pthread_mutexattr_setprotocol(pthread_mutexattr_t *attr, int protocol)
    int pthread_mutex_init(pthread_mutex_t *m, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

cdef extern from "<openssl/ssl.h>" nogil:
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct SSL:
        pass
    ctypedef struct SSL_METHOD:
        pass
    ctypedef struct X509:
        pass
    ctypedef struct X509_NAME:
        pass
    ctypedef struct X509_VERIFY_PARAM:
        pass
    ctypedef struct BIO:
        pass
    ctypedef struct BIO_METHOD:
        pass
    enum:
        SSL_ERROR_NONE
        SSL_ERROR_WANT_READ
        SSL_ERROR_WANT_WRITE
        SSL_ERROR_ZERO_RETURN
        SSL_ERROR_SYSCALL
        SSL_ERROR_SSL
        SSL_FILETYPE_PEM
        SSL_VERIFY_NONE
        SSL_VERIFY_PEER
        SSL_VERIFY_FAIL_IF_NO_PEER_CERT
        TLS1_3_VERSION
        SSL_MODE_ENABLE_PARTIAL_WRITE
        SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
        X509_V_OK
        XN_FLAG_RFC2253
    const SSL_METHOD *TLS_server_method()
    const SSL_METHOD *TLS_client_method()
    SSL_CTX *SSL_CTX_new(const SSL_METHOD *method)
    void SSL_CTX_free(SSL_CTX *ctx)
    int SSL_CTX_set_min_proto_version(SSL_CTX *ctx, int version)
    int SSL_CTX_set_ciphersuites(SSL_CTX *ctx, const char *suites)
    int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *path)
    int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *path, int kind)
    int SSL_CTX_check_private_key(const SSL_CTX *ctx)
    int SSL_CTX_load_verify_locations(SSL_CTX *ctx, const char *ca, const char *dir)
    void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, void *callback)
    int SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t n)
    long SSL_CTX_set_mode(SSL_CTX *ctx, long mode)
    void SSL_CTX_set_read_ahead(SSL_CTX *ctx, int yes)
    void SSL_CTX_set_default_read_buffer_len(SSL_CTX *ctx, size_t length)
    int SSL_has_pending(const SSL *ssl)
    BIO *SSL_get_wbio(const SSL *ssl)
    void SSL_set0_wbio(SSL *ssl, BIO *wbio)
    SSL *SSL_new(SSL_CTX *ctx)
    void SSL_free(SSL *ssl)
    int SSL_set_fd(SSL *ssl, int fd)
    int SSL_set1_host(SSL *ssl, const char *host)
    long SSL_set_tlsext_host_name(SSL *ssl, const char *name)
    X509_VERIFY_PARAM *SSL_get0_param(SSL *ssl)
    void SSL_set_connect_state(SSL *ssl)
    void SSL_set_accept_state(SSL *ssl)
    int SSL_do_handshake(SSL *ssl)
    int SSL_read(SSL *ssl, void *buf, int n)
    int SSL_peek(SSL *ssl, void *buf, int n)
    int SSL_write(SSL *ssl, const void *buf, int n)
    int SSL_get_error(const SSL *ssl, int ret)
    int SSL_shutdown(SSL *ssl)
    long SSL_get_verify_result(const SSL *ssl)
    X509 *SSL_get1_peer_certificate(const SSL *ssl)
    const char *SSL_get_version(const SSL *ssl)
    const char *SSL_get_cipher_name(const SSL *ssl)

cdef extern from "<openssl/x509.h>" nogil:
    int X509_VERIFY_PARAM_set1_ip_asc(X509_VERIFY_PARAM *param, const char *ip)
    X509_NAME *X509_get_subject_name(const X509 *cert)
    int X509_NAME_print_ex(BIO *out, const X509_NAME *name, int indent, unsigned long flags)
    void X509_free(X509 *cert)
    const char *X509_verify_cert_error_string(long n)

cdef extern from "<openssl/bio.h>" nogil:
    const BIO_METHOD *BIO_s_mem()
    const BIO_METHOD *BIO_f_buffer()
    BIO *BIO_new(const BIO_METHOD *kind)
    BIO *BIO_push(BIO *b, BIO *append)
    int BIO_up_ref(BIO *bio)
    long BIO_set_write_buffer_size(BIO *bio, long size)
    int BIO_flush(BIO *bio)
    int BIO_should_retry(BIO *bio)
    int BIO_wpending(BIO *bio)
    int BIO_read(BIO *bio, void *buf, int n)
    int BIO_free(BIO *bio)

cdef extern from "<openssl/err.h>" nogil:
    unsigned long ERR_get_error()
    void ERR_error_string_n(unsigned long e, char *buf, size_t n)
    void ERR_clear_error()


CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# OpenSSL's read-ahead buffer: one recv() brings this much (many 16 KiB records) instead
# of one record per system call.
cdef size_t READ_AHEAD = 256 * 1024
# What one write may encrypt and send while holding the connection: eight records,
# gathered into one send() (a send per 16 KiB record, as Python's ssl makes them, gave
# both ends' TCP 8x the packets: 0.57 -> 0.76 GB/s over loopback with 64 KiB, source
# 1.17 -> 0.82 CPU s per GiB with 256 KiB).  The other direction (a return path's page
# request) waits at most that long: ~50 us.
cdef int WRITE_SLICE = 128 * 1024
cdef long WRITE_BUFFER = 136 * 1024        # the records of one slice, and their headers

# The files of a QEMU tls-creds-x509 directory.
CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"



cdef str _openssl_errors():
    cdef char buf[256]
    cdef unsigned long e
    parts = []
    while True:
        e = ERR_get_error()
        if e == 0:
            break
        ERR_error_string_n(e, buf, sizeof(buf))
        parts.append(buf.decode(errors="replace"))
    return "; ".join(parts) or "no OpenSSL error recorded"


cdef class TLSContext:
    """The certificates of one side of a migration, from a QEMU tls-creds-x509
    directory: ``server`` (the listening side) or client.  Peers are verified against
    its ``ca-cert.pem``, both ways."""
    cdef SSL_CTX *ctx
    cdef readonly bint server
    cdef readonly str directory

    def __cinit__(self):
        self.ctx = NULL

    def __init__(self, str directory, bint server):
        self.directory = directory
        self.server = server
        cert = os.path.join(directory, SERVER_CERT if server else CLIENT_CERT)
        key = os.path.join(directory, SERVER_KEY if server else CLIENT_KEY)
        ca = os.path.join(directory, CA_CERT)
        for path in (ca, cert, key):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing (a QEMU tls-creds-x509 directory "
                                        f"holds {CA_CERT}, {SERVER_CERT}, {SERVER_KEY}, "
                                        f"{CLIENT_CERT}, {CLIENT_KEY}; `qfram tls-init` "
                                        f"makes one)")
        self.ctx = SSL_CTX_new(TLS_server_method() if server else TLS_client_method())
        if self.ctx == NULL:
            raise TLSError(EPROTO, f"SSL_CTX_new: {_openssl_errors()}")
        SSL_CTX_set_min_proto_version(self.ctx, TLS1_3_VERSION)
        SSL_CTX_set_num_tickets(self.ctx, 0)
        # AES-128-GCM first: ~15% faster than AES-256 here, and what a peer may pick
        SSL_CTX_set_ciphersuites(self.ctx, CIPHERSUITES)
        SSL_CTX_set_read_ahead(self.ctx, 1)     # a record in one read, not two
        SSL_CTX_set_default_read_buffer_len(self.ctx, READ_AHEAD)   # many records a read
        SSL_CTX_set_mode(self.ctx, SSL_MODE_ENABLE_PARTIAL_WRITE
                         | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
        if SSL_CTX_use_certificate_chain_file(self.ctx, os.fsencode(cert)) != 1:
            raise TLSError(EPROTO, f"{cert}: {_openssl_errors()}")
        if SSL_CTX_use_PrivateKey_file(self.ctx, os.fsencode(key), SSL_FILETYPE_PEM) != 1 \
                or SSL_CTX_check_private_key(self.ctx) != 1:
            raise TLSError(EPROTO, f"{key}: {_openssl_errors()}")
        if SSL_CTX_load_verify_locations(self.ctx, os.fsencode(ca), NULL) != 1:
            raise TLSError(EPROTO, f"{ca}: {_openssl_errors()}")
        SSL_CTX_set_verify(self.ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL)

    def __dealloc__(self):
        if self.ctx != NULL:
            SSL_CTX_free(self.ctx)


# One TLS connection, as the GIL-free code sees it.  Its two directions run on two
# threads, and an SSL object takes one caller at a time: every SSL call holds `lock`.  A
# mutex, not a spin lock: the holder may be a niced bulk thread that loses its core
# mid-record, and a waiter spinning on the other core would only keep it off longer.
cdef struct Conn:
    SSL *ssl
    int fd
    pthread_mutex_t lock
    int waiting           # threads waiting for `lock`: whoever comes next lets them in
    BIO *wbio             # after the handshake: records gathered here, sent in one go
    int unsent            # plaintext bytes accepted whose records are not all sent yet


cdef inline void _take(Conn *c) noexcept nogil:
    """Lock c, after any thread already waiting for it.  The two directions take turns:
    a bulk stream calling again at once (a receiver decrypting, a sender encrypting)
    would otherwise keep the lock from the other direction's page requests for as long
    as it has data — a mutex does not queue its waiters."""
    cdef int spins = 0
    while qf_load_int(&c.waiting):
        qf_relax(&spins)
    qf_add_int(&c.waiting, 1)
    pthread_mutex_lock(&c.lock)
    qf_add_int(&c.waiting, -1)


cdef ssize_t _conn_io(void *ctx, void *buf, size_t n, short *wait, bint writing) noexcept nogil:
    """Read or write up to n bytes: > 0 done; 0 the peer closed (reading); -1 with
    errno (EAGAIN: wait for *wait, then call again with the same buffer)."""
    cdef Conn *c = <Conn *>ctx
    cdef int r, e, more
    cdef int want = <int>(n if n < INT_MAX else INT_MAX)
    if writing and want > WRITE_SLICE:
        want = WRITE_SLICE
    _take(c)
    if c.ssl == NULL:                           # closed under us
        pthread_mutex_unlock(&c.lock)
        qf_set_errno(EPIPE)
        return -1
    ERR_clear_error()
    if writing and c.unsent:
        r, c.unsent = c.unsent, 0         # the call again after EAGAIN: send the rest
    else:
        r = SSL_write(c.ssl, buf, want) if writing else SSL_read(c.ssl, buf, want)
    e = SSL_get_error(c.ssl, r) if r <= 0 else SSL_ERROR_NONE
    if e == SSL_ERROR_SSL:
        ERR_clear_error()
    if writing and r > 0 and c.wbio != NULL:
        # SSL_write returns after each record (partial writes): the rest of the slice
        # too, into the gathering BIO (an error is seen again by the next call)
        while r < want:
            more = SSL_write(c.ssl, <char *>buf + r, want - r)
            if more <= 0:
                ERR_clear_error()
                break
            r += more
    if r > 0 and c.wbio != NULL and (writing or BIO_wpending(c.wbio)):
        # the records out now, in one send() (a read may have written one too)
        if BIO_flush(c.wbio) <= 0:
            if not BIO_should_retry(c.wbio):
                pthread_mutex_unlock(&c.lock)
                qf_set_errno(EPIPE)
                return -1
            if writing:               # accepted: the same call again returns it
                c.unsent = r
                pthread_mutex_unlock(&c.lock)
                wait[0] = POLLOUT
                qf_set_errno(EAGAIN)
                return -1
    if not writing and r > 0:
        # the records read ahead already: as many as fit, without another system call —
        # unless a writer waits (a page request must not wait behind a bulk stream)
        while r < want and SSL_has_pending(c.ssl) and not qf_load_int(&c.waiting):
            more = SSL_read(c.ssl, <char *>buf + r, want - r)
            if more <= 0:
                ERR_clear_error()       # an error is seen again by the next call
                break
            r += more
    pthread_mutex_unlock(&c.lock)
    if r > 0:
        return r
    if e == SSL_ERROR_WANT_READ or e == SSL_ERROR_WANT_WRITE:
        wait[0] = POLLIN if e == SSL_ERROR_WANT_READ else POLLOUT
        qf_set_errno(EAGAIN)
        return -1
    if e == SSL_ERROR_ZERO_RETURN or (e == SSL_ERROR_SYSCALL and errno == 0 and not writing):
        return 0                    # closed (cleanly, or the socket ended)
    if e != SSL_ERROR_SYSCALL or errno == 0:
        qf_set_errno(EPROTO if e == SSL_ERROR_SSL else EPIPE)
    return -1


cdef ssize_t _conn_read(void *ctx, void *buf, size_t n, short *wait) noexcept nogil:
    return _conn_io(ctx, buf, n, wait, False)


cdef ssize_t _conn_write(void *ctx, void *buf, size_t n, short *wait) noexcept nogil:
    return _conn_io(ctx, buf, n, wait, True)


cdef int _wait_for(int fd, short events, uint64_t deadline_ns) noexcept nogil:
    """Wait until fd is ready for events or the deadline passes (-1, ETIMEDOUT)."""
    cdef pollfd p
    cdef uint64_t now = qf_now_ns()
    cdef int r
    if now >= deadline_ns:
        qf_set_errno(ETIMEDOUT)
        return -1
    p.fd = fd
    p.events = events
    p.revents = 0
    if deadline_ns - now > <uint64_t>INT_MAX * 1000000:
        r = poll(&p, 1, -1)                     # no deadline
    else:
        r = poll(&p, 1, <int>((deadline_ns - now) // 1000000) + 1)
    if r == 0:
        qf_set_errno(ETIMEDOUT)
        return -1
    return 0 if r > 0 or errno == 4 else -1      # 4: EINTR, try again


cdef class TLSConnection:
    """A TLS connection over a connected socket (made non-blocking).  ``handshake()``
    verifies the peer; then ``c_transport`` lets QEMUFiles read and write it without the
    GIL, one direction each (the stream and its return path)."""
    cdef Conn conn
    cdef Transport xport
    cdef readonly object sock
    cdef readonly bint server
    cdef readonly str peer_subject
    cdef readonly str version
    cdef readonly str cipher

    def __cinit__(self):
        cdef pthread_mutexattr_t attr
        self.conn.ssl = NULL
        self.conn.fd = -1
        self.conn.waiting = 0
        self.conn.wbio = NULL
        self.conn.unsent = 0
        pthread_mutexattr_init(&attr)
        pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP)   # spins briefly first
        # a real-time thread waiting for it (a page request) lends the holder (a bulk
        # stream) its priority: nothing else on the machine keeps the holder off a core
        pthread_mutexattr_setprotocol(&attr, PTHREAD_PRIO_INHERIT)
        pthread_mutex_init(&self.conn.lock, &attr)

    def __init__(self, TLSContext context not None, sock, *, hostname=None):
        """``hostname`` (client side): the name or address the server's certificate must
        be for (QEMU's tls-hostname; by default the host connected to)."""
        self.sock = sock
        self.server = context.server
        sock.setblocking(False)
        self.conn.fd = sock.fileno()
        self.conn.ssl = SSL_new(context.ctx)
        if self.conn.ssl == NULL or SSL_set_fd(self.conn.ssl, self.conn.fd) != 1:
            raise TLSError(EPROTO, f"SSL_new: {_openssl_errors()}")
        if context.server:
            SSL_set_accept_state(self.conn.ssl)
        else:
            SSL_set_connect_state(self.conn.ssl)
            if hostname:
                self._expect_peer(hostname)
        self.xport.ctx = &self.conn
        self.xport.read = _conn_read
        self.xport.write = _conn_write
        self.xport.fd = self.conn.fd

    cdef int _expect_peer(self, str hostname) except -1:
        name = hostname.strip("[]").encode()
        try:
            ipaddress.ip_address(hostname.strip("[]"))
            ok = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(self.conn.ssl), name) == 1
        except ValueError:
            ok = SSL_set1_host(self.conn.ssl, name) == 1
            SSL_set_tlsext_host_name(self.conn.ssl, name)
        if not ok:
            raise TLSError(EPROTO, f"cannot check the peer against {hostname!r}: "
                                   f"{_openssl_errors()}")
        return 0

    def handshake(self, double timeout):
        """Run the handshake within ``timeout`` seconds; the peer's certificate must
        chain to the CA (and, on a client, be for the expected host).  Raises TLSError
        saying why not."""
        cdef int r = 0, e = 0
        cdef long verify
        cdef uint64_t deadline = qf_now_ns() + <uint64_t>(timeout * 1e9)
        cdef int failed = 0
        with nogil:
            while True:
                ERR_clear_error()
                r = SSL_do_handshake(self.conn.ssl)
                if r == 1:
                    break
                e = SSL_get_error(self.conn.ssl, r)
                if e == SSL_ERROR_WANT_READ or e == SSL_ERROR_WANT_WRITE:
                    if _wait_for(self.conn.fd, POLLIN if e == SSL_ERROR_WANT_READ
                                 else POLLOUT, deadline) < 0:
                        failed = errno
                        break
                    continue
                failed = EPROTO
                break
        if failed:
            verify = SSL_get_verify_result(self.conn.ssl)
            why = _openssl_errors()
            if verify != X509_V_OK:
                why = f"the peer's certificate: {X509_verify_cert_error_string(verify).decode()}"
            elif failed == ETIMEDOUT:
                why = f"no handshake within {timeout:g} s"
            elif e == SSL_ERROR_SYSCALL or e == SSL_ERROR_ZERO_RETURN:
                why = "the peer closed the connection during the handshake"
            raise TLSError(failed, f"TLS handshake failed: {why}")
        self.peer_subject = self._subject()
        self.version = SSL_get_version(self.conn.ssl).decode()
        self.cipher = SSL_get_cipher_name(self.conn.ssl).decode()
        self._gather_writes()

    cdef void _gather_writes(self) noexcept:
        """From now on the records of one SSL_write leave in one send(): a buffering BIO
        in front of the socket's (OpenSSL keeps one of its own only for the handshake).
        Without the memory for it, each record is sent as it is made, as before."""
        cdef BIO *sock = SSL_get_wbio(self.conn.ssl)
        cdef BIO *gather = BIO_new(BIO_f_buffer())
        if gather == NULL or sock == NULL:
            return
        if BIO_set_write_buffer_size(gather, WRITE_BUFFER) <= 0:
            BIO_free(gather)
            return
        BIO_up_ref(sock)                        # the read side keeps its reference
        BIO_push(gather, sock)
        SSL_set0_wbio(self.conn.ssl, gather)    # owns the chain now
        self.conn.wbio = gather

    cdef str _subject(self):
        cdef X509 *cert = SSL_get1_peer_certificate(self.conn.ssl)
        cdef BIO *bio
        cdef char buf[1024]
        cdef int n
        if cert == NULL:
            return ""
        bio = BIO_new(BIO_s_mem())
        X509_NAME_print_ex(bio, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253)
        n = BIO_read(bio, buf, sizeof(buf) - 1)
        BIO_free(bio)
        X509_free(cert)
        return buf[:max(n, 0)].decode(errors="replace")

    def peek(self, Py_ssize_t n, double timeout):
        """The first ``n`` bytes the peer sends, left to be read again; fewer if it
        closes, TimeoutError if they do not come within ``timeout`` seconds."""
        cdef unsigned char buf[64]
        cdef int r = 0, e = 0, failed = 0
        cdef uint64_t deadline = qf_now_ns() + <uint64_t>(timeout * 1e9)
        if not 0 < n <= 64:
            raise ValueError("peek 1..64 bytes")
        with nogil:
            while True:
                pthread_mutex_lock(&self.conn.lock)
                ERR_clear_error()
                r = SSL_peek(self.conn.ssl, buf, <int>n)
                e = SSL_get_error(self.conn.ssl, r) if r <= 0 else SSL_ERROR_NONE
                pthread_mutex_unlock(&self.conn.lock)
                if r >= n or e == SSL_ERROR_ZERO_RETURN or e == SSL_ERROR_SYSCALL \
                        or e == SSL_ERROR_SSL:
                    break
                if _wait_for(self.conn.fd, POLLOUT if e == SSL_ERROR_WANT_WRITE else POLLIN,
                             deadline) < 0:
                    failed = errno
                    break
        if failed == ETIMEDOUT:
            raise TimeoutError(f"the peer sent nothing within {timeout:g} s")
        if failed:
            raise TLSError(failed, os.strerror(failed))
        return bytes(buf[:max(r, 0)])

    def readinto(self, buf):
        """Blocking read of up to len(buf) bytes (0: the peer closed); for Python
        channels (the core reads through c_transport)."""
        return self._blocking(buf, False)

    def write(self, buf):
        """Blocking write of some of ``buf``; returns how much."""
        return self._blocking(buf, True)

    cdef Py_ssize_t _blocking(self, buf, bint writing) except -1:
        cdef const unsigned char[::1] ro
        cdef unsigned char[::1] rw
        cdef void *p
        cdef size_t n
        cdef ssize_t r
        cdef short wait = 0
        cdef int failed = 0
        if writing:
            ro = memoryview(buf).cast("B")
            p, n = <void *>&ro[0] if len(ro) else NULL, len(ro)
        else:
            rw = memoryview(buf).cast("B")
            p, n = <void *>&rw[0] if len(rw) else NULL, len(rw)
        if n == 0:
            return 0
        with nogil:
            while True:
                r = _conn_io(&self.conn, p, n, &wait, writing)
                if r >= 0 or errno != EAGAIN:
                    failed = errno if r < 0 else 0
                    break
                if _wait_for(self.conn.fd, wait, <uint64_t>-1) < 0:
                    failed = errno
                    break
        if failed:
            raise TLSError(failed, f"TLS {'write' if writing else 'read'}: "
                                   f"{os.strerror(failed)}")
        if writing and r == 0:
            raise TLSError(EPIPE, "TLS write: the connection is closed")
        return r

    @property
    def c_transport(self):
        """The transport a QEMUFile uses to read and write this connection."""
        return PyCapsule_New(&self.xport, b"qfram.transport", NULL)

    def fileno(self):
        return self.conn.fd

    def shutdown(self):
        """Stop both directions now (a reader or writer blocked on it wakes); nothing
        to do once closed."""
        import socket
        if self.sock is None:
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self):
        if self.conn.ssl != NULL:
            pthread_mutex_lock(&self.conn.lock)
            SSL_free(self.conn.ssl)             # and the write BIOs
            self.conn.ssl = NULL
            self.conn.wbio = NULL
            pthread_mutex_unlock(&self.conn.lock)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.conn.fd = -1

    def __dealloc__(self):
        if self.conn.ssl != NULL:
            SSL_free(self.conn.ssl)
        pthread_mutex_destroy(&self.conn.lock)
