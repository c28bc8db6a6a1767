# Entry points: `make demo` (train + evaluate on the synthetic dataset), `make test`
# and `make lint`. Each creates or updates the virtualenv in $(VENV) itself.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=

.PHONY: demo test lint venv venv-test clean-venv

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

# Stamps are re-made when pyproject.toml changes, so a pull that adds a
# dependency installs it on the next make.
$(VENV)/.stamp-run: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.stamp-run
venv-test: $(VENV)/.stamp-test

demo: venv
	$(PY) -m musp_jax.demo --workdir $(WORKDIR)

test: venv-test
	$(PY) -m pytest $(PYTEST_ARGS)

# The linter's rules (pyproject.toml [tool.ruff.lint]) find defects, not style.
lint: venv-test
	$(PY) -m ruff check musp_jax configs tfds_builders scripts tests

clean-venv:
	rm -rf $(VENV)
