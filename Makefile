# Every target creates .venv if needed; torch is pinned to the CPU build available offline.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH := torch==2.13.0

.PHONY: demo test bench bench-quick clean

$(VENV)/.ok-%: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH) -e '.[$*]'
	touch $@

demo: $(VENV)/.ok-demo
	$(VENV)/bin/tallstore demo --out demo-output

test: $(VENV)/.ok-test
	$(PY) -m pytest -q tests

bench: $(VENV)/.ok-bench
	$(PY) -m benchmarks.run

bench-quick: $(VENV)/.ok-bench
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf $(VENV) demo-output .pytest_cache
