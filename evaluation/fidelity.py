"""Fidelity to the dense model: how closely the pruned model's next-token distribution follows it.

Measured on the held-out perplexity windows (the same tokens for both models; padding masked):

- mean per-token KL(dense || pruned) in nats, its standard error and its 90th / 99th percentiles;
- top-1 agreement: % of tokens where both models' most likely next token is the same;
- RMS of the change in the probability of the correct next token, ``sqrt(mean (q_y - p_y)^2)``;
- flips per multiple-choice task (Dutta et al. 2024, "Accuracy is Not All You Need"): % of the
  examples answered right by the dense model and wrong by the pruned one, and the reverse.

Storage of the dense side (computed once per model x text, cached): per predicted token the ``k``
largest dense log-probabilities (float32) and their token ids (int32), the log of the remaining (tail)
mass, the log-probability of the correct token (float32) and the token's window (int32): ``8k + 12``
bytes per token whatever the vocabulary (k = 64: 524 bytes, for SmolLM2's 49,152 tokens as for a
128k vocabulary; the full float32 distribution would take 4 x 49,152 = 196,608 bytes per token for
SmolLM2 and 4 x 128,256 = 513,024 bytes for Llama-3's 128k vocabulary).

The approximation. With S the dense top-k set, T the rest, P_T and Q_T the tail masses of the dense
(p) and pruned (q) distributions, the KL is computed as

    KL~ = sum_{i in S} p_i log(p_i / q_i) + P_T log(P_T / Q_T)

which merges the tail into one bin. By the log-sum inequality KL~ <= KL, and the error is
``KL - KL~ = P_T * KL(p'' || q')`` with p'' = p_T/P_T and q' = q_T/Q_T the two conditional tails. All
that is stored about p'' is that each p''_i <= c = p_(k)/P_T (no tail token is more likely than the
k-th largest), so

    0 <= KL - KL~ <= P_T * max_{p'' : 0 <= p''_i <= c, sum p'' = 1} KL(p'' || q')

KL is convex in p'', so the maximum sits at a vertex of that polytope: mass c on each of the
floor(1/c) tail tokens the pruned model finds least likely, the remainder on the next one. It is
computed per token from the pruned distribution and reported as ``kl_error_bound`` (mean over
tokens); it is sharp (some dense distribution agreeing with everything stored reaches it), and the
exact mean KL lies in ``[kl_mean, kl_mean + kl_error_bound]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from depthbench import atomic
from depthbench.chunks import chunk_rows
from depthbench.errors import ConfigError
from depthbench.evaluation.perplexity import perplexity_record

REFERENCE_KEYS = ("topk_logprobs", "topk_ids", "tail_logmass", "target_logprob", "window")


def check_top_k(top_k) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"fidelity.top_k={top_k!r} is not allowed; use an integer >= 1")
    return top_k


def bytes_per_token(top_k: int) -> int:
    """Cache size per predicted token: k float32 log-probs + k int32 ids + tail log-mass + target log-prob
    + window index."""
    return 8 * top_k + 12


def _positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of predicted positions (both the input and the next token are real) and the targets."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    keep = mask[:, 1:].bool() & mask[:, :-1].bool()
    return keep, ids[:, 1:]


def _log_probs(model, batch, device) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


@torch.no_grad()
def dense_reference(model, batches: list[dict[str, torch.Tensor]], top_k: int = 64, progress: bool = True,
                    desc: str = "fidelity reference") -> dict[str, torch.Tensor]:
    """The dense model's side, compact: per predicted token its top-k log-probs and ids, tail log-mass,
    log-prob of the correct token and the index of its window (row of the held-out windows)."""
    top_k = check_top_k(top_k)
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in REFERENCE_KEYS}
    window = 0
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        keep, targets = _positions(batch)
        lp = _log_probs(model, batch, device)
        k = min(top_k, lp.shape[-1])
        rows = torch.arange(keep.shape[0]).unsqueeze(1).expand_as(keep)
        lp, targets, rows = lp[keep], targets[keep], rows[keep] + window
        window += keep.shape[0]
        values, ids = lp.topk(k, dim=-1)
        tail = lp.scatter(-1, ids, float("-inf")).logsumexp(-1)
        parts["topk_logprobs"].append(values)
        parts["topk_ids"].append(ids.to(torch.int32))
        parts["tail_logmass"].append(tail)
        parts["target_logprob"].append(lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
        parts["window"].append(rows.to(torch.int32))
    return {k: torch.cat(v) for k, v in parts.items()}


def _max_tail_kl(tail_lq: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """max over p'' with 0 <= p''_i <= cap, sum p'' = 1 of KL(p'' || q'), per row (float64): the vertex
    with weight ``cap`` on the least likely tail tokens first, the remainder on the next one.

    ``tail_lq`` holds log q'_i = log(q_i / Q_T) on the tail (-inf on the top-k set, which is not used)."""
    out = torch.zeros(tail_lq.shape[0], dtype=torch.float64)
    available = torch.isfinite(tail_lq).sum(-1)
    need = torch.clamp(torch.ceil(1.0 / cap), min=1).to(torch.int64)
    m = int(torch.minimum(need, available).max()) if len(out) else 0
    if m == 0:
        return out
    # the m least likely tail tokens of each row, ascending in probability (-inf entries are the top-k set)
    masked = torch.where(torch.isfinite(tail_lq), tail_lq, torch.full_like(tail_lq, float("inf")))
    smallest = masked.topk(m, dim=-1, largest=False).values.to(torch.float64)
    j = torch.arange(m, dtype=torch.float64)
    weights = torch.clamp(torch.minimum(cap.unsqueeze(-1), 1.0 - j * cap.unsqueeze(-1)), min=0.0)
    weights = torch.where(torch.isfinite(smallest), weights, torch.zeros_like(weights))
    smallest = torch.where(torch.isfinite(smallest), smallest, torch.zeros_like(smallest))
    log_w = torch.where(weights > 0, weights.clamp(min=1e-300).log(), torch.zeros_like(weights))
    return (weights * (log_w - smallest)).sum(-1)


def token_statistics(pruned_lp: torch.Tensor, ref: Mapping[str, torch.Tensor], chunk: int | None = None
                     ) -> dict[str, torch.Tensor]:
    """Per-token approximate KL, its error bound and top-1 agreement.

    ``pruned_lp`` [N, V] are the pruned model's log-probs at the N reference tokens (float32 is enough:
    every sum below is taken in float64). Rows are processed ``chunk`` at a time (default
    `depthbench.chunks.chunk_rows`: a few MiB per float64 temporary on a CPU), so the float64 temporaries stay at
    chunk x V."""
    chunk = chunk or chunk_rows(int(pruned_lp.shape[-1]), pruned_lp.device)
    parts = [_chunk_statistics(pruned_lp[i:i + chunk], {k: v[i:i + chunk] for k, v in ref.items()})
             for i in range(0, pruned_lp.shape[0], chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in ("kl", "kl_error_bound", "agree")}


def _chunk_statistics(pruned_lp: torch.Tensor, ref: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    lp_s = ref["topk_logprobs"].to(torch.float64)
    ids = ref["topk_ids"].to(torch.int64)
    log_pt = ref["tail_logmass"].to(torch.float64)
    lq_s = pruned_lp.gather(-1, ids).to(torch.float64)
    tail_lq = pruned_lp.scatter(-1, ids, float("-inf"))
    log_qt = tail_lq.logsumexp(-1).to(torch.float64)
    p_s, p_t = lp_s.exp(), log_pt.exp()
    head = (p_s * (lp_s - lq_s)).sum(-1)
    tail = torch.where(p_t > 0, p_t * (log_pt - log_qt), torch.zeros_like(p_t))
    kl = head + tail
    # error bound: P_T x the largest KL of a dense tail with every p''_i <= c = p_(k) / P_T
    cap = torch.exp(lp_s[:, -1] - log_pt).clamp(max=1.0)
    cond = tail_lq.to(torch.float64) - log_qt.unsqueeze(-1)
    bound = p_t * _max_tail_kl(cond, cap)
    bound = torch.where((p_t > 0) & torch.isfinite(bound), bound.clamp(min=0.0), torch.zeros_like(bound))
    return {"kl": kl, "kl_error_bound": bound, "agree": pruned_lp.argmax(-1) == ids[:, 0]}


@torch.no_grad()
def perplexity_and_fidelity(model, batches: list[dict[str, torch.Tensor]], reference: Mapping[str, torch.Tensor],
                            progress: bool = True, desc: str = "perplexity and fidelity") -> tuple[dict, dict]:
    """The held-out perplexity of ``model`` (the pruned one) and its fidelity to the dense reference, from ONE
    forward pass per batch (the log-probs the fidelity needs also give each token's NLL). The perplexity has
    `depthbench.evaluation.perplexity.perplexity`'s keys and tokens; the NLL sum is taken in float64."""
    device = next(model.parameters()).device
    kls, bounds, agree, dp, nlls, windows = [], [], [], [], [], []
    start = 0
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        keep, targets = _positions(batch)
        lp = _log_probs(model, batch, device)[keep]
        n = lp.shape[0]
        ref = {k: v[start:start + n] for k, v in reference.items()}
        if n == 0 or ref["topk_ids"].shape[0] != n:
            raise ConfigError("fidelity reference does not match the held-out windows (different text or settings)")
        start += n
        stats = token_statistics(lp, ref)
        log_q_y = lp.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1).to(torch.float64)
        nlls.append(-log_q_y)
        kls.append(stats["kl"])
        bounds.append(stats["kl_error_bound"])
        agree.append(stats["agree"])
        dp.append(log_q_y.exp() - ref["target_logprob"].to(torch.float64).exp())
        windows.append(ref["window"])
    if start != reference["topk_ids"].shape[0]:
        raise ConfigError("fidelity reference does not match the held-out windows (different text or settings)")
    nll = torch.cat(nlls).numpy()
    fidelity = summarize(torch.cat(kls).numpy(), torch.cat(bounds).numpy(), torch.cat(agree).numpy(),
                         torch.cat(dp).numpy(), torch.cat(windows).numpy(), top_k=reference["topk_ids"].shape[1],
                         nll=nll)
    return perplexity_record(float(nll.sum()), start), fidelity


def compare_to_reference(model, batches: list[dict[str, torch.Tensor]], reference: Mapping[str, torch.Tensor],
                         progress: bool = True, desc: str = "fidelity") -> dict:
    """Fidelity of ``model`` (the pruned one) to the dense reference on the same ``batches``."""
    return perplexity_and_fidelity(model, batches, reference, progress, desc)[1]


def reference_perplexity(reference: Mapping[str, torch.Tensor]) -> dict:
    """The dense model's held-out perplexity, read from its reference (the log-prob of every correct token is in
    it): no forward pass. Same keys and tokens as `depthbench.evaluation.perplexity.perplexity`."""
    target = reference["target_logprob"].to(torch.float64)
    return perplexity_record(-float(target.sum()), int(target.numel()))


def _window_standard_error(sums: list[float], counts: list[int]) -> float | None:
    """Standard error of a token mean, from the spread of the per-window sums (tokens within one window are
    correlated, so a token-level SE would be too small): the ratio-estimator (cluster) standard error.
    ``sums`` and ``counts``: per window, as `per_window_sums` gives them."""
    g = len(counts)
    if g < 2:
        return None
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    mean = sums.sum() / counts.sum()
    resid = sums - mean * counts
    return float(math.sqrt(g / (g - 1) * (resid ** 2).sum()) / counts.sum())


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else factor * value


def per_window_sums(windows: np.ndarray, **values: np.ndarray) -> dict[str, list]:
    """``{"window": ids, "tokens": counts, name: per-window sums (float64) ...}``: what a paired comparison of
    two models over the same held-out windows needs (`depthbench.evaluation.stats.window_values`)."""
    labels, inverse = np.unique(windows, return_inverse=True)
    out: dict[str, list] = {"window": [int(w) for w in labels],
                            "tokens": np.bincount(inverse, minlength=len(labels)).astype(int).tolist()}
    for name, v in values.items():
        out[name] = np.bincount(inverse, weights=v.astype(np.float64), minlength=len(labels)).tolist()
    return out


def summarize(kl: np.ndarray, bound: np.ndarray, agree: np.ndarray, delta_p: np.ndarray, windows: np.ndarray,
              top_k: int, nll: np.ndarray | None = None) -> dict:
    """The fidelity record: token means with their window-clustered standard errors, quantiles, and
    ``per_window`` sums of KL, top-1 agreement and (given ``nll``) the pruned model's NLL, for paired ranking."""
    kl = kl.astype(np.float64)
    sums = {"kl": kl, "top1": agree.astype(np.float64)}
    if nll is not None:
        sums["nll"] = nll
    per_window = per_window_sums(windows, **sums)
    return {
        "kl_mean": float(kl.mean()),
        "kl_stderr": _window_standard_error(per_window["kl"], per_window["tokens"]),
        "kl_p90": float(np.quantile(kl, 0.90)),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_error_bound": float(bound.astype(np.float64).mean()),
        "top1_agreement_percent": 100.0 * float(agree.astype(np.float64).mean()),
        "top1_agreement_stderr": _scaled(_window_standard_error(per_window["top1"], per_window["tokens"]), 100.0),
        "rms_delta_p_correct": float(math.sqrt((delta_p.astype(np.float64) ** 2).mean())),
        "tokens": int(kl.size),
        "windows": len(per_window["window"]),
        "top_k": int(top_k),
        "reference_bytes_per_token": bytes_per_token(int(top_k)),
        "per_window": per_window,
    }


# ------------------------------------------------------------------------------------------------
# Flips: per-example correctness of the dense and the pruned model on the same multiple-choice task.

def example_keys(samples: Mapping) -> list:
    """Identity of each example: ``(subtask, doc_id)`` when a subtask list is present, else ``doc_id``."""
    doc_ids = list(samples["doc_id"])
    sub = samples.get("subtask")
    if sub is not None:
        if len(sub) != len(doc_ids):
            raise ConfigError("per-example results: 'subtask' and 'doc_id' have different lengths")
        return list(zip(sub, doc_ids))
    return doc_ids


def paired_correctness(base: Mapping, pruned: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """The two models' 0/1 correctness on the examples both evaluated, in the base model's order."""
    for name, s in (("base", base), ("pruned", pruned)):
        if len(s["doc_id"]) != len(s["correct"]):
            raise ConfigError(f"per-example results of the {name} model: 'doc_id' and 'correct' differ in length")
    b_keys, p_keys = example_keys(base), example_keys(pruned)
    if len(set(b_keys)) != len(b_keys) or len(set(p_keys)) != len(p_keys):
        raise ConfigError("per-example results list an example twice")
    p_index = {k: i for i, k in enumerate(p_keys)}
    both = [(i, p_index[k]) for i, k in enumerate(b_keys) if k in p_index]
    b = np.array([base["correct"][i] for i, _ in both], dtype=np.int8)
    p = np.array([pruned["correct"][j] for _, j in both], dtype=np.int8)
    return b, p


def flips(base: Mapping, pruned: Mapping) -> dict:
    """% of shared examples that went right->wrong and wrong->right, and their sum (% changed)."""
    b, p = paired_correctness(base, pruned)
    n = len(b)
    if n == 0:
        return {"examples": 0, "right_to_wrong_percent": None, "wrong_to_right_percent": None, "flips_percent": None}
    r2w = int(((b == 1) & (p == 0)).sum())
    w2r = int(((b == 0) & (p == 1)).sum())
    return {"examples": n, "right_to_wrong": r2w, "wrong_to_right": w2r,
            "right_to_wrong_percent": 100.0 * r2w / n, "wrong_to_right_percent": 100.0 * w2r / n,
            "flips_percent": 100.0 * (r2w + w2r) / n}


def task_flips(base_benchmark: Mapping, pruned_benchmark: Mapping) -> dict[str, dict]:
    """Flips for every task whose results in both benchmarks carry per-example ``samples``."""
    out = {}
    for task, b in (base_benchmark.get("tasks") or {}).items():
        p = (pruned_benchmark.get("tasks") or {}).get(task)
        if p and b.get("samples") and p.get("samples"):
            out[task] = flips(b["samples"], p["samples"])
    return out


# ------------------------------------------------------------------------------------------------
# The dense reference, cached once per (model, held-out text, k) next to the base results.

REFERENCE_SUBDIR = "fidelity_reference"


def _save_reference(path, reference: Mapping[str, torch.Tensor]) -> str:
    import hashlib

    from safetensors.torch import save_file

    with atomic.file(path) as tmp:
        save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    return digest


def _load_reference(path, sha256: str) -> dict[str, torch.Tensor] | None:
    import hashlib

    from safetensors.torch import load_file

    try:
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            return None
        ref = load_file(str(path))
    except (OSError, ValueError, RuntimeError):
        return None
    return ref if set(ref) == set(REFERENCE_KEYS) else None


def cached_reference(cache_dir, material: Mapping, compute, stale_after_s: float | None = None
                     ) -> tuple[dict[str, torch.Tensor], bool]:
    """``(reference, hit)``: the dense reference for ``material`` from the cache, else ``compute()``.

    The tensors live in ``<cache_dir>/fidelity_reference/<key>.safetensors`` (written atomically); the
    result cache (`depthbench.evaluation.result_cache`) holds a small manifest with the file's
    SHA-256, so a reference is reused only when its file is intact."""
    from pathlib import Path

    from depthbench.evaluation import result_cache

    key = result_cache.cache_key(material)
    path = Path(cache_dir) / REFERENCE_SUBDIR / f"{key}.safetensors"
    computed: dict = {}

    def manifest() -> dict:
        computed["reference"] = compute()
        sha = _save_reference(path, computed["reference"])
        return {"file": path.name, "sha256": sha, "tokens": int(computed["reference"]["topk_ids"].shape[0])}

    lock = {} if stale_after_s is None else {"stale_after_s": stale_after_s}
    entry, hit = result_cache.cached_result(cache_dir, material, manifest, "the dense fidelity reference", **lock)
    if not hit:
        return computed["reference"], False
    ref = _load_reference(path, entry.get("sha256", ""))
    if ref is None:  # manifest without an intact file: recompute and replace both
        ref = compute()
        result_cache.store(cache_dir, material, {"file": path.name, "sha256": _save_reference(path, ref),
                                                 "tokens": int(ref["topk_ids"].shape[0])})
        return ref, False
    return ref, True
