"""Shared fixtures: tiny randomly initialised Llama-family models built from configs (no download)."""

from __future__ import annotations

import pytest
import torch


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


@pytest.fixture(autouse=True, scope="session")
def private_depthbench_cache(tmp_path_factory):
    """Tests never read or write the user's cache (~/.cache/depthbench): a result cached by an older
    checkout could otherwise stand in for a fresh computation. CLI subprocesses inherit the variable."""
    patch = pytest.MonkeyPatch()
    patch.setenv("DEPTHBENCH_CACHE", str(tmp_path_factory.mktemp("depthbench-cache")))
    yield
    patch.undo()


@pytest.fixture
def tiny_llama():
    return build_tiny_model(tiny_llama_config())


@pytest.fixture
def tiny_llama64():
    """A float64 tiny Llama, for comparisons against float64 references."""
    return build_tiny_model(tiny_llama_config(), dtype=torch.float64)


def random_batches(vocab: int = 101, n_batches: int = 3, batch_size: int = 4, seq_len: int = 16, seed: int = 0,
                   ragged: bool = True):
    """Token batches with right padding of varying length (pad id 0, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
        mask = torch.ones(batch_size, seq_len, dtype=torch.long)
        if ragged:
            lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=g)
            lengths[0] = seq_len
            for row, n in enumerate(lengths.tolist()):
                mask[row, n:] = 0
                ids[row, n:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.fixture
def counting_collect(monkeypatch):
    """Records every forward pass run through `depthbench.calibration.cache` (replays of stored activations are
    not forward passes); each entry is the list of statistics that pass fed."""
    import depthbench.calibration.cache as cache_module
    from depthbench.calibration.statistics import collect

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2])
        return collect(*args, **kwargs)

    monkeypatch.setattr(cache_module, "collect", counted)
    return calls



@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (tiny models: thread start-up costs more than it saves)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
