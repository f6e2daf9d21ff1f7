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

# --dist worksteal: a test whose worker dies (a native crash) is reported once by name and the
# rest of the suite still runs (the scope-grouping schedulers re-send the crashing test to every
# new worker), and an idle worker takes tests queued on the busy one, so long tests do not end
# the run alone; PYTHONFAULTHANDLER also covers the tests' child processes.
test: $(STAMP)
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -n 2 --dist worksteal tests

demo: $(STAMP)
	$(BIN)/cellnet demo --out runs/demo

clean:
	rm -rf $(VENV) build *.egg-info
