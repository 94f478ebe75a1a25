# The README's two commands: `make demo` and `make test`. Each creates .venv and installs the pins itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test figures clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.test: requirements.txt requirements-test.txt $(VENV)/.runtime
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) hedge_toy.py
	$(PY) last_iterate.py
	$(PY) sppo_toy.py

# Every committed figure, from the commands that make them (the README names each one).
figures: demo

test: $(VENV)/.test
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache runs
