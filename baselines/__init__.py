"""Peer layers, one module per family, each wrapping its own library and registering itself."""

from baselines import conv  # noqa: F401
