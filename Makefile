# The two commands of README.md. Both set up .venv first (a no-op when it is ready).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test pytest lint

setup:
	bash scripts/setup_env.sh

run: setup
	$(VENV)/bin/megatron-vgpo train examples/tiny_cpu.yaml

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests
	$(VENV)/bin/ruff check megatron_vgpo tools tests benchmarks

lint: setup
	$(VENV)/bin/ruff check megatron_vgpo tools tests benchmarks
