# The two set-up commands of the README, each creating the environment when it is missing.
#   make bench [ARGS="layers=[qna,conv_dw] windows=[3,5,7]"]   the default benchmark (parquet + figures)
#   make test  [ARGS="-k qna"]                                the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: bench test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/python run_bench.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n auto --dist loadgroup --durations=15 $(ARGS)
