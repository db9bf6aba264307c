import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from depthbench.modeling.saving import METADATA_FILE, save_pruned
from tests.helpers import build_tiny_model, logits, random_batches, tiny_llama_config


def test_remove_save_reload_identical_logits_and_generation(tiny_llama, tmp_path):
    model = tiny_llama
    original_layers = list(model.model.layers)
    adapter = adapter_for(model)
    ModelSurgery(adapter).remove_layers([1, 2, 4])
    assert model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert list(model.model.layers) == [original_layers[i] for i in (0, 3, 5)]
    assert model.lm_head.weight is model.model.embed_tokens.weight

    save_pruned(model, None, tmp_path / "pruned", {"removed_layers": [1, 2, 4]})
    assert json.loads((tmp_path / "pruned" / METADATA_FILE).read_text())["removed_layers"] == [1, 2, 4]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.num_hidden_layers == 3
    batch = random_batches(n_batches=1)[0]
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=0)

    prompt = batch["input_ids"][:1, :6]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = reloaded.generate(prompt, use_cache=True, **kwargs)
    without_cache = reloaded.generate(prompt, use_cache=False, **kwargs)
    in_memory = model.generate(prompt, use_cache=True, **kwargs)
    assert with_cache.shape[1] == 14
    assert torch.equal(with_cache, without_cache) and torch.equal(with_cache, in_memory)


def test_per_layer_config_lists_follow_the_kept_layers(tmp_path):
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                      max_window_layers=3, tie_word_embeddings=False, pad_token_id=0)
    model = build_tiny_model(cfg)
    before = list(model.config.layer_types)
    assert len(set(before)) == 2, "the test needs a mixed sliding/full pattern"
    ModelSurgery(adapter_for(model)).remove_layers([0, 4])
    assert model.config.layer_types == [before[i] for i in (1, 2, 3, 5)]
    assert model.config.num_hidden_layers == 4
    batch = random_batches(n_batches=1)[0]
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert reloaded.config.layer_types == model.config.layer_types
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=0)
    out = reloaded.generate(batch["input_ids"][:1, :12], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 16


def test_bad_surgery_requests(tiny_llama):
    adapter = adapter_for(tiny_llama)
    with pytest.raises(ConfigError, match="layers 0..5"):
        ModelSurgery(adapter).remove_layers([6])
    with pytest.raises(ConfigError, match="all 6"):
        ModelSurgery(adapter).remove_layers(range(6))


def test_unsupported_family_lists_supported():
    from transformers import BloomConfig

    model = build_tiny_model(BloomConfig(vocab_size=101, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(ConfigError, match=r"unsupported model family 'bloom'; supported: .*llama"):
        adapter_for(model)


def test_parameter_counts_are_explicit_sums(tiny_llama):
    counts = adapter_for(tiny_llama).parameter_counts()
    d, v, L = 32, 101, 6
    q = d * d
    kv = 2 * d * (d // 2)  # 2 KV heads of head_dim 8 -> 16 outputs each for k and v
    o = d * d
    mlp = 3 * d * 2 * d
    norms = 2 * d
    per_layer = q + kv + o + mlp + norms
    assert counts["per_layer"] == per_layer
    assert counts["total"] == v * d + L * per_layer + d  # tied head counted once, final norm
    assert counts["without_embeddings"] == L * per_layer + d


def test_custom_layout_versions_1_and_2_load_and_others_are_refused(tmp_path):
    """Version 1 directories (Gemma's linear modules only, no ``removed_sub_blocks`` key) still load;
    an unknown version is refused by name."""
    from transformers import Gemma2Config

    from depthbench.modeling.saving import CUSTOM_MODULES_FILE, load_pruned

    model = build_tiny_model(Gemma2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0))
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(0)
    ModelSurgery(adapter).insert_mlp_output_linear(1, torch.eye(32) + 0.1 * torch.randn(32, 32, generator=g))
    save_pruned(model, None, tmp_path / "pruned", {})
    sidecar = tmp_path / "pruned" / CUSTOM_MODULES_FILE
    written = json.loads(sidecar.read_text())
    assert written["format_version"] == 2 and written["removed_sub_blocks"] == []
    batch = random_batches(n_batches=1)[0]
    version1 = {k: v for k, v in written.items() if k != "removed_sub_blocks"} | {"format_version": 1}
    sidecar.write_text(json.dumps(version1))
    torch.testing.assert_close(logits(load_pruned(tmp_path / "pruned"), batch), logits(model, batch), rtol=0, atol=0)
    sidecar.write_text(json.dumps(written | {"format_version": 3}))
    with pytest.raises(ValueError, match="format_version 3; this depthbench reads 1, 2"):
        load_pruned(tmp_path / "pruned")


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_removed_sub_blocks_save_zeroed_and_reload_with_plain_from_pretrained(family, tmp_path):
    """Default sub-block format: the full architecture with the removed sub-blocks' parameters 0 (output
    projection included). Plain from_pretrained gives the in-memory pruned model's logits (float32) and
    loads every key (nothing randomly initialised); load_pruned puts the stand-ins back; the old layout
    stays available (``sub_blocks="removed"``)."""
    from depthbench.modeling.saving import load_pruned
    from tests.families import family_config

    model = build_tiny_model(tiny_llama_config() if family == "llama" else family_config(family))
    adapter = adapter_for(model)
    ModelSurgery(adapter).remove_units(["1.attn", "3.mlp", 2])  # layer 2 goes: 3.mlp becomes 2.mlp
    batch = random_batches(n_batches=1)[0]
    real = batch["attention_mask"].bool()
    save_pruned(model, None, tmp_path / "pruned", {"method": "test"})
    metadata = json.loads((tmp_path / "pruned" / METADATA_FILE).read_text())
    assert metadata["zeroed_sub_blocks"] == ["1.attn", "2.mlp"] and metadata["method"] == "test"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    reloaded, info = plain[0].eval(), plain[1]
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.num_hidden_layers == 5
    torch.testing.assert_close(logits(reloaded, batch)[real], logits(model, batch)[real], rtol=1e-6, atol=1e-6)
    layers = adapter_for(reloaded).decoder_layers()
    out_proj = {"llama": lambda b: b.self_attn.o_proj, "gemma2": lambda b: b.self_attn.o_proj,
                "gpt_neox": lambda b: b.attention.dense}[family](layers[1])
    down_proj = {"llama": lambda b: b.mlp.down_proj, "gemma2": lambda b: b.mlp.down_proj,
                 "gpt_neox": lambda b: b.mlp.dense_4h_to_h}[family](layers[2])
    for projection in (out_proj, down_proj):
        assert not projection.weight.any() and (projection.bias is None or not projection.bias.any())
    assert any(p.any() for p in layers[1].parameters())  # the kept MLP of layer 1 is not zeroed
    in_memory = load_pruned(tmp_path / "pruned")
    assert [str(u) for u in ModelSurgery(adapter_for(in_memory)).removed_sub_blocks()] == ["1.attn", "2.mlp"]
    assert adapter_for(in_memory).parameter_counts() == adapter.parameter_counts()
    torch.testing.assert_close(logits(in_memory, batch)[real], logits(model, batch)[real], rtol=0, atol=0)

    save_pruned(model, None, tmp_path / "layout", {}, sub_blocks="removed")
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "layout")
    torch.testing.assert_close(logits(load_pruned(tmp_path / "layout"), batch)[real], logits(model, batch)[real],
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="sub_blocks='identity'; allowed: zeroed, removed"):
        save_pruned(model, None, tmp_path / "bad", {}, sub_blocks="identity")
    assert not (tmp_path / "bad").exists()
