"""Library messages that say nothing about a measurement, silenced where they start (not filtered from
the console afterwards), so a sweep prints its progress, its table and its paths only."""

from __future__ import annotations

import importlib
import logging
import sys

# `torch.utils.benchmark` (our timer) imports `torch.utils.cpp_extension`, which at import logs
# "No CUDA runtime is found, using CUDA_HOME=..." when torch is a CUDA build, a CUDA toolkit is
# installed and no GPU is visible. It concerns building C++ extensions, which nothing here does.
CPP_EXTENSION = "torch.utils.cpp_extension"


def import_cpp_extension_quietly() -> None:
    """Import `torch.utils.cpp_extension` once with its logger above WARNING; its level is restored."""
    if CPP_EXTENSION in sys.modules:
        return
    logger = logging.getLogger(CPP_EXTENSION)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        importlib.import_module(CPP_EXTENSION)
    finally:
        logger.setLevel(level)
