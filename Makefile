# The README's commands. Each target does its own set-up first (scripts/setup.sh is idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-fast demo bench clean

setup:
	@scripts/setup.sh

## make test: install what is missing, then run the whole CPU test suite
test: setup
	$(PY) -m pytest -q tests

## make demo: the embedded default end to end on the CPU (tiny model, synthetic videos)
demo: setup
	$(PY) scripts/demo.py --out demo

## make bench: the CPU benchmarks (tables printed, JSON under benchmarks/results/)
bench: setup
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/judge.py
	$(PY) benchmarks/judge_server.py

clean:
	rm -rf demo runs .pytest_cache
