"""Cost per model of the gold-solution bits-per-byte tasks (benchmark=reasoning_bpb) on the embedded SmolLM2.

Two parts, both written to ``docs/reasoning_bpb_cost.json`` (``--output``):

- ``plan`` (no model forward, seconds): for every gold-solution task, over ALL its documents, the tokens
  lm-eval's forward pass reads per document (prompt + solution, SmolLM2's tokenizer) and the bytes of the
  solution; the tokens a model scores at conf/benchmark/reasoning_bpb.yaml's limit follow from them.
- ``timing`` (``--time``): the dense SmolLM2-135M-Instruct (model.dtype=auto) evaluated through
  `evaluate_benchmark` on ``--limit`` documents of each task (the seeded sample the benchmark draws), with
  wall and CPU seconds, the tokens of exactly those documents, tokens per second, and the seconds per model
  extrapolated (tokens of the default limit / measured tokens per second; stated as an extrapolation); one
  entry per model dtype (``--dtype``), kept across runs.

    .venv/bin/python benchmarks/reasoning_bpb_cost.py                      # plan only
    .venv/bin/python benchmarks/reasoning_bpb_cost.py --time --limit 8 --threads 2                   # bfloat16 (auto)
    .venv/bin/python benchmarks/reasoning_bpb_cost.py --time --limit 8 --threads 2 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from depthbench import atomic
from depthbench.evaluation import gold_bpb

REPO = Path(__file__).resolve().parents[1]


def _bench(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "benchmark" / f"{name}.yaml"), resolve=True)


def document_tokens(name: str, tokenizer) -> tuple[list[int], list[int]]:
    """Per document (in doc_id order): tokens of prompt + solution, and UTF-8 bytes of the solution."""
    rows = gold_bpb.read_rows(gold_bpb.request_file(gold_bpb.gold_task(name)))
    ids = tokenizer([r["context"] + r["continuation"] for r in rows], add_special_tokens=False)["input_ids"]
    return [len(x) for x in ids], [len(r["continuation"].encode("utf-8")) for r in rows]


def default_sample(name: str, limit, n: int) -> list[int]:
    """The documents the benchmark scores at ``limit`` (evaluation/sampling.py, the benchmark's default seed)."""
    from depthbench.evaluation.sampling import DEFAULT_SAMPLING, DEFAULT_SEED, sample_indices

    ids, _ = sample_indices(range(n), limit, DEFAULT_SAMPLING, DEFAULT_SEED)
    return ids


def plan(tokenizer) -> dict:
    bench = _bench("reasoning_bpb")
    rows = {}
    for name in gold_bpb.GOLD_TASKS:
        tokens, sizes = document_tokens(name, tokenizer)
        chosen = default_sample(name, bench["limit"], len(tokens))
        rows[name] = {"documents": len(tokens), "tokens_per_document": sum(tokens) / len(tokens),
                      "max_tokens": max(tokens), "solution_bytes_per_document": sum(sizes) / len(sizes),
                      "tokens_all_documents": sum(tokens),
                      "tokens_at_default_limit": sum(tokens[i] for i in chosen)}
        print(name, rows[name], flush=True)
    return {"default_limit": bench["limit"], "tasks": rows,
            "tokens_per_model_at_default_limit": sum(r["tokens_at_default_limit"] for r in rows.values()),
            "tokens_per_model_all_documents": sum(r["tokens_all_documents"] for r in rows.values())}


def timing(loaded, limit: int, cache_dir: Path, planned: dict) -> dict:
    from depthbench.evaluation.lm_eval_runner import evaluate_benchmark

    out = {}
    batch_size = _bench("reasoning_bpb")["batch_size"]
    for name in gold_bpb.GOLD_TASKS:
        bench = {"name": "cost", "offline": True, "limit": limit, "batch_size": batch_size,
                 "tasks": [{"name": name, "metric": gold_bpb.METRIC}]}
        wall, cpu = time.perf_counter(), time.process_time()
        result = evaluate_benchmark(loaded.model, loaded.tokenizer, bench, cache_dir, progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        row = result["lower_is_better_tasks"][name]
        tokens, _ = document_tokens(name, loaded.tokenizer)
        scored = sum(tokens[i] for i in row["samples"]["doc_id"])
        per_second = scored / wall
        out[name] = {"documents": row["n_samples"], "bits_per_byte": row["value"], "stderr": row["stderr"],
                     "tokens": scored, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                     "tokens_per_second": round(per_second, 1),
                     "extrapolated_seconds_at_default_limit": round(
                         planned["tasks"][name]["tokens_at_default_limit"] / per_second)}
        print(name, out[name], flush=True)
    total = sum(r["extrapolated_seconds_at_default_limit"] for r in out.values())
    return {"limit": limit, "batch_size": batch_size, "tasks": out,
            "extrapolated_seconds_per_model_at_default_limit": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "reasoning_bpb_cost.json")
    parser.add_argument("--time", action="store_true", help="also time the dense model on --limit documents")
    parser.add_argument("--limit", type=int, default=6, help="documents per task for the timing")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default=None, help="model.dtype for the timing (default: the model config's)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from depthbench.config_store import register_configs
    from depthbench.modeling.loading import default_cache_dir, load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=["progress=false"] + ([f"model.dtype={args.dtype}"] if args.dtype else []))
    record = json.loads(args.output.read_text()) if args.output.is_file() else {}
    record["environment"] = {"model": "smollm2-135m-instruct", "torch_threads": torch.get_num_threads(),
                             "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                             "offline_data": gold_bpb.data_version()}
    record["plan"] = plan(load_tokenizer(cfg.model))
    atomic.write_json(args.output, record)
    if args.time:
        loaded = load_model(cfg.model, device="cpu")
        dtype = str(loaded.model.dtype).removeprefix("torch.")
        record.setdefault("timing", {})[dtype] = timing(loaded, args.limit, args.cache_dir or default_cache_dir(),
                                                        record["plan"])
        atomic.write_json(args.output, record)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
