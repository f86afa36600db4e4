# The two commands of the README. Both create or reuse .venv (scripts/setup.sh).
VENV ?= .venv
# pytest-xdist workers (one torch thread each): the CI machine's two cores
JOBS ?= 2
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/lcpass demo

test: setup
	$(VENV)/bin/python -m pytest -q -ra --durations=25 -n $(JOBS) --dist worksteal tests
