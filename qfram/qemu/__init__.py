"""QEMU interoperability: its monitor (qmp), RAM and device state out of its streams
(extract), and resuming an unmodified QEMU from a snapshot as its postcopy source
(restore)."""
