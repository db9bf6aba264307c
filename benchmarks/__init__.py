"""Measurement studies: scripts that time, size or check the code on real models and write their records to
docs/*.json (rendered into docs/PERFORMANCE.md and the other result pages).

Not the ``benchmark=`` config group (conf/benchmark/: the lm-eval tasks a run evaluates): these measure the
project itself (speed, memory, cost per method, faithfulness to the papers). Installed as ``depthbench.benchmarks``
so the studies import each other and tests import them without path edits; each still runs as a script,
``python benchmarks/<study>.py ...`` (as docs and the Makefile show), or as ``python -m depthbench.benchmarks.<study>``.
"""
