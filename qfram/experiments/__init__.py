"""Experiments about qfram, apart from the library: the memory-footprint harness."""
