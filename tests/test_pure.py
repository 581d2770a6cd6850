"""The pure side (analysis, labels, text) imports without torch, and its formatters read as the report expects."""

import subprocess
import sys

from qna_bench.text import MIB, milliseconds, shape_label


def test_the_analysis_and_the_results_side_import_without_torch():
    """The analysis, the results file, the report, the figures and compare read parquet: none loads torch."""
    code = ("import sys, qna_bench.analysis, qna_bench.labels, qna_bench.text, qna_bench.results, "
            "qna_bench.report, qna_bench.plots, qna_bench.compare; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_shape_label_names_batch_size_channels_and_heads():
    shape = {"batch": 8, "height": 64, "width": 32, "channels": 96, "heads": 4}
    assert shape_label(shape) == "B=8, 64×32, C=96, 4 heads"
    assert shape_label(shape, batch=False) == "64×32, C=96, 4 heads"


def test_milliseconds_and_mib_read_as_the_console_prints_them():
    assert milliseconds(0.00123) == "1.23 ms"
    assert MIB == 1024 * 1024
