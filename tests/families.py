"""Tiny randomly initialised models of every supported architecture family, built from transformers configs (no
download): the families the adapters support, the layouts beside each family's default, and where each keeps its
decoder layers (written out here, not taken from the adapters)."""

from __future__ import annotations

import torch

from tests.helpers import build_tiny_model, random_batches

IDS = dict(vocab_size=101, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ROPE = dict(IDS, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention",
           "sliding_attention"]


def family_config(family: str):
    import transformers as t

    return {
        "mistral": lambda: t.MistralConfig(**ROPE, sliding_window=None),
        "mistral_sliding": lambda: t.MistralConfig(**ROPE, sliding_window=4),
        "qwen2_sliding": lambda: t.Qwen2Config(**ROPE, use_sliding_window=True, sliding_window=4, max_window_layers=2),
        "qwen2": lambda: t.Qwen2Config(**ROPE, tie_word_embeddings=False),  # q/k/v biases
        "qwen3": lambda: t.Qwen3Config(**ROPE, head_dim=8),  # q/k norms
        "phi3": lambda: t.Phi3Config(**ROPE),  # fused gate/up projection
        "gemma2": lambda: t.Gemma2Config(**ROPE, head_dim=8, sliding_window=4, layer_types=SLIDING),
        "gemma3": lambda: t.Gemma3TextConfig(**ROPE, head_dim=8, sliding_window=4, layer_types=SLIDING),
        "opt": lambda: t.OPTConfig(**IDS, hidden_size=32, ffn_dim=64, num_hidden_layers=6, num_attention_heads=4,
                                   max_position_embeddings=128, word_embed_proj_dim=32),
        "gpt2": lambda: t.GPT2Config(**IDS, n_embd=32, n_layer=6, n_head=4, n_positions=128),
        "gpt_neox": lambda: t.GPTNeoXConfig(**IDS, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                            num_attention_heads=4, max_position_embeddings=128),
        "falcon": lambda: t.FalconConfig(**IDS, hidden_size=32, num_hidden_layers=6, num_attention_heads=4),
        "falcon_alibi": lambda: t.FalconConfig(**IDS, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                                               alibi=True),
        # the layouts beside each family's default: NeoX with attention then MLP (not parallel), Falcon
        # attention then MLP, and Falcon-40B/180B's new decoder architecture (two input norms, grouped KV)
        "gpt_neox_sequential": lambda: t.GPTNeoXConfig(**IDS, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=6, num_attention_heads=4,
                                                       max_position_embeddings=128, use_parallel_residual=False),
        "falcon_sequential": lambda: t.FalconConfig(**IDS, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                                                    parallel_attn=False),
        "falcon_new_arch": lambda: t.FalconConfig(**IDS, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                                                  new_decoder_architecture=True, num_kv_heads=2),
    }[family]()


# Written out here, not taken from the adapters: where each family keeps its layers.
LAYERS = {
    "mistral": lambda m: m.model.layers, "qwen2": lambda m: m.model.layers,
    "mistral_sliding": lambda m: m.model.layers, "qwen2_sliding": lambda m: m.model.layers,
    "qwen3": lambda m: m.model.layers,
    "phi3": lambda m: m.model.layers, "gemma2": lambda m: m.model.layers, "gemma3": lambda m: m.model.layers,
    "opt": lambda m: m.model.decoder.layers, "gpt2": lambda m: m.transformer.h,
    "gpt_neox": lambda m: m.gpt_neox.layers, "falcon": lambda m: m.transformer.h,
    "falcon_alibi": lambda m: m.transformer.h, "gpt_neox_sequential": lambda m: m.gpt_neox.layers,
    "falcon_sequential": lambda m: m.transformer.h, "falcon_new_arch": lambda m: m.transformer.h,
}
FAMILIES = ["mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "opt", "gpt2", "gpt_neox", "falcon"]
LAYOUT_VARIANTS = ["gpt_neox_sequential", "falcon_sequential", "falcon_new_arch"]
#: Every family and layout, plus the attention variants (ALiBi, sliding windows) some tests add.
ALL_FAMILIES = FAMILIES + LAYOUT_VARIANTS + ["falcon_alibi", "mistral_sliding", "qwen2_sliding"]


def family_model(family: str, dtype=torch.float32):
    return build_tiny_model(family_config(family), dtype=dtype)


def window_batch():
    """One ragged batch of 12-token sequences: longer than the sliding windows (4), so a wrong mask shows."""
    return random_batches(n_batches=1, seq_len=12)[0]
