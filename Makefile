# Quick start: `make demo` (export + generate on the bundled demo model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= out/demo
# torch comes from pip's configured index (on this project's machines: a local CPU wheel). On a
# plain Linux box `pip install torch` pulls the multi-GB CUDA build; for the CPU one run
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip install -qq --disable-pip-version-check

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing torch, llada-export and its test / plot / serve extras into $(VENV) ..."
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
	$(PIP) -e ".[test,plot,serve]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m llada_export.demo --workdir $(DEMO_DIR)

# loadfile: a test module runs on one worker, so module fixtures (the serving tests' Ray cluster) are
# made once
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf build out .pytest_cache
