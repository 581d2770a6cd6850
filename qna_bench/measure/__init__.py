"""Measurements of one callable: latency, peak memory, FLOPs and parameters, each in its own module."""

from qna_bench.quiet import import_cpp_extension_quietly

# Before any module here imports torch.utils.benchmark, which imports cpp_extension (see qna_bench.quiet).
import_cpp_extension_quietly()
