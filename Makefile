# The README's commands. Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The project's test photos, when they are beside the checkout: the benchmark's figures are measured
# with them. Without them `imgembed bench` generates photo-sized JPEGs.
PHOTOS := ../shared/testdata/photos

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints-dev.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# mypy checks the package as it is installed: the folders mapped into it (pyproject.toml's
# package-dir) are linked into one tree under build/typecheck first.
TYPECHECK := build/typecheck

lint: $(STAMP)
	$(BIN)/ruff check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/imgembed
	$(BIN)/python -c "import pathlib, tomllib; root = pathlib.Path.cwd(); tree = pathlib.Path('$(TYPECHECK)');\
	mapped = tomllib.loads((root / 'pyproject.toml').read_text())['tool']['setuptools']['package-dir'];\
	[(tree / 'imgembed' / entry.name).symlink_to(entry) for entry in (root / 'imgembed').iterdir()];\
	[(tree / package.replace('.', '/')).symlink_to(root / folder) for package, folder in mapped.items() if package != 'imgembed']"
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p imgembed

# The tests wait on services more than they compute: two processes, each with its own embedded
# PostgreSQL, halve the time on two cores. A file's tests run in one process (module fixtures).
TEST_PROCESSES ?= 2

test: lint
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile tests

demo: $(STAMP)
	$(BIN)/imgembed demo

bench: $(STAMP)
	$(BIN)/imgembed bench $(if $(wildcard $(PHOTOS)/*.JPEG),--photos $(PHOTOS))

clean:
	rm -rf $(VENV) .pytest_cache build dist
