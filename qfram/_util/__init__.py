"""Small helpers every floor may use: latency percentiles, scheduling hints, text."""
