"""The lab: demo RAM, built-in workloads that touch memory the way guests do, and the
memory-footprint experiments.  Nothing below this floor imports it."""
