"""Plain helpers shared by the unit and integration tests (fixtures live in tests/conftest.py).

One copy of each: a tiny randomly initialised Llama built from its config (no download), token batches with
ragged right padding, a model's logits on a batch, the Hydra composition of the project's config tree, and the
methods a preset sweeps as Hydra expands them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

#: A fixed SmolLM2 prompt whose logits compare an in-memory pruned model with the model reloaded from disk.
PROBE_IDS = [[1, 504, 3145, 314, 1345, 28, 1329, 253, 2752, 282, 260, 1343]]


def tiny_llama_config(num_layers: int = 6, hidden: int = 32, vocab: int = 101, tie: bool = True, **overrides):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def build_tiny_model(config, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.eval()
    return model


#: A norm epsilon that makes RMSNorm scale-invariant up to its float32 arithmetic (transformers' Llama RMSNorm computes
#: in float32 even for a float64 model: agreement to ~1e-7 relative, not 1e-15), for tests of methods that rescale
#: the residual stream (Prune&Comp, LinearPatch).
SCALE_INVARIANT_NORM_EPS = 1e-14


def build_tiny_llama64(seed: int = 0, **config):
    """A float64 tiny Llama (`tiny_llama_config` keywords), for comparisons against float64 references."""
    return build_tiny_model(tiny_llama_config(**config), seed=seed, dtype=torch.float64)


def random_batches(vocab: int = 101, n_batches: int = 3, batch_size: int = 4, seq_len: int = 16, seed: int = 0,
                   ragged: bool = True):
    """Token batches with right padding of varying length (pad id 0, mask 0): the bit-exact method records' own
    (`depthbench.benchmarks.method_records.batches`)."""
    from depthbench.benchmarks.method_records import batches

    return batches(seed, n_batches, batch_size, seq_len, vocab=vocab, ragged=ragged)


@torch.no_grad()
def logits(model, batch, use_cache: bool | None = False):
    """The model's logits on one batch (every position, padding included). ``use_cache=None`` leaves the choice to
    the model's config, as a caller that does not pass it."""
    return model(**batch, use_cache=use_cache).logits


@torch.no_grad()
def real_token_logits(model, batches):
    """The logits at real (unpadded) tokens of every batch, one row per token."""
    return torch.cat([model(**b, use_cache=False).logits[b["attention_mask"].bool()] for b in batches])


def padded_masks(batches) -> np.ndarray:
    """Every batch's attention mask as booleans, right-padded with False to the widest batch and stacked."""
    width = max(b["input_ids"].shape[1] for b in batches)
    return np.concatenate([np.pad(b["attention_mask"].numpy(), ((0, 0), (0, width - b["input_ids"].shape[1])))
                           for b in batches]).astype(bool)


def compose(*overrides: str, hydra_cfg: bool = False):
    """The project's config (conf/config.yaml and every registered pruner) with ``overrides``, as the CLI composes it;
    ``hydra_cfg`` keeps the ``hydra`` node (sweeper parameters, run folders)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from depthbench.config_store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def swept_values(*overrides: str, key: str = "pruner") -> list[str]:
    """The values that Hydra's sweeper runs for ``key`` under ``overrides`` (e.g. ``experiment=leaderboard``): the
    preset's ``hydra.sweeper.params`` entry expanded as the basic sweeper expands it, ``glob(...)`` over the config
    group's options included."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from depthbench.config_store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        (override,) = parser.parse_overrides([f"{key}={cfg.hydra.sweeper.params[key]}"])
        return list(override.sweep_string_iterator())
