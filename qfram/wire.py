"""Every name of QEMU's migration wire format that qfram speaks, once.  The C loops see
the names in ``C_NAMES`` through ``qfram/includes/wire.pxd``, which setup.py generates
from this file (tests/test_wire.py checks the compiled values against it).

Sources: QEMU's migration/savevm.c (framing, commands), ram.c (page records),
migration.c (return path), qemu-file.h (RAM control hooks).  qfram's own extensions are
marked as such: QEMU never sees them unless qfram talks to qfram.
"""
from __future__ import annotations

import mmap
import struct

# -- pages -------------------------------------------------------------------------------

TARGET_PAGE_SIZE = 4096        # the guest's page (x86): the unit of RAM records and bitmaps
HOST_PAGE_SIZE = mmap.PAGESIZE  # this machine's page: the unit of madvise and userfaultfd

# -- savevm framing (savevm.c) -----------------------------------------------------------

QEVM_MAGIC = 0x5145564D        # "QEVM"
QEVM_VERSION = 3

SECTION_EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SECTION_SUBSECTION = 0x05
SECTION_VMDESCRIPTION = 0x06
SECTION_CONFIGURATION = 0x07
SECTION_COMMAND = 0x08
SECTION_FOOTER = 0x7E

SECTION_NAMES = {SECTION_EOF: "EOF", SECTION_START: "START", SECTION_PART: "PART",
                 SECTION_END: "END", SECTION_FULL: "FULL", SECTION_SUBSECTION: "SUBSECTION",
                 SECTION_VMDESCRIPTION: "VMDESCRIPTION",
                 SECTION_CONFIGURATION: "CONFIGURATION", SECTION_COMMAND: "COMMAND",
                 SECTION_FOOTER: "FOOTER"}

RAM_SECTION = "ram"            # the RAM section's idstr, instance 0
RAM_VERSION = 4                # ram.c's section version
RAM_SECTION_ID = 2             # the section id qfram gives it (QEMU's own streams vary)
DEFAULT_MACHINE = "pc-i440fx-7.2"

# -- RAM page records (ram.c): be64 offset | flags -----------------------------------------

RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200
RAM_SAVE_FLAG_QFRAM_CODEC = 0x800   # qfram extension: u8 codec, be32 length, data; QEMU
                                    # refuses it cleanly as an unknown flag
RAM_FLAG_NAMES = {RAM_SAVE_FLAG_ZERO: "ZERO", RAM_SAVE_FLAG_MEM_SIZE: "MEM_SIZE",
                  RAM_SAVE_FLAG_PAGE: "PAGE", RAM_SAVE_FLAG_EOS: "EOS",
                  RAM_SAVE_FLAG_CONTINUE: "CONTINUE", RAM_SAVE_FLAG_XBZRLE: "XBZRLE",
                  RAM_SAVE_FLAG_HOOK: "HOOK", RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
                  RAM_SAVE_FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH",
                  RAM_SAVE_FLAG_QFRAM_CODEC: "QFRAM_CODEC"}

CODEC_LZ4 = 1                  # QFRAM_CODEC payloads
CODECS = {"lz4": CODEC_LZ4}

# mapped-ram (QEMU 9.0+): after each block's MEM_SIZE entry
MAPPED_RAM_VERSION = 1
MAPPED_RAM_HEADER = struct.Struct(">IQQQ")     # version, page size, bitmap, pages offsets
MAPPED_RAM_ALIGN = 1 << 20                     # pages_offset: O_DIRECT-friendly

# -- RAM control hooks (qemu-file.h, RDMA's seams) ---------------------------------------------

RAM_CONTROL_SETUP = 0
RAM_CONTROL_ROUND = 1
RAM_CONTROL_HOOK = 2
RAM_CONTROL_FINISH = 3
RAM_CONTROL_BLOCK_REG = 4
RAM_SAVE_CONTROL_NOT_SUPP = -1000
RAM_SAVE_CONTROL_DELAYED = -2000

# -- commands in the main stream (savevm.c): 0x08, be16 cmd, be16 length, data ------------

CMD_OPEN_RETURN_PATH = 1
CMD_PING = 2
CMD_POSTCOPY_ADVISE = 3
CMD_POSTCOPY_LISTEN = 4
CMD_POSTCOPY_RUN = 5
CMD_POSTCOPY_RAM_DISCARD = 6
CMD_PACKAGED = 7
CMD_RECV_BITMAP = 10           # postcopy recovery: send me your received bitmap (name)
CMD_POSTCOPY_RESUME = 9        # postcopy recovery: go on (answered by RESUME_ACK)
CMD_QFRAM_CONFIRM = 0x7F01     # qfram extension: confirm what you placed (release-ram)
CMD_QFRAM_SESSION = 0x7F02     # qfram extension: this migration's 16-byte session token
CMD_QFRAM_RESUME = 0x7F03      # qfram extension: opens a resumed main channel (the token)

SESSION_TOKEN_BYTES = 16
RECV_BITMAP_ENDING = 0x0123456789ABCDEF   # ends a RECV_BITMAP on the return path

DISCARD_VERSION = 0            # RAM_DISCARD payload: u8 version, counted name, pairs

# -- the return path (migration.c): be16 type, be16 length, payload ------------------------

MIG_RP_MSG_SHUT = 1
MIG_RP_MSG_PONG = 2
MIG_RP_MSG_REQ_PAGES_ID = 3
MIG_RP_MSG_REQ_PAGES = 4
MIG_RP_MSG_RECV_BITMAP = 5
MIG_RP_MSG_RESUME_ACK = 6
MIG_RP_MSG_QFRAM_RECEIVED = 0x7F01   # qfram extension: u8 channel, be64 offset placed
RETURN_MESSAGE_NAMES = {MIG_RP_MSG_SHUT: "SHUT", MIG_RP_MSG_PONG: "PONG",
                        MIG_RP_MSG_REQ_PAGES_ID: "REQ_PAGES_ID",
                        MIG_RP_MSG_REQ_PAGES: "REQ_PAGES",
                        MIG_RP_MSG_RECV_BITMAP: "RECV_BITMAP",
                        MIG_RP_MSG_RESUME_ACK: "RESUME_ACK",
                        MIG_RP_MSG_QFRAM_RECEIVED: "QFRAM_RECEIVED"}

PREEMPT_MAGIC = b"QFRAMPRE"    # opens qfram's preempt channel (the main one opens QEVM),
                               # then the session token

# -- the host page server's frames (qfram.format.pageserver) ---------------------------------

PS_FRAME_BYTES = 16            # be: u8 op, u8 block, u16 text length, u32 first, u32 count,
                               # u32 flags; a text after FAIL and BYE
PS_OP_REQ = 1                  # client: make these chunks present in the cache
PS_OP_READY = 2                # server: they are
PS_OP_FAIL = 3                 # server: they cannot be (the text says why)
PS_OP_BYE = 4                  # server: going away (the text says why)
PS_FLAG_URGENT = 1             # REQ: a thread waits for them
PS_MAX_TEXT = 1024

# -- the core's flush points ----------------------------------------------------------------

# the seed (QEMU's qemu-file.c): 64 iovecs per writev, a 32 KiB buffer, release at once
SEED_IOV_MAX = 64
SEED_BUF_SIZE = 32768
SEED_RELEASE_MIN = 0
# qfram's defaults: the byte stream is identical, only flush points move.  1024 iovecs
# per writev nearly double loopback TCP and cut wake-ups on pipes; madvise costs ~2 us
# per call however small, so release is batched into runs of at least 2 MiB.
DEFAULT_IOV_MAX = 1024
DEFAULT_BUF_SIZE = 32768
DEFAULT_RELEASE_MIN = 2 * 1024 * 1024


# what the C loops use (generated into qfram/includes/wire.pxd as a cdef enum)
C_NAMES = ("RAM_SAVE_FLAG_ZERO", "RAM_SAVE_FLAG_MEM_SIZE", "RAM_SAVE_FLAG_PAGE",
           "RAM_SAVE_FLAG_EOS", "RAM_SAVE_FLAG_CONTINUE", "RAM_SAVE_FLAG_XBZRLE",
           "RAM_SAVE_FLAG_HOOK", "RAM_SAVE_FLAG_COMPRESS_PAGE", "RAM_SAVE_FLAG_MULTIFD_FLUSH",
           "SECTION_EOF", "SECTION_PART", "SECTION_END", "SECTION_COMMAND", "SECTION_FOOTER",
           "MIG_RP_MSG_REQ_PAGES_ID", "MIG_RP_MSG_REQ_PAGES", "TARGET_PAGE_SIZE",
           "PS_FRAME_BYTES", "PS_OP_REQ", "PS_OP_READY", "PS_OP_FAIL", "PS_OP_BYE",
           "PS_FLAG_URGENT", "PS_MAX_TEXT")


def flag_names(flags: int) -> str:
    """A record's flags in words, e.g. ``CONTINUE|PAGE``."""
    names = [name for bit, name in RAM_FLAG_NAMES.items() if flags & bit]
    rest = flags & ~sum(bit for bit in RAM_FLAG_NAMES if flags & bit)
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names) or "0"
