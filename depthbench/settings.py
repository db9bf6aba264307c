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


# ---------------------------------------------------------------------------------------------- run level
@dataclass(frozen=True)
class CacheSettings:
    """``cache``: the shared caches, keyed by content hashes and checksummed: calibration statistics (computed once
    per model x calibration data, reused by every method and ratio) and the base model's evaluation (once per model
    x benchmark). Parsed and range-checked once, before any weights are read (`from_config`)."""

    dir: Optional[str] = setting(None, "Cache folder: null = <sweep dir>/.cache for sweeps, else paths.cache_dir "
                                       "($DEPTHBENCH_CACHE, default ~/.cache/depthbench).")
    statistics: bool = setting(True, "Cache calibration statistics (shared by every method and ratio).")
    base_results: bool = setting(True, "Cache the base model's evaluation (shared by every cell of a sweep).")
    activations_gb: Union[int, float, str] = setting(
        "auto", "Disk space (GiB) for every layer's activations on the calibration data, stored by the first pass so "
                "that fits need no second forward pass: auto = half the free space of the store's file system, at "
                "least 4 GiB unless that exceeds 90% of it; a number = GiB; 0 = never store. Above it, fits run "
                "their own pass.")
    activations_memory_gb: Union[int, float, str] = setting(
        "auto", "Memory (GiB) on the model's device for a single run's activations (not a sweep's: its store is "
                "shared on disk): a store that fits is kept in memory, with no copy, write or read back; what it "
                "leaves holds a method's training rows (ReplaceMe-cosine, LLM-Streamline; a sweep's too), else they "
                "go to files; auto = half the memory available on the device when the prune starts; a number = GiB; "
                "0 = never in memory.")
    lock_stale_s: Number = setting(300, "Cells running at once share the caches through lock directories with a "
                                        "heartbeat; a lock silent this many seconds (a killed job) is taken over. "
                                        "Must exceed the hosts' clock skew and the NFS attribute cache time.")
    keep_activations: bool = setting(False, "Keep a sweep's stored activations when its multirun ends (a killed "
                                            "sweep keeps them for its resume; an explicit cache.dir is never cleaned).")
    activation_strategy: str = setting(
        "auto", "Whether the first pass stores those activations: store (within the budget); recompute (never: a fit "
                "runs its own forward pass); auto (decided on the first calibration batch from its measured forward "
                "time against the store's measured write and read throughput; result.json's "
                "calibration.activations says which ran and why; calibration/strategy.py).")

    @classmethod
    def from_config(cls, node) -> "CacheSettings":
        """The typed settings of a composed ``cache`` node (or a plain dict: missing keys take the declared
        defaults), ranges checked; `ConfigError` naming the value and what is allowed."""
        from omegaconf import DictConfig, OmegaConf

        from depthbench.calibration.strategy import STRATEGIES
        from depthbench.errors import ConfigError

        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        unknown = sorted(set(values) - set(field_names(cls)))
        if unknown:
            raise ConfigError(f"cache: unknown keys {unknown}; allowed: {', '.join(field_names(cls))}")
        values = {**declared_defaults(cls), **values}
        gb = values["activations_gb"]
        if gb != "auto" and (isinstance(gb, bool) or not isinstance(gb, (int, float)) or not 0 <= gb < float("inf")):
            raise ConfigError(f"cache.activations_gb={gb!r}; allowed: auto, or a number of GiB >= 0 (0 = do not "
                              f"store activations)")
        memory = values["activations_memory_gb"]
        if memory != "auto" and (isinstance(memory, bool) or not isinstance(memory, (int, float))
                                 or not 0 <= memory < float("inf")):
            raise ConfigError(f"cache.activations_memory_gb={memory!r}; allowed: auto, or a number of GiB >= 0 (0 = "
                              f"never keep activations in memory)")
        stale = values["lock_stale_s"]
        if isinstance(stale, bool) or not isinstance(stale, (int, float)) or not 0 < stale < float("inf"):
            raise ConfigError(f"cache.lock_stale_s={stale!r}; allowed: a number of seconds > 0")
        for key in ("statistics", "base_results", "keep_activations"):
            if not isinstance(values[key], bool):
                raise ConfigError(f"cache.{key}={values[key]!r}; allowed: true, false")
        if values["activation_strategy"] not in STRATEGIES:
            raise ConfigError(f"cache.activation_strategy={values['activation_strategy']!r}; allowed: "
                              f"{', '.join(STRATEGIES)}")
        return cls(**{**values, "lock_stale_s": float(stale)})

    def activation_budget(self, store_dir=None) -> int:
        """The disk space (bytes) one model's stored calibration activations may take: 0 = never store them;
        ``auto`` = `depthbench.calibration.activations.auto_budget` of the file system of ``store_dir`` (default:
        the temporary directory single runs use)."""
        import tempfile

        from depthbench.calibration.activations import auto_budget

        if self.activations_gb == "auto":
            return auto_budget(store_dir if store_dir is not None else tempfile.gettempdir())
        return int(self.activations_gb * 1024**3)


@dataclass
class EfficiencySettings:
    """``efficiency``: speed of the base and the pruned model, measured in the same process with the same settings,
    timed interleaved (base, pruned, pruned, base, ...): one speed-up ratio per round, until the 95% interval of the
    speed-up is narrower than ``rel_width`` for prefill and decode, or ``max_rounds`` or ``budget_s`` is reached.
    Needs a copy of the dense model in memory (metrics.speed.dense_copy_bytes); the analytic FLOPs ratio is
    reported beside it (`depthbench.evaluation.efficiency`)."""

    enabled: bool = setting(True, "Measure the speed-up (false: skip; no dense copy kept for it).")
    prompt_len: int = setting(256, "Prefill: tokens per prompt, one forward pass.")
    new_tokens: int = setting(32, "Decode: greedy single-token steps from the KV cache.")
    batch_size: int = setting(1, "Prompts per timed pass.")
    repeats: int = setting(3, "Minimum rounds (one round = base and pruned once each), after a warm-up.")
    max_rounds: int = setting(40, "At most this many rounds.")
    rel_width: float = setting(0.05, "Stop when the speed-up interval's hi / lo - 1 is at most this.")
    budget_s: Number = setting(30, "Or when this many seconds of timing have passed.")


@dataclass
class RunSettings:
    """The run-level knobs of conf/config.yaml and the nodes its groups fill (typed by their own schemas)."""

    # Any, not a number type: the run's config check names a bad ratio and the allowed range in one line
    # (depthbench.experiments.pipeline.validate), which Hydra's type error would not
    ratio: Any = setting(0.25, "Compression ratio r: remove round(r * L) decoder layers (half up), 0 < r < 1.")
    seed: int = setting(0, "Seed for calibration sampling and any training (healing.seed and a trained method's "
                           "pruner.options.seed follow it unless set); recorded in every result.")
    evaluate: bool = setting(True, "Evaluate the base and the pruned model (false: prune and save only).")
    save_model: bool = setting(True, "Save the pruned model under <run dir>/pruned_model/.")
    device: str = setting("auto", "auto: cuda when available, else cpu. Ignored when model.device_map is set.")
    progress: bool = setting(True, "Progress bars on stderr.")
    debug: bool = setting(False, "Show full tracebacks instead of one-line errors.")
    resume: bool = setting(True, "Skip the run when a result with the same config hash already exists.")
    cache: CacheSettings = field(default_factory=CacheSettings)
    efficiency: EfficiencySettings = field(default_factory=EfficiencySettings)
    # the groups' nodes, each typed by its group's schema (schema/<group>/<kind>) or the method's Options
    model: Any = None
    pruner: Any = None
    calibration: Any = None
    evaluation: Any = None
    benchmark: Any = None
    logger: Any = None
    healing: Any = None
    paths: Any = None


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


def check_declared_keys(cfg) -> None:
    """Refuse a key that no typed setting declares. Hydra refuses ``evaluation.bogus=1`` when it composes, but an
    append (``+evaluation.bogus=1``) reaches the config, where nothing would read it: a typo that silently changes
    nothing. Walks every node typed by a schema (the run level, the groups, their nested settings); the pruner's
    options are checked by its own `Options` when it is built. `ConfigError` naming the key and what is allowed."""
    from omegaconf import DictConfig, OmegaConf

    from depthbench.errors import ConfigError

    def walk(node: DictConfig, path: str) -> None:
        schema = OmegaConf.get_type(node)
        if schema is None or not dataclasses.is_dataclass(schema):
            return
        declared = field_names(schema)
        for key in node.keys():
            where = f"{path}.{key}" if path else str(key)
            if key not in declared and where != "hydra":  # Hydra's own node, where the caller composed it
                raise ConfigError(f"{where}: {path or 'the run'} has no setting {key!r}; allowed keys of "
                                  f"{path or 'the run'}: {', '.join(declared)}")
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, where)

    walk(cfg, "")



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
