"""``python -m qna_bench.compare BASE NEW``: see `qna_bench.compare.cli`."""

import sys

from qna_bench.compare.cli import main

sys.exit(main())
