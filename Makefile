# Quick start: `make demo` (set up, then embed the sample text) and `make test` (set up, then run every test).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_MODEL := .models/instructor-base-random
DEMO_OUT := demo-output
# The shared real text where this checkout has it; on a user's machine, this project's own README.
DEMO_DATA := $(wildcard ../shared/data/climate_fever_evidence.jsonl)
DEMO_INPUT := $(if $(DEMO_DATA),$(DEMO_DATA) --input-format jsonl,README.md --input-format text)

# Without CUDA, install the CPU build of torch first and pin it: an unpinned torch pulls a multi-GB CUDA build.
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda),cuda)
TORCH := torch
CONSTRAINTS :=
else
TORCH := torch==2.13.0
CONSTRAINTS := -c constraints-cpu.txt
endif

# The test install: the framework extras and Ray too, so that tests/test_integrations.py and tests/test_ray.py run
# against the real frameworks (the frameworks: about 80 packages, 400 MB, 40 s to install here; Ray: 20 packages,
# 300 MB, 25 s). Without them those tests skip, saying why.
EXTRAS := dev,onnx,server,bench,langchain,llamaindex,chroma,haystack,ray

.PHONY: setup demo test bench lint clean

setup: $(VENV)/.installed

# --no-build-isolation: setup.py builds the native CPU ops (csrc/, CMakeLists.txt) against the torch installed first;
# an isolated build would fetch a torch of its own. cmake and ninja come from PyPI; a C++17 compiler from the system
# (without one the install still succeeds, with a one-line notice, and the PyTorch fallback runs).
$(VENV)/.installed: pyproject.toml constraints-cpu.txt setup.py CMakeLists.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH) "setuptools>=70.1" wheel cmake ninja
	$(PIP) install --quiet --no-build-isolation $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

$(DEMO_MODEL)/modules.json: | $(VENV)/.installed
	$(PY) -m fastinstructor make-test-model --preset base --out $(DEMO_MODEL)

demo: $(VENV)/.installed $(DEMO_MODEL)/modules.json
	$(PY) -m fastinstructor embed --model $(DEMO_MODEL) --instruction "Represent the Wikipedia document for retrieval:" \
		--input $(DEMO_INPUT) --limit 500 --on-error skip --output $(DEMO_OUT) --overwrite

# Two processes, each given whole modules (--dist loadfile: a module's session fixtures, such as its ONNX exports,
# are made once): the suite is mostly single-threaded (the Triton interpreter, subprocesses), and took 25 min in one
# process on a 2-core AMD EPYC, 19 min in two (12-14 min since the slowest tests were trimmed, 13-15 min since cpu int8
# runs there too). The 15 slowest tests are listed at the end: where to look when the suite grows slow.
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile --durations=15

bench: $(VENV)/.installed $(DEMO_MODEL)/modules.json
	$(PY) -m fastinstructor bench --model $(DEMO_MODEL)

lint: $(VENV)/.installed
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .models $(DEMO_OUT) build dist *.egg-info fastinstructor/_native*
