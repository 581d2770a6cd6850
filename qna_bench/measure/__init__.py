"""Measurements of one callable: latency, peak memory, FLOPs and parameters, each in its own module."""
