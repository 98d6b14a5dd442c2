"""Benchmarks: event latency, event throughput, watch scale and the data path (``notifyfs bench``)."""
