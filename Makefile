PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

$(STAMP): setup.cfg pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,cohort]"
	touch $(STAMP)

install: $(STAMP)

# --dist load: a test whose worker dies (a native crash) is reported once by name and the
# rest of the suite still runs; PYTHONFAULTHANDLER also covers the tests' child processes.
test: $(STAMP)
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -n 2 --dist load tests

demo: $(STAMP)
	$(BIN)/cellnet demo --out runs/demo

clean:
	rm -rf $(VENV) build *.egg-info
