"""Efficiency: parameter counts against explicit sums, speed figures consistent with their timings."""

import functools

import numpy as np
import pytest
import torch

from depthbench.errors import ConfigError
from depthbench.evaluation.efficiency import measure_speed, model_size, speedup
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 90) for c in text]}


def test_model_size_counts_unique_parameters_and_layers(tiny_llama):
    m = tiny_llama
    total = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    emb = m.model.embed_tokens.weight.numel()  # tied with lm_head: counted once
    size = model_size(m)
    assert size == {"parameters": total, "parameters_without_embeddings": total - emb, "layers": 6}
    ModelSurgery(adapter_for(m)).remove_layers([1, 2])
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


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fake_runs(clock, calls, base_times, pruned_times):
    """run functions that advance the fake clock by their (prefill, decode) times and log their order."""
    def make(name, times):
        it = iter(times)

        def run():
            t = next(it)
            clock.now += sum(t)
            calls.append(name)
            return t
        return run
    return make("base", base_times), make("pruned", pruned_times)


def test_interleaved_timing_alternates_and_stops_when_the_interval_is_tight():
    from depthbench.evaluation.efficiency import interleaved_speedup

    clock, calls = _FakeClock(), []
    base, pruned = _fake_runs(clock, calls, [(2.0, 4.0)] * 50, [(1.0, 2.0)] * 50)
    out = interleaved_speedup(base, pruned, min_rounds=3, max_rounds=50, rel_width=0.05, budget_s=1e9, clock=clock)
    assert calls == ["base", "pruned", "pruned", "base", "base", "pruned"]
    assert out["stopped_by"] == "interval" and out["speedup"]["prefill"]["value"] == pytest.approx(2.0)
    assert out["speedup"]["decode"]["interval"] == pytest.approx([2.0, 2.0])
    assert out["seconds"] == pytest.approx(3 * (6.0 + 3.0))


def test_interleaved_timing_stops_at_the_budget_and_reports_the_t_interval():
    from scipy.stats import t

    from depthbench.evaluation.efficiency import interleaved_speedup

    clock, calls = _FakeClock(), []
    noisy = [(1.0 * (1.5 if i % 2 else 0.7), 1.0) for i in range(100)]
    base, pruned = _fake_runs(clock, calls, [(1.2, 1.0)] * 100, noisy)
    out = interleaved_speedup(base, pruned, min_rounds=2, max_rounds=100, rel_width=0.01, budget_s=10.0, clock=clock)
    assert out["stopped_by"] == "budget"
    rounds = out["speedup"]["prefill"]["rounds"]
    assert clock.now >= 10.0 and rounds == len(calls) // 2
    varying = [(100.0 if i % 2 else 130.0, 1.0) for i in range(9)]
    slow = interleaved_speedup(*_fake_runs(clock, [], varying, [(90.0, 1.0)] * 9), min_rounds=4,
                               max_rounds=9, rel_width=0.01, budget_s=1.0, clock=clock)
    assert slow["speedup"]["prefill"]["rounds"] == 4 and slow["stopped_by"] == "budget"  # the minimum is kept
    logs = np.log([1.2 / p for p, _ in noisy[:rounds]])
    half = t.ppf(0.975, rounds - 1) * logs.std(ddof=1) / np.sqrt(rounds)
    assert out["speedup"]["prefill"]["interval"] == pytest.approx([np.exp(logs.mean() - half),
                                                                   np.exp(logs.mean() + half)])


def test_analytic_flops_equal_a_hand_count():
    from depthbench.evaluation.efficiency import analytic_speedup, flops_per_token
    from tests.helpers import build_tiny_model, tiny_llama_config

    base = build_tiny_model(tiny_llama_config())  # d 32, d_ff 64, 4 heads x 8, 2 kv heads, V 101, 6 layers
    pruned = build_tiny_model(tiny_llama_config())
    ModelSurgery(adapter_for(pruned)).remove_layers([1, 2])
    d, ff, kv, V, ctx = 32, 64, 16, 101, 10.0
    layer = 2 * (d * d + d * kv + d * kv + d * d + 3 * d * ff) + 2 * 2 * 32 * ctx
    assert flops_per_token(base, ctx) == 6 * layer + 2 * V * d
    assert flops_per_token(pruned, ctx) == 4 * layer + 2 * V * d
    n, new = 19, 4
    got = analytic_speedup(base, pruned, prompt_len=n, new_tokens=new)
    pre = 2 * (d * d * 2 + 2 * d * kv + 3 * d * ff) + 4 * 32 * (n + 1) / 2
    dec = 2 * (d * d * 2 + 2 * d * kv + 3 * d * ff) + 4 * 32 * (n + (new + 1) / 2)
    assert got["prefill"] == pytest.approx((6 * pre + 2 * V * d) / (4 * pre + 2 * V * d))
    assert got["decode"] == pytest.approx((6 * dec + 2 * V * d) / (4 * dec + 2 * V * d))


def test_analytic_flops_of_removed_attention_and_a_patch_equal_a_hand_count():
    """A layer without its attention has no attention matmuls and no QK^T / AV context term; LinearPatch's
    ResidualPatch (d x d) is counted; the limit is the larger of the FLOPs and the sub-block ratios."""
    import torch

    from depthbench.evaluation.efficiency import analytic_speedup, flops_per_token
    from tests.helpers import build_tiny_model, tiny_llama_config

    base = build_tiny_model(tiny_llama_config())  # d 32, d_ff 64, 4 heads x 8, 2 kv heads, V 101, 6 layers
    pruned = build_tiny_model(tiny_llama_config())
    adapter = adapter_for(pruned)
    ModelSurgery(adapter).remove_units(["1.attn", "4.attn"])
    ModelSurgery(adapter).insert_residual_patch(3, torch.eye(32))
    d, ff, kv, V, ctx = 32, 64, 16, 101, 10.0
    attn, mlp, context = 2 * (2 * d * d + 2 * d * kv), 2 * 3 * d * ff, 4 * 32 * ctx
    head = 2 * V * d
    assert flops_per_token(base, ctx) == 6 * (attn + mlp + context) + head
    assert flops_per_token(pruned, ctx) == 4 * (attn + mlp + context) + 2 * mlp + 2 * d * d + head
    n, new = 256, 32
    got = analytic_speedup(base, pruned, prompt_len=n, new_tokens=new)
    ctx_dec = n + (new + 1) / 2
    full = attn + mlp + 4 * 32 * ctx_dec
    assert got["decode"] == pytest.approx((6 * full + head) / (4 * full + 2 * mlp + 2 * d * d + head))
    assert got["sub_blocks"] == pytest.approx(12 / 10)
    assert got["decode_limit"] == pytest.approx(max(got["decode"], 12 / 10))


def test_measure_speedup_on_tiny_models_reports_intervals_and_analytic_ratio():
    import copy

    from depthbench.evaluation.efficiency import measure_speedup
    from tests.helpers import build_tiny_model, tiny_llama_config

    base = build_tiny_model(tiny_llama_config())
    pruned = copy.deepcopy(base)
    ModelSurgery(adapter_for(pruned)).remove_layers([1, 2, 3])
    out = measure_speedup(base, pruned, _Tok(), prompt_len=8, new_tokens=3, min_rounds=3, max_rounds=4,
                          rel_width=0.05, budget_s=30)
    s = out["speedup"]
    assert 3 <= s["rounds"] <= 4 and out["base"]["repeats"] == s["rounds"]
    for kind in ("prefill", "decode"):
        lo, hi = s[f"{kind}_interval"]
        assert lo <= s[kind] <= hi and s[f"{kind}_analytic"] > 1
        assert s[f"{kind}_consistent"] == (hi >= 1 and lo <= s[f"{kind}_analytic"])
    with pytest.raises(ConfigError, match="max_rounds"):
        measure_speedup(base, pruned, _Tok(), min_rounds=5, max_rounds=2)
