# ESP's two commands: `make demo` (set up, run the whole path locally) and `make test`.
# Everything installs into .venv from setup.cfg, pinned by constraints.txt.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg constraints.txt 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: install demo test lint docs clean help

help:
	@echo "make demo     set up, then run ESP end to end locally (emulator, model server, worker)"
	@echo "make test     set up, then run the test suite (starts the services it needs)"
	@echo "make docs     regenerate the README's configuration table"

install: $(STAMP)

$(STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/esp demo

test: install
	$(BIN)/pytest

docs: install
	$(BIN)/esp config --update-readme README.md

clean:
	rm -rf $(VENV) .pytest_cache
