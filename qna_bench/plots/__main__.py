"""`python -m qna_bench.plots RESULTS.parquet [--out DIR] [--every-layer]`: draw the figures."""

from qna_bench.plots.drawing import main

main()
