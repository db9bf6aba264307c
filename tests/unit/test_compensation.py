"""Prune&Comp: alpha against a direct float64 computation, the folds against explicit scaling, the setting's checks."""

import copy
from functools import partial

import numpy as np
import pytest
import torch

from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.statistics import collect
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from depthbench.pruners import build_pruner
from depthbench.pruners.methods.compensation import ChannelMagnitudeRatios, maximal_gaps, remove_and_compensate
from tests.helpers import (SCALE_INVARIANT_NORM_EPS, compose, padded_masks, random_batches,
                           real_token_logits, build_tiny_llama64)
from tests.reference import block_influence_np, residual_states_np

L = 6


#: This file's model: keywords `tie` and `seed` (default 3) pick the variant.
model64 = partial(build_tiny_llama64, seed=3, num_layers=L, rms_norm_eps=SCALE_INVARIANT_NORM_EPS)


def direct_ratios(model, batches, s, e):
    """(1/N) sum_n mean_tok|h_e[n,:,c]| / mean_tok|h_s[n,:,c]| per channel, from the padded states (numpy)."""
    hs, _ = residual_states_np(model, batches)
    masks = padded_masks(batches)
    ratios = []
    for n in range(masks.shape[0]):
        rows = masks[n]
        ratios.append(np.abs(hs[e][n][rows]).mean(0) / np.abs(hs[s][n][rows]).mean(0))
    return np.mean(ratios, 0)


@torch.no_grad()
def residuals(model, batch):
    adapter = adapter_for(model)
    out = {}
    handles = [adapter.observe_residual(k, lambda h, k=k: out.__setitem__(k, h.clone()))
               for k in range(adapter.num_layers + 1)]
    try:
        model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def test_alpha_and_channel_ratios_equal_a_direct_computation():
    model = model64()
    batches = random_batches(n_batches=3, seed=5)
    (stat,) = collect(adapter_for(model), batches, [ChannelMagnitudeRatios([(2, 4), (1, 2)])], progress=False)
    for s, e in [(2, 4), (1, 2)]:
        expected = direct_ratios(model, batches, s, e)
        np.testing.assert_allclose(stat.ratios((s, e)).numpy(), expected, rtol=1e-10)
        assert stat.alpha((s, e)) == pytest.approx(float(expected.mean()), rel=1e-10)
    assert stat.count == sum(b["input_ids"].shape[0] for b in batches)


def test_fold_before_scales_the_stream_up_to_the_gap_and_matches_an_explicit_scaling():
    model = model64(tie=False)
    batch = random_batches(n_batches=1, seed=2)[0]
    before = residuals(model, batch)
    s, e, alpha = 2, 4, 1.7
    plain = copy.deepcopy(model)
    ModelSurgery(adapter_for(plain)).remove_layers(range(s, e))
    remove_and_compensate(adapter_for(model), s, e, alpha, "before")
    after = residuals(model, batch)
    real = batch["attention_mask"].bool()
    for k in range(s + 1):  # h'_k = alpha h_k for k <= s (the stream entering the layer after the gap at k = s)
        torch.testing.assert_close(after[k][real], alpha * before[k][real], rtol=1e-5, atol=1e-7)
    # the compensated model = the plainly pruned one with an explicit x alpha before the layer after the gap
    hook = adapter_for(plain).layer(s).register_forward_pre_hook(
        lambda module, args, kwargs: ((alpha * args[0],) + args[1:], kwargs) if args else
        (args, {**kwargs, "hidden_states": alpha * kwargs["hidden_states"]}), with_kwargs=True)
    torch.testing.assert_close(real_token_logits(model, [batch]), real_token_logits(plain, [batch]),
                               rtol=1e-5, atol=1e-6)
    hook.remove()


@pytest.mark.parametrize("gap", [(0, 1), (2, 4), (3, 5)])
def test_fold_before_and_after_give_the_same_logits(gap):
    model = model64(tie=False)
    batches = random_batches(n_batches=2, seed=4)
    reference = copy.deepcopy(model)
    remove_and_compensate(adapter_for(model), *gap, 0.6, "after")
    remove_and_compensate(adapter_for(reference), *gap, 0.6, "before")
    torch.testing.assert_close(real_token_logits(model, batches), real_token_logits(reference, batches),
                               rtol=1e-5, atol=1e-6)
    # and the fold did something: without it the logits differ
    uncompensated = model64(tie=False)
    ModelSurgery(adapter_for(uncompensated)).remove_layers(range(*gap))
    assert (real_token_logits(model, batches) - real_token_logits(uncompensated, batches)).abs().max() > 1e-4


def test_fold_after_keeps_tied_embeddings_and_alpha_one_is_a_no_op():
    model = model64(tie=True)
    batches = random_batches(n_batches=2, seed=6)
    plain = copy.deepcopy(model)
    ModelSurgery(adapter_for(plain)).remove_layers([2, 3])
    remove_and_compensate(adapter_for(model), 2, 4, 1.0, "after")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    torch.testing.assert_close(real_token_logits(model, batches), real_token_logits(plain, batches), rtol=0, atol=0)


def test_output_biases_are_scaled_with_the_weights():
    model = build_tiny_llama64(num_layers=4, attention_bias=True, mlp_bias=True, tie=False,
                               rms_norm_eps=1e-14, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # transformers initialises biases to zero: make them matter
                p.add_(0.05 * torch.randn_like(p))
    batches = random_batches(n_batches=1, seed=1)
    other = copy.deepcopy(model)
    remove_and_compensate(adapter_for(model), 1, 2, 2.5, "after")
    remove_and_compensate(adapter_for(other), 1, 2, 2.5, "before")
    o_proj = model.model.layers[2].self_attn.o_proj
    assert o_proj.bias is not None
    torch.testing.assert_close(real_token_logits(model, batches), real_token_logits(other, batches),
                               rtol=1e-5, atol=1e-6)


def test_maximal_gaps():
    assert [(g.start, g.end) for g in maximal_gaps([5, 1, 2, 7, 6])] == [(1, 3), (5, 8)]


# -- the pruner-level setting -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["replaceme_ls", "replaceme_cosine", "llm_streamline"])
def test_methods_with_a_replacement_are_refused(name):
    with pytest.raises(ConfigError, match="compensate"):
        build_pruner(name, {}, compensate="magnitude")


@pytest.mark.parametrize("key, value", [("compensate", "linear"), ("compensate_mode", "once"),
                                        ("compensate_fold", "middle")])
def test_bad_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"pruner.{key}='{value}'; allowed"):
        build_pruner("shortgpt", {}, **{key: value})


def test_fold_before_with_tied_embeddings_fails_before_any_pass(counting_collect):
    model = model64(tie=True)
    pruner = build_pruner("shortgpt", {}, compensate="magnitude", compensate_fold="before")
    with pytest.raises(ConfigError, match="tied"):
        pruner.prune(adapter_for(model), CalibrationData(random_batches(), 16), 2, progress=False)
    assert counting_collect == []


def test_post_mode_keeps_the_base_set_and_records_alpha_per_gap():
    batches = random_batches(n_batches=3, seed=8)
    base = build_pruner("shortgpt").prune(adapter_for(model64(seed=9)), CalibrationData(batches, 16), 3,
                                          progress=False)
    model = model64(seed=9)
    first = maximal_gaps(base.removed_layers)[0]
    expected_alpha = float(direct_ratios(model, batches, first.start, first.end).mean())
    result = build_pruner("shortgpt", {}, compensate="magnitude", compensate_mode="post").prune(
        adapter_for(model), CalibrationData(batches, 16), 3, progress=False)
    record = result.to_dict()
    assert result.removed_layers == base.removed_layers and model.config.num_hidden_layers == L - 3
    gaps = record["compensation"]["gaps"]
    assert [g["gap"] for g in gaps] == [[g.start, g.end] for g in maximal_gaps(base.removed_layers)]
    if first.end < L:
        assert gaps[0]["alpha"] == pytest.approx(expected_alpha, rel=1e-9)


def test_iterative_mode_rescores_on_the_compensated_model():
    """Round 1 = ShortGPT's lowest-BI layer of the original; round 2 = the lowest BI of the model after round 1's
    removal and fold, with alpha measured there (both recomputed here from brute-force float64 states)."""

    batches = random_batches(n_batches=3, seed=11)
    masks = padded_masks(batches)
    model = model64(seed=12)
    replica = copy.deepcopy(model)
    result = build_pruner("shortgpt", {}, compensate="magnitude").prune(adapter_for(model),
                                                                        CalibrationData(batches, 16), 2,
                                                                        progress=False)
    rounds = result.compensation["rounds"]
    expected = []
    for r in range(2):
        hs, _ = residual_states_np(replica, batches)
        bi = block_influence_np(hs, masks)
        k = min(range(len(bi)), key=lambda j: (bi[j], j))
        alpha = float(direct_ratios(replica, batches, k, k + 1).mean()) if k + 1 < len(bi) else None
        assert rounds[r]["gap_current_numbering"] == [k, k + 1]
        if alpha is None:
            assert rounds[r]["alpha"] is None
        else:
            assert rounds[r]["alpha"] == pytest.approx(alpha, rel=1e-8)
        remove_and_compensate(adapter_for(replica), k, k + 1, alpha, "after")
        expected.append(k)
    assert model.config.num_hidden_layers == L - 2
    assert sorted(result.removed_layers) == result.removed_layers and len(result.removed_layers) == 2
    torch.testing.assert_close(real_token_logits(model, batches), real_token_logits(replica, batches),
                               rtol=1e-9, atol=1e-12)


def test_the_setting_composes_from_the_command_line_and_validate_refuses_before_weights(tmp_path):
    from depthbench.experiments.pipeline import validate

    cfg = compose("pruner=shortgpt", "pruner.compensate=magnitude", "pruner.compensate_mode=post", "logger=none")
    assert (cfg.pruner.compensate, cfg.pruner.compensate_mode, cfg.pruner.compensate_fold) == ("magnitude", "post",
                                                                                               "after")
    _, pruner, _ = validate(cfg, tmp_path / "ok")
    assert pruner.settings.active and pruner.settings.mode == "post"
    assert compose("pruner=uidl").pruner.compensate == "none"
    with pytest.raises(ConfigError, match="'replaceme_ls' puts something in their place"):
        validate(compose("pruner=replaceme_ls", "pruner.compensate=magnitude", "logger=none"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen2", "phi3", "gpt2", "gpt_neox", "falcon", "opt"])
def test_fold_after_equals_an_explicit_scaling_on_every_family(family):
    """``fold: after`` (output projections / Gemma's post-norm gains of the later layers x 1/alpha) = the plainly
    pruned model fed ``alpha h_s`` by a hook; the embeddings are scaled up first so the norms' epsilon is negligible."""
    from transformers import AutoModelForCausalLM

    from tests.families import family_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family), dtype=torch.float64).eval()
    with torch.no_grad():
        adapter_for(model).embeddings().weight.mul_(100.0)
    if family == "gemma2":
        model.config.final_logit_softcapping = None  # keep the comparison linear in the logits
    batches = random_batches(vocab=model.config.vocab_size, n_batches=1, seed=3, ragged=False)
    s, e, alpha = 2, 4, 1.8
    explicit = copy.deepcopy(model)
    ModelSurgery(adapter_for(explicit)).remove_layers(range(s, e))
    uncompensated = real_token_logits(explicit, batches)
    adapter_for(explicit).layer(s).register_forward_pre_hook(
        lambda module, args, kwargs: ((alpha * args[0],) + args[1:], kwargs) if args else
        (args, {**kwargs, "hidden_states": alpha * kwargs["hidden_states"]}), with_kwargs=True)
    remove_and_compensate(adapter_for(model), s, e, alpha, "after")
    expected, got = real_token_logits(explicit, batches), real_token_logits(model, batches)
    assert (expected - got).abs().max() <= 1e-5 * expected.abs().max()
    assert (expected - uncompensated).abs().max() > 1e-4 * expected.abs().max()  # the scaling matters here


def test_a_gap_ending_at_the_last_layer_is_removed_without_compensation(caplog):
    from depthbench.pruners.base import Pruner, Selection
    from depthbench.pruners.methods.compensation import CompensatedPruner, parse_compensation

    class LastTwo(Pruner):
        name = "last_two_for_test"

        def statistics(self, adapter, n_remove):
            return []

        def select(self, statistics, adapter, n_remove, service):
            return Selection(removed_layers=list(range(adapter.num_layers - n_remove, adapter.num_layers)))

    batches = random_batches(n_batches=1, seed=1)
    plain = model64()
    ModelSurgery(adapter_for(plain)).remove_layers([L - 2, L - 1])
    for mode in ("post", "iterative"):
        model = model64()
        pruner = CompensatedPruner(LastTwo(), parse_compensation("magnitude", mode, "after"))
        with caplog.at_level("WARNING"):
            result = pruner.prune(adapter_for(model), CalibrationData(batches, 16), 2, progress=False)
        entries = result.compensation["gaps" if mode == "post" else "rounds"]
        assert all(e["alpha"] is None and "last layer" in e["skipped"] for e in entries)
        assert "ends at the last layer" in caplog.text or "removes the last layer" in caplog.text
        torch.testing.assert_close(real_token_logits(model, batches), real_token_logits(plain, batches), rtol=0, atol=0)
