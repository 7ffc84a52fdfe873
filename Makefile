# Two entry points for a fresh Linux machine with Python 3.11:
#   make demo   create .venv, install lorafarm, render the demo jobs on tiny built-in models
#   make test   create .venv, install lorafarm with test extras, run the test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch is pinned only where no NVIDIA GPU is present; on a GPU machine
# pip resolves the loose `torch>=` requirement from pyproject.toml to a CUDA build.
TORCH_CPU := torch==2.13.0
DEMO_DIR  ?= demo

.PHONY: demo test venv lint clean bench reliability browser

# The example family package (examples/lorafarm-sd15) is installed the way a third-party
# plugin is: tests render its Stable Diffusion 1.5 checkpoints.
$(BIN)/.installed: pyproject.toml examples/lorafarm-sd15/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no NVIDIA GPU: installing the CPU build ($(TORCH_CPU))"; \
		$(BIN)/pip install --quiet $(TORCH_CPU); \
	fi
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet -e examples/lorafarm-sd15
	touch $@

venv: $(BIN)/.installed

demo: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/lorafarm demo --dir $(DEMO_DIR)

# The browser test drives Debian's headless Chromium (installed here if missing).
browser:
	bash scripts/install-browser.sh

test: venv browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider

# Figures, not tests: each prints throughput ratios and timings.
bench: venv
	OMP_NUM_THREADS=1 $(BIN)/python bench/lora_switch.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/scheduler.py

# Regenerates docs/RELIABILITY.md from a fresh kill-and-restart and fuzzing run.
reliability: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m tests.support.reliability_report --trials 20 --fuzz 2000 --fuzz-parsers 4000

lint: venv
	$(BIN)/ruff check daemon families plugins tests bench examples

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
