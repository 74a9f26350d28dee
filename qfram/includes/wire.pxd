# The names of QEMU's wire format the C loops use: the same values as qfram/wire.py
# (tests/test_wire.py checks that the two agree).

cdef enum:
    # RAM page records (ram.c): be64 offset | flags
    RAM_SAVE_FLAG_ZERO = 0x02
    RAM_SAVE_FLAG_MEM_SIZE = 0x04
    RAM_SAVE_FLAG_PAGE = 0x08
    RAM_SAVE_FLAG_EOS = 0x10
    RAM_SAVE_FLAG_CONTINUE = 0x20
    RAM_SAVE_FLAG_XBZRLE = 0x40
    RAM_SAVE_FLAG_HOOK = 0x80
    RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
    RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200
    # savevm framing (savevm.c)
    SECTION_EOF = 0x00
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_COMMAND = 0x08
    SECTION_FOOTER = 0x7E
    # the return path (migration.c)
    MIG_RP_MSG_REQ_PAGES_ID = 3
    MIG_RP_MSG_REQ_PAGES = 4
    # pages
    TARGET_PAGE_SIZE = 4096
