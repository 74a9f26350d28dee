"""qfram: move guest RAM through file descriptors at memory speed.

``import qfram`` gives the core's :class:`QEMUFile` (Cython; the pure-Python twin only
with ``QFRAM_PURE_PYTHON=1``) and the entry points that open one over an fd, a socket,
memory, or any Python object.
"""
from qfram.backend import DEFAULT_PARAMS, PURE_PYTHON, SEED_PARAMS, QEMUFile, is_zero
from qfram.io.channel import (
    BufferChannel,
    FdChannel,
    ObjectChannel,
    SocketChannel,
    buffer_file,
    fdopen,
    object_file,
    socket_file,
)
from qfram.errors import FormatError, QFramError, StreamEnded
from qfram.wire import (
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
)

__version__ = "0.1.0"

__all__ = [
    "QEMUFile", "fdopen", "socket_file", "buffer_file", "object_file",
    "FdChannel", "SocketChannel", "BufferChannel", "ObjectChannel",
    "QFramError", "FormatError", "StreamEnded", "is_zero",
    "SEED_PARAMS", "DEFAULT_PARAMS", "PURE_PYTHON",
    "RAM_SAVE_FLAG_ZERO", "RAM_SAVE_FLAG_MEM_SIZE", "RAM_SAVE_FLAG_PAGE", "RAM_SAVE_FLAG_EOS",
    "RAM_SAVE_FLAG_CONTINUE", "RAM_SAVE_FLAG_XBZRLE", "RAM_SAVE_FLAG_HOOK",
    "RAM_SAVE_FLAG_COMPRESS_PAGE", "RAM_SAVE_FLAG_MULTIFD_FLUSH",
]
