"""`python -m qna_bench.report RESULTS.parquet [--out DIR]`: write the claims report."""

from qna_bench.report.document import main

main()
