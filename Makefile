# Thin, self-bootstrapping wrappers. `make repro` runs the embedded default pipeline; `make test` the tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(abspath $(VENV))/bin
MIRROR ?= $(wildcard ../shared/datasets)
export PATH := $(BIN):$(PATH)

.PHONY: repro test data lab clean

# Python's default, writing bytecode on first import, is restored for everything run from here: where the
# environment sets PYTHONDONTWRITEBYTECODE, every stage would otherwise recompile torch (+20-30% per stage).
# Compiling only what gets imported costs ~20 s once; compiling the whole venv at install (uv
# --compile-bytecode) cost 43 s. .dvcignore keeps the __pycache__ folders out of DVC's dependency hashes.
unexport PYTHONDONTWRITEBYTECODE

# uv installs the locked set in ~6 s where pip takes ~120 s; pip (same lock) is the fallback. uv reads no pip
# config, so pip's find-links (a local torch wheel on some machines) are passed on.
$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c requirements.lock uv
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/uv pip install -q \
		$(foreach d,$(PIP_FIND_LINKS),--find-links $(d)) -c requirements.lock -e '.[dev]' \
		|| $(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	touch $@

data: $(VENV)/.installed
	$(PY) -m saferegions.data fetch $(if $(MIRROR),--mirror $(MIRROR))
	dvc commit -f -q data.dvc

# After the pipeline, README's generated blocks (timings, findings) are rewritten from results/ (tests check them).
repro: data
	dvc repro
	$(PY) -m saferegions.readme
	@echo "Done. Start reading at results/report/notebook.html; 'dvc metrics show' lists every number."

test: $(VENV)/.installed
	$(PY) -m pytest -q

lab: $(VENV)/.installed
	jupyter lab

clean:
	rm -rf artifacts .pytest_cache
