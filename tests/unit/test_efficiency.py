"""Efficiency: parameter counts against explicit sums, speed figures consistent with their timings."""

import functools

import pytest
import torch

from depthbench.errors import ConfigError
from depthbench.evaluation.efficiency import measure_speed, model_size, speedup
from depthbench.modeling.adapters import adapter_for


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 90) for c in text]}


def test_model_size_counts_unique_parameters_and_layers(tiny_llama):
    m = tiny_llama
    total = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    emb = m.model.embed_tokens.weight.numel()  # tied with lm_head: counted once
    size = model_size(m)
    assert size == {"parameters": total, "parameters_without_embeddings": total - emb, "layers": 6}
    adapter_for(m).remove_layers([1, 2])
    per_layer = sum(p.numel() for p in m.model.layers[0].parameters())
    assert model_size(m) == {"parameters": total - 2 * per_layer,
                             "parameters_without_embeddings": total - emb - 2 * per_layer, "layers": 4}


def test_measure_speed_reports_throughput_from_its_timings(tiny_llama):
    s = measure_speed(tiny_llama, _Tok(), prompt_len=12, new_tokens=5, batch_size=2, repeats=2)
    assert s["prefill_tokens_per_s"] == pytest.approx(2 * 12 / s["prefill_seconds"])
    assert s["decode_tokens_per_s"] == pytest.approx(2 * 5 / s["decode_seconds"])
    assert s["dtype"] == "float32" and s["device"] == "cpu"
    assert tiny_llama.training is False


def test_decode_uses_the_cache_correctly(tiny_llama):
    """The cached greedy decode inside measure_speed produces what generate() does."""
    from depthbench.evaluation.efficiency import _one_run, _prompt_ids

    prompt = _prompt_ids(_Tok(), 10, 1)
    with torch.no_grad():
        ref = tiny_llama.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    tokens = []
    orig = tiny_llama.forward

    @functools.wraps(orig)  # keeps forward's signature: the decode loop picks its cache keyword from it
    def spy(*a, **k):
        out = orig(*a, **k)
        tokens.append(out.logits[:, -1].argmax(-1))
        return out

    tiny_llama.forward = spy
    try:
        _one_run(tiny_llama, prompt, 3)
    finally:
        tiny_llama.forward = orig
    assert torch.equal(torch.stack(tokens, 1), ref[:, 10:])


def test_speedup_and_bad_settings():
    base = {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0, "prompt_len": 8, "new_tokens": 2,
            "batch_size": 1, "device": "cpu", "dtype": "float32"}
    pruned = {**base, "prefill_tokens_per_s": 150.0, "decode_tokens_per_s": 12.5}
    assert speedup(base, pruned) == pytest.approx({"prefill": 1.5, "decode": 1.25})
    with pytest.raises(ConfigError, match="different settings: batch_size"):
        speedup(base, {**pruned, "batch_size": 4})
    with pytest.raises(ConfigError, match="prompt_len=0"):
        measure_speed(None, _Tok(), prompt_len=0)
