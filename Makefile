# Two commands on a fresh machine:  `make run` (the main job) and `make test`.
# Each creates .venv and installs dcd into it when missing. Under CI (CI=true) torch is pinned
# through constraints/ci.txt to the CPU build; users get whatever torch pip picks for them.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
ifeq ($(CI),true)
CONSTRAINTS := -c constraints/ci.txt
endif

.PHONY: setup run test test-fast clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e '.[test]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/dcd run $(ARGS)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
