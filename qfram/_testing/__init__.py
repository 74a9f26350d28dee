"""What the tests and benchmarks drive qfram's counterparts with (not part of qfram's API):
a real QEMU over QMP."""
