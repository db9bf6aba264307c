"""Independent float64 references used by the tests: written from the Llama equations, not from
depthbench's hooks or transformers' modules."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn


def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def manual_llama_forward(model, input_ids: torch.Tensor):
    """Layer-by-layer float64 forward of an unpadded batch: returns ([h_0..h_L], [M_0..M_{L-1}])."""
    cfg = model.config
    sd = {k: v.to(torch.float64) for k, v in model.state_dict().items()}
    eps = cfg.rms_norm_eps
    d, n_heads, n_kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // n_heads
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    B, T = input_ids.shape
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    causal = torch.full((T, T), -math.inf, dtype=torch.float64).triu(1)

    h = sd["model.embed_tokens.weight"][input_ids]
    hs, ms = [h], []
    for k in range(cfg.num_hidden_layers):
        p = f"model.layers.{k}."
        x = _rms(h, sd[p + "input_layernorm.weight"], eps)
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, n_heads, hd).transpose(1, 2)
        kk = (x @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, n_kv, hd).transpose(1, 2)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, n_kv, hd).transpose(1, 2)
        q, kk = q * cos + _rotate_half(q) * sin, kk * cos + _rotate_half(kk) * sin
        rep = n_heads // n_kv
        kk, v = kk.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(hd) + causal, -1) @ v
        y = h + att.transpose(1, 2).reshape(B, T, n_heads * hd) @ sd[p + "self_attn.o_proj.weight"].T
        z = _rms(y, sd[p + "post_attention_layernorm.weight"], eps)
        gate = z @ sd[p + "mlp.gate_proj.weight"].T
        m = (gate * torch.sigmoid(gate) * (z @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
        ms.append(m)
        h = y + m
        hs.append(h)
    return hs, ms


def last_token_angular_distance_np(hs: list[np.ndarray], last_index: np.ndarray, s: int, n: int) -> float:
    """mean over sequences of arccos(cos(h_s, h_{s+n}))/pi at each sequence's last real token."""
    rows = np.arange(len(last_index))
    a, b = hs[s][rows, last_index], hs[s + n][rows, last_index]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(np.mean(np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi))


@torch.no_grad()
def residual_states_np(model, batches) -> tuple[list[np.ndarray], np.ndarray]:
    """h_0..h_L for all batches (concatenated over sequences, padded positions kept) via
    ``output_hidden_states`` plus a pre-hook on the final norm for h_L (which transformers reports
    only after the norm). Returns (states, last_index)."""
    per_layer: list[list[np.ndarray]] = []
    lasts = []
    captured = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, a: captured.__setitem__("h_L", a[0]))
    try:
        for b in batches:
            out = model(**b, output_hidden_states=True, use_cache=False)
            states = list(out.hidden_states[:-1]) + [captured["h_L"]]
            arrays = [s.to(torch.float64).numpy() for s in states]
            width = b["input_ids"].shape[1]
            if not per_layer:
                per_layer = [[] for _ in arrays]
            for k, a in enumerate(arrays):
                per_layer[k].append((a, width))
            lasts.append(b["attention_mask"].sum(1).numpy() - 1)
    finally:
        handle.remove()
    max_w = max(w for _, w in per_layer[0])
    out_states = []
    for chunks in per_layer:
        padded = [np.pad(a, ((0, 0), (0, max_w - w), (0, 0))) for a, w in chunks]
        out_states.append(np.concatenate(padded, 0))
    return out_states, np.concatenate(lasts)


def nll_float64(model, batches) -> float:
    """Mean next-token NLL over real targets with a real context token, written out: float64 log-softmax of
    the model's logits (the reference for the calibration NLL of SLEB, Shortened-PPL, BlockPruner)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            logits = model(**batch, use_cache=False).logits.to(torch.float64)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = batch["input_ids"][:, 1:]
            keep = batch["attention_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()
            total -= logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[keep].sum()
            count += int(keep.sum())
    return float(total) / count


def third_party_imports(path) -> set[str]:
    """The modules a source file imports, standard library left out (read from its syntax tree, not run)."""
    import ast
    import sys
    from pathlib import Path

    modules: set[str] = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names | {"__future__"}}


def block_influence_np(hs, masks):
    """BI_k = 1 - mean over real tokens of cos(h_k, h_{k+1}); h_L taken before the final norm."""
    out = []
    for k in range(len(hs) - 1):
        a, b = hs[k][masks], hs[k + 1][masks]
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        out.append(float(1 - np.mean(cos)))
    return out


def without_layers(model, removed: list[int]):
    """A deep copy of a tiny Llama with the listed layers (indices into its current list) deleted by hand, not by the
    adapter's surgery: the model that skipping or removing those layers must reproduce."""
    out = copy.deepcopy(model)
    out.model.layers = nn.ModuleList([layer for k, layer in enumerate(out.model.layers) if k not in removed])
    out.config.num_hidden_layers = len(out.model.layers)
    return out
