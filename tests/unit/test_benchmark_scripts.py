"""The benchmark scripts that the project's docs and notes quote run end to end at a tiny size, so they
do not rot between the sessions that run them at full size (on this machine or a lent GPU)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


TINY_SHAPE = ("--device", "cpu", "--dtype", "float32", "--hidden", "64", "--layers", "8", "--intermediate", "128",
              "--heads", "4", "--kv-heads", "2", "--vocab", "300", "--samples", "4", "--seq-len", "16",
              "--batch-size", "2")


def test_real_scale_records_each_method_at_a_tiny_shape(tmp_path):
    out = tmp_path / "record.json"
    proc = run("benchmarks/real_scale.py", *TINY_SHAPE, "--methods", "replaceme_ls,shortgpt", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert [r["method"] for r in record["rows"]] == ["replaceme_ls", "shortgpt"]
    assert record["shape"]["layers"] == 8 and record["paper_ls_seconds"] == 689
    for row in record["rows"]:
        assert row["layers_removed"] == 2  # round(0.25 * 8)
        assert row["prune_s"] > 0 and row["bare_forward_s"] > 0
        assert abs(row["prune_over_forward"] - row["prune_s"] / row["bare_forward_s"]) < 1e-9
        assert set(row["stages_s"]) >= {"score", "select"}
        assert row["run"] == 0 and row["peak_gpu_bytes"] is None  # CPU: no GPU peak
        assert row["activations"]["strategy"] == "auto"
    ls_row = record["rows"][0]["activations"]
    # the fit reads activations: the tiny store fits in memory (auto), kept there with nothing to weigh
    assert ls_row["ran"] == "store" and ls_row["where"] == "memory" and record["activations_memory_gb"] == "auto"
    assert "| replaceme_ls | 2 |" in proc.stdout and "Not measured at this shape: " in proc.stdout

    # A second run in the same setting re-measures one method and keeps the other's row (and its run).
    first = {r["method"]: r for r in record["rows"]}
    proc = run("benchmarks/real_scale.py", *TINY_SHAPE, "--methods", "shortgpt", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads(out.read_text())
    assert len(merged["runs"]) == 2 and "--methods shortgpt" in merged["runs"][1]["command"]
    rows = {r["method"]: r for r in merged["rows"]}
    assert rows["replaceme_ls"] == first["replaceme_ls"]
    assert rows["shortgpt"]["run"] == 1 and rows["shortgpt"]["prune_s"] != first["shortgpt"]["prune_s"]


def test_real_scale_records_a_failed_method_and_goes_on_with_the_next(tmp_path):
    """A method that raises mid-prune (here MKA, which needs 51 sequences, given 4: raised in its select, after the
    model was built) is a row naming the error; the methods after it are still measured; the exit status says
    that something failed, and the rendered table and issue 29's verdicts name the failure."""
    from depthbench.benchmarks import real_scale

    out = tmp_path / "record.json"
    proc = run("benchmarks/real_scale.py", *TINY_SHAPE, "--methods", "shortgpt,mka,uidl", "--output", str(out))
    assert proc.returncode == 1 and "1 method(s) failed (their rows say why): mka" in proc.stderr
    assert "Traceback" in proc.stderr  # the cause, printed where it happened
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["shortgpt", "mka", "uidl"]
    assert rows["mka"]["error"].startswith("ConfigError: mka: calibration.n_samples=4; allowed: at least 51")
    assert rows["mka"]["out_of_memory"] is False and "prune_s" not in rows["mka"]
    assert rows["uidl"]["prune_s"] > 0 and rows["uidl"]["layers_removed"] == 2  # measured after the failure
    assert "| mka | | **failed** |" in proc.stdout and "| uidl | 2 |" in proc.stdout

    # on a GPU record at 8B shape, a failed method fails the targets it belongs to, and says why
    def row(method, **values):
        return {"method": method, "run": 0, "prune_over_forward": 1.1, "untrained_over_forward": 1.1,
                "peak_gpu_bytes": 20 * 2**30, **values}

    oom = "OutOfMemoryError: CUDA out of memory. Tried to allocate 28.00 GiB"
    from depthbench.pruners import pruner_registry

    record = {"runs": [{"device": "NVIDIA H100 80GB HBM3"}], "shape": real_scale.SHAPES["llama3_8b"],
              "activations_memory_gb": "auto",
              "rows": [row(m) for m in pruner_registry.names() if m not in ("uidl", "shortened_taylor")]
              + [{"method": m, "run": 0, "error": oom, "out_of_memory": True, "peak_gpu_bytes": 60 * 2**30}
                 for m in ("uidl", "shortened_taylor")]}
    single, trained, memory = real_scale.issue_29_verdicts(record)
    assert not single[2] and "failed: uidl (OutOfMemoryError" in single[1] and "replaceme_ls 1.10x" in single[1]
    assert trained[2]  # neither trained method failed
    assert not memory[2] and "shortened_taylor (OutOfMemoryError" in memory[1] and "not measured" not in memory[1]
    assert "largest" in memory[1] and "20.0 GiB" in memory[1]  # the failed methods' partial peaks are not counted


def test_the_prepared_gpu_run_measures_every_method_at_a_tiny_shape(tmp_path):
    """benchmarks/gpu_issue29.sh, both phases, on this CPU at a tiny shape: one record with a row for every
    registered method, the trained ones with their training time, and auto's decision."""
    import os

    from depthbench.pruners import pruner_registry

    env = {**os.environ, "RECORDS": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "SHAPE": " ".join(TINY_SHAPE[:-6] + ("--samples", "64", "--seq-len", "16", "--batch-size", "8"))}
    for phase in ("targets", "search"):
        proc = subprocess.run(["bash", "benchmarks/gpu_issue29.sh", phase], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "real_scale.json").read_text())
    rows = {r["method"]: r for r in record["rows"]}
    assert sorted(rows) == sorted(pruner_registry.names()) and len(record["runs"]) == 2
    for method in ("replaceme_cosine", "llm_streamline"):
        assert 0 < rows[method]["training_s"] < rows[method]["prune_s"]
    assert "training_s" not in rows["replaceme_ls"]
    assert json.loads((tmp_path / "strategy_decision.json").read_text())["decision"]["strategy"] == "auto"
    proc = subprocess.run(["bash", "benchmarks/gpu_issue29.sh", "everything"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "unknown phase 'everything'; allowed: targets, search" in proc.stderr


def test_strategy_decision_records_the_first_batch_decision(tmp_path):
    out = tmp_path / "decision.json"
    proc = run("benchmarks/strategy_decision.py", *TINY_SHAPE, "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    decision = record["decision"]
    assert record["shape"]["layers"] == 8 and decision["strategy"] == "auto" and decision["later_fits"] == 1
    assert decision["ran"] in ("store", "recompute")
    assert decision["measured"]["forward_batch_share"] == 0.5  # 2 batches of 2 x 16 tokens, the second timed
    assert decision["measured"]["write_bytes"] == 17 * 2 * 16 * 64 * 4  # the first batch: 2L + 1 points, float32
    assert decision["page_cache_probe"]["bytes"] >= 64 << 20
    estimate = decision["estimated_s"]
    assert (estimate["store"] < estimate["recompute"]) == (decision["ran"] == "store")
    assert not list(tmp_path.glob("*activations*")), "no store kept"


def test_real_scale_starts_a_new_record_when_the_setting_changes(tmp_path):
    from depthbench.benchmarks import real_scale

    out = tmp_path / "record.json"
    setting = {"shape": {"layers": 8}, "dtype": "float32", "samples": 4, "seq_len": 16, "ratio": 0.25,
               "activations_gb": 0.0}
    old = {**setting, "paper_ls_seconds": 689, "runs": [{"command": "a"}],
           "rows": [{"method": "uidl", "run": 0}, {"method": "sleb", "run": 0}]}
    out.write_text(json.dumps(old))
    same = real_scale.merged_record(out, setting, {"command": "b"}, ["sleb"])
    assert same["rows"] == [{"method": "uidl", "run": 0}] and [r["command"] for r in same["runs"]] == ["a", "b"]
    other = real_scale.merged_record(out, {**setting, "ratio": 0.5}, {"command": "c"}, ["sleb"])
    assert other["rows"] == [] and other["runs"] == [{"command": "c"}] and other["ratio"] == 0.5


def test_real_scale_bounds_a_greedy_search_by_a_method_option_and_records_its_evaluations(tmp_path):
    """BlockPruner with budget=count, n_modules=2 on 8 layers: 16 sub-block candidates scored at the first step,
    15 at the second (31 masked evaluations); the options and the count are in the row and the table."""
    out = tmp_path / "record.json"
    proc = run("benchmarks/real_scale.py", *TINY_SHAPE, "--methods", "blockpruner", "--option",
               "blockpruner.budget=count", "--option", "blockpruner.n_modules=2", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    [row] = json.loads(out.read_text())["rows"]
    assert row["options"] == {"budget": "count", "n_modules": "2"} and row["evaluations"] == 16 + 15
    assert "| blockpruner (budget=count, n_modules=2), 31 evaluations (" in proc.stdout


@pytest.mark.parametrize("option, message", [
    ("blockpruner.n_modules", "--option 'blockpruner.n_modules'; allowed: METHOD.KEY=VALUE"),
    ("sleb.score_samples=2", "names 'sleb', not one of --methods: blockpruner"),
    ("blockpruner.n_module=2", "unknown option(s) n_module for pruner 'blockpruner'"),
])
def test_real_scale_refuses_a_bad_method_option_before_building_anything(option, message):
    proc = run("benchmarks/real_scale.py", "--device", "cpu", "--methods", "blockpruner", "--option", option)
    assert proc.returncode == 2 and message in proc.stderr


def test_real_scale_quotes_the_paper_time_only_beside_the_same_calibration_volume():
    from depthbench.benchmarks import real_scale

    ls = {"prune_s": 26.9}
    small = " ".join(real_scale.paper_comparison({"paper_ls_seconds": 689, "samples": 128, "seq_len": 256}, ls))
    # conf/scale/paper.yaml's ReplaceMe-LS volume, 8000 x 1024, against 128 x 256 = 32768 tokens: 250x
    assert "8,000 x 1,024 = 8,192,000 tokens" in small and "250x more than this record's 32,768" in small
    assert "689" not in small and "not quoted" in small
    same = " ".join(real_scale.paper_comparison({"paper_ls_seconds": 689, "samples": 8000, "seq_len": 1024}, ls))
    assert "689 s" in same and "the same volume" in same and "not quoted" not in same


def test_real_scale_subtracts_each_trained_block_and_judges_issue_29_on_gpu_rows_only():
    from depthbench.benchmarks import real_scale

    # ReplaceMe-cosine with two blocks: one training time per fit, both subtracted
    assert real_scale.training_seconds({"blocks": [{"training_seconds": 1.5}, {"training_seconds": 2.0}]}) == 3.5
    assert real_scale.training_seconds({"training_seconds": 4.0, "convergence": {}}) == 4.0
    assert real_scale.training_seconds(None) == 0.0
    shape = real_scale.SHAPES["llama3_8b"]

    def row(method, ratio, untrained=None, peak=10):
        return {"method": method, "prune_over_forward": ratio, "peak_gpu_bytes": peak * 2**30, "run": 0,
                **({"untrained_over_forward": untrained} if untrained is not None else {})}

    gpu = {"runs": [{"device": "NVIDIA H100 80GB HBM3"}], "shape": shape, "activations_memory_gb": "auto",
           "rows": [row(m, 1.2) for m in real_scale.SINGLE_PASS] + [row("replaceme_cosine", 9.0, 1.4),
                                                                     row("llm_streamline", 3.0, 1.6)]}
    single, trained, memory = real_scale.issue_29_verdicts(gpu)
    assert single[2] and "replaceme_ls 1.20x" in single[1]
    assert not trained[2] and "llm_streamline 1.60x" in trained[1] and "replaceme_cosine 1.40x" in trained[1]
    assert not memory[2] and "not measured: " in memory[1] and "sleb" in memory[1]  # methods without a row
    # the same rows measured on a CPU, or before the store moved to device memory, judge nothing
    for record in ({**gpu, "runs": [{"device": "cpu (2 threads)"}]},
                   {k: v for k, v in gpu.items() if k != "activations_memory_gb"}):
        assert not any(ok for _, _, ok in real_scale.issue_29_verdicts(record))


def test_real_scale_names_an_unknown_method_before_building_anything():
    proc = run("benchmarks/real_scale.py", "--device", "cpu", "--methods", "replaceme_lsq")
    assert proc.returncode == 2
    assert "unknown pruner 'replaceme_lsq'; available: " in proc.stderr and "replaceme_ls," in proc.stderr


def test_spill_reads_measures_both_ways_of_reading_at_a_small_size(tmp_path):
    """benchmarks/spill_reads.py at 2% of its rows: every shape and mode gets a cell, each in its own process (the
    two reads are compared there), and the ratios are those of the cells."""
    from depthbench.benchmarks import spill_reads

    out = tmp_path / "spill_reads.json"
    proc = run("benchmarks/spill_reads.py", "--reads", "2", "--rows-factor", "0.02", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    cells = {(c["shape"], c["mode"]): c for c in record["cells"]}
    assert set(cells) == {(s, m) for s in spill_reads.SHAPES for m in spill_reads.MODES}
    for shape, ratios in record["ratios"].items():
        whole, pieces = cells[shape, "whole"], cells[shape, "pieces"]
        assert whole["rows"] == round(spill_reads.SHAPES[shape][0] * 0.02)
        assert ratios["time_pieces_over_whole"] == pieces["ms_per_read"] / whole["ms_per_read"]
    assert "## Reading spilled training rows" in "\n".join(spill_reads.render_record(record, []))


def test_chunk_faults_times_each_configuration_in_its_own_process(tmp_path):
    """benchmarks/chunk_faults.py's kernels part at a small vocabulary: each configuration's cell ran (in its own
    process) with the chunk size and allocator settings it names, and the ratios are those of the cells."""
    from depthbench.benchmarks import chunk_faults

    out = tmp_path / "chunk_faults.json"
    proc = run("benchmarks/chunk_faults.py", "--skip-prune", "--vocabulary", "512", "--repeats", "1", "--output",
               str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    kernels = record["results"]["kernels"]
    assert set(kernels) == set(chunk_faults.CONFIGS) and record["same_selection"] is None
    for kernel, cell in kernels["now"].items():
        assert cell["ms"] > 0 and record["ratios"][f"{kernel}_before_over_now"] == kernels["before"][kernel]["ms"] / \
            cell["ms"]
    assert "## Page faults in candidate scoring" in "\n".join(chunk_faults.render_record(record, []))


def test_load_pruned_benchmark_compares_two_loads_of_the_same_weights():
    """The script itself stops if the two ways load different parameters."""
    proc = run("benchmarks/load_pruned.py", "--hidden", "128", "--layers", "2", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "load_pruned / straightforward: time" in proc.stdout


def test_demo_report_reads_its_numbers_from_the_sweep(tmp_path):
    """docs/DEMO.md's separation sentence: the KLs and standard errors of the records, and the paired test over
    windows recomputed here from the records' per-window sums (one pair: Holm's p is the raw p)."""
    import time

    from depthbench.evaluation import stats
    from depthbench.experiments import leaderboard
    from tests.unit.test_leaderboard_seeds import _record
    from tests.unit.test_ranking import _per_window

    started = time.time() - 1
    sweep = tmp_path / "sweep"
    windows = {}
    for i, (method, kl, se) in enumerate((("replaceme_ls", 1.20, 0.03), ("uidl", 1.50, 0.04))):
        record = _record(method, method=method)
        record["model"]["dtype"] = "float32"
        windows[method] = _per_window(kl, seed=i)
        record["metrics"]["fidelity"] = {"kl_mean": kl, "kl_stderr": se, "top1_agreement_percent": 60.0 - i,
                                         "per_window": windows[method]}
        record["wall_seconds"] = 30.0 + i
        record["stages"] = {"prune.score": {"seconds": 1.25}, "prune.select": {"seconds": 0.5 + i},
                            "evaluate_pruned": {"seconds": 20.0}}
        (sweep / str(i)).mkdir(parents=True)
        (sweep / str(i) / "result.json").write_text(json.dumps(record))
    leaderboard.write_leaderboard(leaderboard.build_frame(leaderboard.load_records([sweep])), sweep)
    out = tmp_path / "docs" / "DEMO.md"
    out.parent.mkdir()
    (out.parent / "demo").mkdir()
    (out.parent / "demo" / "retired_plot.png").write_bytes(b"a plot an older version drew")
    proc = run("benchmarks/demo_report.py", "--sweep", str(sweep), "--started", str(started), "--seconds", "90",
               "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    test = stats.values_test(stats.window_values(windows["replaceme_ls"], "kl"),
                             stats.window_values(windows["uidl"], "kl"))
    assert "replaceme_ls 1.200 +- 0.030, uidl 1.500 +- 0.040" in text
    assert f"replaceme_ls is better by {abs(test['difference']):.3f}, p = {test['p_value']:.2g}, Holm-adjusted " \
           f"p = {test['p_value']:.2g}: **significant**; ranks 1 and 2" in text
    assert "it ran 2 of the 2 cells" in text and "1.5 min" in text
    assert (out.parent / "demo" / "kl_vs_compression.png").is_file()
    assert not (out.parent / "demo" / "retired_plot.png").exists()  # a plot no longer drawn is not kept
    # the time table: prune = the prune.* stages, slowest cell first
    ratio = f"{_record('x')['ratio']:g}"
    seed = _record("x").get("seed", 0)
    assert f"| uidl | {ratio} | {seed} | 2.8 | 31.0 |\n| replaceme_ls | {ratio} | {seed} | 1.8 | 30.0 |" in text
    assert "Sum of the cells' wall times: 1.0 min" in text
    # the budgets table, from the records' pruning.budget
    budget = _record("x")["pruning"].get("budget") or {}
    assert f"| uidl | {budget.get('calibration_tokens', 0):,} |" in text


def test_performance_page_renders_every_committed_record(tmp_path):
    """docs/PERFORMANCE.md is rendered from the records in docs/ (a rerun of one part keeps the others' sections);
    each section's numbers are read from its record."""
    out = tmp_path / "PERFORMANCE.md"
    proc = run("benchmarks/performance.py", "--render-only", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    sleb = json.loads((REPO / "docs" / "sleb_cost.json").read_text())
    assert "## SLEB: one selection" in text and f"**{sleb['sleb_over_evaluations_x_masked_pass']:.2f}x**" in text
    cold = REPO / "docs" / "cold_single_run.json"
    if cold.is_file():
        record = json.loads(cold.read_text())
        assert f"**{record['default_over_recompute']:.2f}x**" in text
    real = REPO / "docs" / "real_scale.json"
    if real.is_file():
        record = json.loads(real.read_text())
        assert "## Every method at real scale" in text
        for row in record["rows"]:  # each measured method's row, its time read from the record; a failed one's error
            assert (f"| {row['method']} | | **failed** |" if "error" in row else
                    f"| {row['method']} | {row['layers_removed']} | {row['prune_s']:.1f} |") in text
    decision = REPO / "docs" / "strategy_decision.json"
    if decision.is_file():
        record = json.loads(decision.read_text())["decision"]
        assert "## The store-or-recompute decision" in text and f"| decision | **{record['ran']}** |" in text
        assert f"| second batch's forward | {record['measured']['second_forward_s']:.2f} s |" in text
    taylor = REPO / "docs" / "taylor_memory.json"
    if taylor.is_file():
        record = json.loads(taylor.read_text())
        # the 8B bound: the GPU peak of the float64 path less the buffer's shrink, 8 - 4 bytes a decoder parameter
        bound = (record["old_gpu_peak"]["bytes"] - 4 * record["llama3_8b"]["float32"]["decoder_parameters"]) / 2**30
        assert f"**at most {bound:.1f} GiB**" in text and "**Not re-measured on a GPU**" in text
    faults = REPO / "docs" / "chunk_faults.json"
    if faults.is_file():
        record = json.loads(faults.read_text())
        for kernel in record["results"]["kernels"]["now"]:
            assert f"**{record['ratios'][f'{kernel}_before_over_now']:.2f}x** |" in text
    spill = REPO / "docs" / "spill_reads.json"
    if spill.is_file():
        record = json.loads(spill.read_text())
        for shape, ratios in record["ratios"].items():
            assert f"({ratios['peak_growth_pieces_over_file']:.2f}x) |" in text and f"| {shape} |" in text
    layerwise = REPO / "docs" / "layerwise_memory.json"
    if layerwise.is_file():
        record = json.loads(layerwise.read_text())
        for method, row in record["methods"].items():  # each method's peak, read from the record
            assert f" | **{row['peak_rss_fraction_of_checkpoint']:.3f}** | {row['prune_seconds']:.1f} s |" in text
            assert f"| {method}" in text


def test_text_page_is_the_render_of_its_committed_record(tmp_path):
    """docs/TEXT.md is what benchmarks/default_text.py renders from docs/text.json, and the record's counts agree
    with each other (sets, splits, and the default budgets it says fit)."""
    out = tmp_path / "TEXT.md"
    proc = run("benchmarks/default_text.py", "--render", "docs/text.json", "--markdown", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_text() == (REPO / "docs" / "TEXT.md").read_text()
    record = json.loads((REPO / "docs" / "text.json").read_text())
    sets, splits, d = record["sets"], record["splits"], record["defaults"]
    assert sum(s["documents"] for s in sets.values()) == sum(s["documents"] for s in splits.values())
    assert sum(s["tokens"] for s in sets.values()) == sum(s["tokens"] for s in splits.values())
    assert splits["calibration"]["full_length_documents"] >= d["calibration_sequences"]
    assert splits["heldout"]["packed_windows"] >= d["heldout_windows"]
    h = d["healing"]
    assert splits["calibration"]["packed_windows"] * record["seq_len"] >= h["steps"] * h["batch_size"] * h["seq_len"]
    assert all(o["rows_sharing_a_13gram"] == 0 for o in record["benchmark_overlap"].values())


def test_the_newcomer_path_times_what_the_guides_say_and_the_guide_quotes_its_record():
    """benchmarks/newcomer_path.py runs the commands README.md and docs/PLUGINS.md give (less the .venv/bin/ prefix
    their "activate" makes unnecessary), and docs/PLUGINS.md quotes docs/newcomer_path.json's seconds."""
    from depthbench.benchmarks import newcomer_path

    guides = (REPO / "README.md").read_text() + (REPO / "docs" / "PLUGINS.md").read_text()
    for _, command in newcomer_path.STEPS:
        assert command.replace(".venv/bin/", "").replace(" -q", "") in guides, command
    record = json.loads((REPO / "docs" / "newcomer_path.json").read_text())
    steps = {row["step"]: row["seconds"] for row in record["steps"]}
    assert list(steps) == [name for name, _ in newcomer_path.STEPS]
    assert abs(sum(steps.values()) - record["total_seconds"]) < 0.2 and record["within_goal"]
    plugins = (REPO / "docs" / "PLUGINS.md").read_text()
    quoted = (f"took {record['total_seconds']:.0f} s: install {steps['install']:.0f} s, "
              f"first run {steps['first_run']:.0f} s")
    assert quoted in plugins
