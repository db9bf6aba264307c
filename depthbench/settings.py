"""The typed settings of every config group: one dataclass per kind of entry, each field with its type and help.

`depthbench.config_store` stores each as ``schema/<group>/<kind>``, and every YAML entry of the group starts from
one (``defaults: [/schema/<group>/<kind>@_here_, _self_]``), so Hydra itself refuses an unknown key or a value of
the wrong type when it composes (a typo in a preset, ``evaluation.fidelity.top_k=abc`` on the command line),
before any code runs. The pruner options are typed the same way by each method's ``Options``
(`depthbench.pruners.options`), the healing modes by `depthbench.healing.settings`.

One default per setting: a field's default here is the only one (no YAML repeats it, no code falls back to its
own), except fields declared ``MISSING`` (``???``), whose values every YAML entry gives itself (a benchmark's tasks,
a model's reference). ``Number`` (int or float) keeps a YAML integer an integer, so that a resolved config and
its hash (`depthbench.experiments.resume.config_hash`) are what they were before the settings were typed.
Checks that a type cannot express (ranges, one of a few strings) stay with the code that reads the setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional, Union

from omegaconf import MISSING

from depthbench.evaluation.sampling import DEFAULT_SAMPLING, DEFAULT_SEED

Number = Union[int, float]


def setting(default: Any, help: str) -> Any:  # noqa: A002 - the natural name, as argparse's
    """A field with its documentation (``depthbench --help``); a list or dict default is copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ---------------------------------------------------------------------------------------------- calibration
@dataclass
class CalibrationSizes:
    """What every calibration entry shares: the sample's size and shape."""

    source: str = setting(MISSING, "Text source: reading_passages, bigbench_wikipedia, local, hub (or a plugin's).")
    n_samples: int = setting(128, "Sequences drawn (more than the text holds: an error naming the maximum).")
    seq_len: int = setting(256, "Tokens per sequence (longer documents are truncated).")
    batch_size: int = setting(8, "Sequences per forward pass.")
    seed: int = setting("${seed}", "The draw of the sequences (follows the run's seed).")
    packing: bool = setting(False, "false: one document per sequence, padded (ReplaceMe reference); true: packed "
                                   "windows of the concatenated text.")
    full_length: bool = setting(False, "Per-document mode: true draws only documents of at least seq_len tokens.")


@dataclass
class HashSplitCalibration(CalibrationSizes):
    """``source: reading_passages | bigbench_wikipedia``: documents split by a hash into calibration and held-out."""

    heldout_percent: int = setting(20, "Percent of the documents held out (never calibrated on), 1..99.")


@dataclass
class LocalText:
    """A text file of the user's."""

    path: str = setting(MISSING, "A .txt (documents separated by blank lines), .jsonl or .parquet file.")
    text_field: str = setting("text", "The column / JSON key holding the text (.jsonl, .parquet).")


@dataclass
class LocalCalibration(CalibrationSizes, LocalText):
    """``source: local``: calibrate on the user's own file."""


@dataclass
class HubText:
    """A Hugging Face Hub dataset (needs internet)."""

    path: str = setting(MISSING, "Dataset id on the Hub.")
    name: Optional[str] = setting(None, "Dataset configuration name.")
    split: str = setting("train", "Split the calibration text comes from.")
    heldout_split: Optional[str] = setting(None, "Split the held-out text comes from (null: none).")
    text_field: str = setting("text", "Column holding the text.")
    streaming: bool = setting(False, "Stream the dataset instead of downloading it whole.")
    max_documents: int = setting(20000, "Read at most this many non-empty documents.")
    chat: bool = setting(False, "Documents are conversations rendered with the model's chat template.")


@dataclass
class HubCalibration(CalibrationSizes, HubText):
    """``source: hub``: calibrate on a Hub dataset."""


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class HeldoutWindows:
    """Held-out perplexity windows: fixed-length, non-overlapping, of the packed held-out text."""

    source: str = setting(MISSING, "Text source of the held-out text (as calibration.source).")
    split: str = setting("heldout", "Which part of the source: heldout (never seen by calibration).")
    seq_len: int = setting(256, "Tokens per window.")
    max_windows: int = setting(64, "At most this many windows (fewer when the text holds fewer).")
    batch_size: int = setting(8, "Windows per forward pass.")


@dataclass
class HashSplitHeldout(HeldoutWindows):
    heldout_percent: int = setting("${oc.select:calibration.heldout_percent,20}",
                                   "Percent held out by hash; the calibration's, so the two parts never overlap.")


@dataclass
class LocalHeldout(HeldoutWindows, LocalText):
    where: str = setting("evaluation", "The group named in error messages.")


@dataclass
class HubHeldout(HeldoutWindows, HubText):
    pass


@dataclass
class FidelitySettings:
    """Fidelity of the pruned model to the dense one on the held-out windows (`depthbench.evaluation.fidelity`)."""

    enabled: bool = setting(True, "Measure KL, top-1 agreement and change in p(correct token).")
    top_k: int = setting(64, "Dense log-probs stored per token (8k + 12 bytes per token), cached per model x text.")


@dataclass
class HashSplitEvaluation:
    """``evaluation=default``: the held-out part of a hash-split source."""

    perplexity: HashSplitHeldout = field(default_factory=HashSplitHeldout)
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)


@dataclass
class LocalEvaluation(LocalText):
    """``evaluation=local``: every document of the user's file is held-out text."""

    perplexity: LocalHeldout = field(default_factory=LocalHeldout)
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)


@dataclass
class HubEvaluation:
    """``evaluation=wikitext2`` and other Hub held-out text."""

    perplexity: HubHeldout = field(default_factory=HubHeldout)
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)


# ---------------------------------------------------------------------------------------------- benchmark
@dataclass
class BenchmarkSettings:
    """An lm-eval suite (`depthbench.evaluation.lm_eval_runner`)."""

    name: str = setting(MISSING, "The suite's name, recorded with its scores.")
    offline: bool = setting(False, "true: every task reads local data; false: lm-eval's Hub datasets.")
    limit: Optional[Number] = setting(None, "Examples per task: null = all; N = a seeded sample of N; "
                                            "0 < x < 1 = a fraction.")
    batch_size: int = setting(8, "Requests per forward pass (a task may set its own).")
    # entries {name, num_fewshot, metric, limit, batch_size}: a task's limit, when given, replaces benchmark.limit
    # (null = all), so an absent key and null differ and the entries stay plain (checked by parse_benchmark)
    tasks: List[Any] = setting(MISSING, "Tasks: {name, num_fewshot (0), metric (acc), limit, batch_size}.")
    limit_sampling: str = setting(DEFAULT_SAMPLING, "How limit picks examples: stratified (seeded, by source) or "
                                                "first (lm-eval's --limit).")
    sample_seed: int = setting(DEFAULT_SEED, "Seed of the stratified sample (the same examples for every model).")


# ---------------------------------------------------------------------------------------------- model
@dataclass
class GgufSettings:
    package: str = setting(MISSING, "PyPI package shipping the GGUF file.")
    file: str = setting(MISSING, "The GGUF file inside the package.")
    name: Optional[str] = setting(None, "Name of runs on this GGUF (when model.name and name_or_path are null).")


@dataclass
class ModelSettings:
    """The model pruned (`depthbench.modeling.loading`)."""

    name: Optional[str] = setting(None, "Name recorded with results (null: the Hub id, the directory's name or the "
                                        "GGUF's name).")
    name_or_path: Optional[str] = setting(None, "Hub id or local save_pretrained directory (null: the GGUF).")
    revision: Optional[str] = setting(None, "Hub revision.")
    gguf: Optional[GgufSettings] = setting(None, "A packaged GGUF, converted once to a transformers model.")
    dtype: str = setting("auto", "auto (bfloat16 where native, float16 on older GPUs, float32 on CPUs without "
                                 "bfloat16 kernels), float32, bfloat16 or float16.")
    device_map: Optional[Any] = setting(None, "transformers device_map (auto: shard over the GPUs); null: `device`.")
    layerwise: bool = setting(False, "Prune a model larger than memory: read config.json, build the model without "
                                     "weights, read one decoder layer at a time from the checkpoint's safetensors "
                                     "shards for the calibration passes and save the pruned model shard by shard. A "
                                     "local safetensors directory (model=hf model.name_or_path=DIR); single-pass "
                                     "methods only (replaceme_ls, uidl, shortgpt); needs evaluate=false (docs/USAGE.md "
                                     "'Models larger than memory').")
    layerwise_buffer_gb: float = setting(1.0, "Layer-wise only: GiB of memory for the carried residual stream and "
                                            "captured activations before they spill to files in the temp dir.")


# ---------------------------------------------------------------------------------------------- logger, paths
@dataclass
class NoLogger:
    """``logger=none``: result.json only."""

    name: str = setting("none", "Tracker.")


@dataclass
class WandbLogger:
    """``logger=wandb``: Weights & Biases (offline by default: no account needed)."""

    name: str = setting("wandb", "Tracker.")
    project: str = setting("depthbench", "W&B project.")
    entity: Optional[str] = setting(None, "W&B entity (null: the account's default).")
    mode: str = setting("offline", "offline (written under <run dir>/wandb/, `wandb sync` later), online, disabled.")
    group: Optional[str] = setting(None, "Run group (null: the sweep directory's name, or single).")
    tags: List[str] = setting([], "Run tags.")


@dataclass
class PathsSettings:
    """Every path depthbench reads or writes (`depthbench.paths`)."""

    cache_dir: Optional[str] = setting(None, "User cache (null: $DEPTHBENCH_CACHE, else ~/.cache/depthbench).")
    output_dir: str = setting("outputs", "Runs land in <output_dir>/runs/<time>, sweeps in <output_dir>/sweeps/.")


def group_schemas() -> dict[str, dict[str, Any]]:
    """``{group: {kind: schema}}`` as stored under ``schema/<group>/<kind>``."""
    from depthbench.healing.settings import LoraSettings, NoHealing, PartialLayerSettings

    return {
        "calibration": {"hash_split": HashSplitCalibration, "local": LocalCalibration, "hub": HubCalibration},
        "evaluation": {"hash_split": HashSplitEvaluation, "local": LocalEvaluation, "hub": HubEvaluation},
        "benchmark": {"lm_eval": BenchmarkSettings},
        "model": {"model": ModelSettings},
        "logger": {"none": NoLogger, "wandb": WandbLogger},
        "paths": {"paths": PathsSettings},
        "healing": {"none": NoHealing, "lora": LoraSettings, "partial_layers": PartialLayerSettings},
    }


def field_names(schema) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]



def declared_defaults(schema) -> dict[str, Any]:
    """The fields of ``schema`` that have a default (not ``MISSING``), with it: what a Python caller's plain dict
    is completed with, so that code never keeps a fallback of its own."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING and f.default != MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


#: Settings that the typed schemas added to every composed config, with the value that reproduces the behaviour
#: of configs composed before they existed (the code's former fallback). A config at that value hashes as one
#: without the key (`depthbench.experiments.resume.config_hash`), so earlier sweeps resume and caches keyed on
#: the benchmark stay valid.
ADDED_WITH_FORMER_DEFAULT = {("benchmark", "limit_sampling"): DEFAULT_SAMPLING,
                             ("benchmark", "sample_seed"): DEFAULT_SEED}


def without_added_defaults(data: dict, prefix: tuple[str, ...] = ()) -> dict:
    """``data`` (a resolved config, or its node at ``prefix``) without the `ADDED_WITH_FORMER_DEFAULT` keys that
    hold their former default."""
    out = dict(data)
    for path, value in ADDED_WITH_FORMER_DEFAULT.items():
        if path[:len(prefix)] != prefix:
            continue
        rest, node = path[len(prefix):], out
        parents = []
        for key in rest[:-1]:
            if not isinstance(node.get(key), dict):
                break
            parents.append((node, key))
            node[key] = dict(node[key])
            node = node[key]
        else:
            if rest[-1] in node and node[rest[-1]] == value and type(node[rest[-1]]) is type(value):
                del node[rest[-1]]
    return out
