#!/usr/bin/env bash
# Issue 29's GPU figures, prepared to run on a lent GPU machine (one H100 or H200; no internet, no model
# weights; its Python has torch and transformers but not omegaconf): every method at Llama-3-8B shape in
# bfloat16 (benchmarks/real_scale.py -> real_scale.json) and auto's store-or-recompute decision there
# (benchmarks/strategy_decision.py -> strategy_decision.json).
#
#   bash benchmarks/gpu_issue29.sh targets   # issue 29's methods first, then the cheap rest (about 5 minutes)
#   bash benchmarks/gpu_issue29.sh search    # the methods that re-score the model per candidate (bounded)
#
# Records go to $RECORDS (default: $OUT where set, else docs/). The two phases write the same real_scale.json
# (rows merge when the setting is the same): copy the first phase's record into docs/ before the second, or
# point RECORDS at the same folder. Then, on the development machine, `benchmarks/performance.py --render-only`
# renders docs/PERFORMANCE.md, whose target table judges issue 29 from the rows.
#
# Before the machine starts (where the package registry is reachable), fetch the two wheels it lacks into
# .whl/ (git-ignored through .git/info/exclude; they travel with the working tree when named to be carried):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
# (antlr4-python3-runtime has no wheel: download its sdist with --no-binary=:all: instead; it is pure Python.)
# A dry run on a CPU at a tiny shape (what tests/unit/test_benchmark_scripts.py runs): PYTHON=.venv/bin/python
# SHAPE="--device cpu --dtype float32 --hidden 64 --layers 8 --intermediate 128 --heads 4 --kv-heads 2 --vocab 300
# --samples 64 --seq-len 16 --batch-size 8" (MKA needs at least 51 sequences).
set -euo pipefail
phase=${1:-targets}
records=${RECORDS:-${OUT:-docs}}
shape=${SHAPE:---device cuda --dtype bfloat16 --shape llama3_8b}
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade --target /tmp/site .whl/*
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$python" -c "import depthbench.benchmarks" 2>/dev/null; then
    "$python" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

case "$phase" in
targets)
    # the single-pass methods, then the trained ones, then Shortened-Taylor's memory, then the rest that
    # costs a few passes; each row is written as soon as it is measured. A method that fails (out of memory, say)
    # is a row naming its error and the run goes on; so does the strategy decision after a failed method.
    status=0
    # shellcheck disable=SC2086
    "$python" benchmarks/real_scale.py $shape --output "$records/real_scale.json" --methods \
        replaceme_ls,uidl,shortgpt,llm_drop,linearpatch,replaceme_cosine,llm_streamline,shortened_taylor,last_layers,random_layers,laco,shortened_ppl \
        || status=$?
    # shellcheck disable=SC2086
    "$python" benchmarks/strategy_decision.py $shape --output "$records/strategy_decision.json" || status=$?
    exit "$status"
    ;;
search)
    # greedy searches bounded to fit one command: BlockPruner 4 removal steps; FinerCut and SLEB at their
    # defaults (their scoring subsets); MKA last
    # shellcheck disable=SC2086
    "$python" benchmarks/real_scale.py $shape --output "$records/real_scale.json" --methods blockpruner,sleb,finercut,mka \
        --option blockpruner.budget=count --option blockpruner.n_modules=4
    ;;
*)
    echo "gpu_issue29.sh: unknown phase '$phase'; allowed: targets, search" >&2
    exit 2
    ;;
esac
