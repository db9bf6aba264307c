"""LaCo (Yang et al., EMNLP 2024 Findings): collapse layers into the layer below them while the output stays similar.

Merge (RDSC, the paper): layers l+1..l+m merge into layer l as
``theta*_l = theta_l + sum_{k=1..m} (theta_{l+k} - theta_l)`` over every linear weight and bias of the layer
(q, k, v, o, gate, up, down; `depthbench.modeling.adapters.ModelAdapter.linear_parameters`); layer l keeps its
norms, layers l+1..l+m are deleted. ``merge: notebook`` reproduces the reference notebooks' in-place bug
(cell 4 runs ``W_l.add_(W_{l+k} - W_l)`` on the copy, so W_l ends up equal to W_{l+m}, up to rounding),
computed the same way, in the model's dtype.

Similarity (cell 6): per calibration sentence, the cosine between the flattened ``[tokens x d]`` final hidden
states of the ORIGINAL model and of the merged candidate (real tokens only), averaged over sentences. The
notebooks read ``hidden_states[-1]``, which transformers takes after the final norm: that is the default;
``pre_norm: true`` compares ``h_L`` instead. Sentences are the first ``sentences`` calibration sequences
(the notebooks use 5 short Wikipedia prefixes; 0 = all).

Scan (cell 7), back to front: start at ``l = H - C``; while ``l >= lo``: merge ``m = min(C - 1, |M| - l - 1)``
layers into l; if the similarity is ``> T`` accept (the model becomes the candidate) and ``l -= I`` (and if
``l >= |M|``, ``l = |M| - 1 - C``), else ``l -= 1``. Merged layers can merge again. ``stop: threshold`` is
exactly that (the number removed is an outcome of T). ``stop: target`` (default) stops accepting at R layers
removed, shrinking the last merge to the remainder; where the scan falls short it lowers T by bisection (a
T below -1 accepts every candidate; whether that reaches R depends only on C, H, lo and L, checked before
any pass). Candidate similarities are memoised by merge history, so the bisection's scans share passes.

Defaults are the Llama-2-13B notebook's (C = 7, T = 0.45, I = 1, H = L - 1 = 39, lo = 0 for 40 layers); the
paper gives no rule for other depths. ``H = null`` means L - 1 (the notebook's 39 of 40); C counts the
target layer, so a merge removes up to C - 1 = 6 layers, 15% of the 13B model's depth: ``C = round(0.175 L)``
keeps that share on another depth (5 for 30 layers, 6 for 32), if wanted.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from depthbench.calibration.batches import first_sequences
from depthbench.errors import ConfigError
from depthbench.modeling.surgery import ModelSurgery
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.options import option
from depthbench.selection.blocks import Block

log = logging.getLogger(__name__)

MERGES = ("rdsc", "notebook")
STOPS = ("target", "threshold")
ACCEPT_ALL = -math.inf


# -- merging ----------------------------------------------------------------------------------------
@torch.no_grad()
def merge_weights(target: dict[str, torch.Tensor], sources: list[dict[str, torch.Tensor]], mode: str
                  ) -> dict[str, torch.Tensor]:
    """Merged linear weights of layer l (``target``) with layers l+1..l+m (``sources``), in the model's dtype.

    ``rdsc``: ``theta_l + sum_k (theta_{l+k} - theta_l)`` accumulated in float64 and cast back;
    ``notebook``: the reference's in-place sequence ``w.add_(theta_{l+k} - w)`` in the model's dtype."""
    out = {}
    for name, base in target.items():
        if mode == "rdsc":
            acc = base.to(torch.float64).clone()
            for src in sources:
                acc += src[name].to(torch.float64) - base.to(torch.float64)
            out[name] = acc.to(base.dtype)
        else:
            w = base.clone()
            for src in sources:
                w.add_(src[name] - w)
            out[name] = w
    return out


@dataclass(frozen=True)
class MergeState:
    """The model as the scan sees it: the original layers still present, and the merged weights of
    layers that absorbed others (original index -> {parameter name: tensor}); history of ``(l, m)``."""

    size: int
    alive: tuple[int, ...]
    weights: dict = field(default_factory=dict, compare=False, hash=False)
    history: tuple[tuple[int, int], ...] = ()

    @classmethod
    def initial(cls, num_layers: int) -> "MergeState":
        return cls(num_layers, tuple(range(num_layers)))

    @property
    def removed(self) -> list[int]:
        return sorted(set(range(self.size)) - set(self.alive))

    def merge(self, at: int, m: int, original: list[dict[str, torch.Tensor]], mode: str) -> "MergeState":
        """Merge current layers l+1..l+m into current layer l."""
        ids = [self.alive[j] for j in range(at, at + m + 1)]
        current = [self.weights.get(i, original[i]) for i in ids]
        weights = {k: v for k, v in self.weights.items() if k not in ids[1:]}
        weights[ids[0]] = merge_weights(current[0], current[1:], mode)
        alive = tuple(i for i in self.alive if i not in ids[1:])
        return MergeState(self.size, alive, weights, self.history + ((at, m),))


@dataclass
class ScanResult:
    state: MergeState
    threshold: float
    trace: list = field(default_factory=list)


def scan(num_layers: int, n_target: int | None, C: int, T: float, step: int, H: int, lo: int,
         candidate, similarity) -> ScanResult:
    """The notebook's scan (module docstring; ``step`` is its I). ``candidate(state, l, m)`` builds the merged
    state, ``similarity(state)`` scores it; ``n_target`` (``stop: target``) caps the layers removed."""
    state = MergeState.initial(num_layers)
    trace = []
    removed = 0
    at = H - C
    while at >= lo:
        size = len(state.alive)
        m = min(C - 1, size - at - 1)
        if n_target is not None:
            m = min(m, n_target - removed)
        if m < 1:
            at -= 1
            continue
        merged = candidate(state, at, m)
        s = similarity(merged)
        accepted = s > T
        trace.append({"l": at, "into": state.alive[at], "merged": list(state.alive[at + 1:at + m + 1]),
                      "similarity": s, "accepted": bool(accepted)})
        if accepted:
            state, removed = merged, removed + m
            if n_target is not None and removed >= n_target:
                break
            at -= step
            if at >= len(state.alive):
                at = len(state.alive) - 1 - C
        else:
            at -= 1
    return ScanResult(state, T, trace)


def capacity(num_layers: int, C: int, step: int, H: int, lo: int) -> int:
    """Layers the scan removes when it accepts every candidate (no forward pass needed)."""
    result = scan(num_layers, None, C, ACCEPT_ALL, step, H, lo,
                  lambda state, at, m: MergeState(num_layers, tuple(i for k, i in enumerate(state.alive)
                                                                   if not at < k <= at + m)),
                  lambda state: 1.0)
    return num_layers - len(result.state.alive)


# -- the similarity ----------------------------------------------------------------------------------
def first_sentences(batches: list[dict[str, torch.Tensor]], count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` calibration sequences (0 = all), as batches: LaCo's scoring subset, the rule of the
    other methods' ``score_samples`` (`depthbench.calibration.batches.first_sequences`)."""
    return first_sequences(batches, count)


@torch.no_grad()
def final_states(adapter, batches, pre_norm: bool) -> list[torch.Tensor]:
    """Per batch, the final hidden states [B, T, d] in float64 with padding zeroed: after the final norm
    (``hidden_states[-1]`` of transformers, the notebook's) or ``h_L`` before it (``pre_norm``)."""
    captured = {}

    def keep(h):
        captured["h"] = h.detach()

    if pre_norm:
        handle = adapter.observe_residual(adapter.num_layers, keep)
    else:
        handle = adapter.final_norm().register_forward_hook(lambda module, args, output: keep(output))
    device = adapter.embeddings().weight.device
    out = []
    try:
        for batch in batches:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            adapter.model(input_ids=ids, attention_mask=mask, use_cache=False)
            h = captured["h"]
            h = (h.float() if h.dtype in (torch.bfloat16, torch.float16) else h).to(torch.float64)
            out.append(h * mask.to(h.device, torch.float64).unsqueeze(-1))
    finally:
        handle.remove()
    return out


def sentence_cosines(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> torch.Tensor:
    """Cosine per sentence between the flattened [tokens x d] states (padding is zero in both)."""
    values = []
    for a, b in zip(reference, candidate):
        a, b = a.flatten(1), b.flatten(1)
        values.append((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(torch.finfo(torch.float64).tiny))
    return torch.cat(values)


@contextlib.contextmanager
def installed(adapter, state: MergeState):
    """The model computes ``state``: merged weights swapped into their layers (no copy), the absorbed
    layers skipped; everything restored on exit."""
    layers = adapter.decoder_layers()
    saved = []
    try:
        for index, weights in state.weights.items():
            params = adapter.linear_parameters(layers[index])
            for name, tensor in weights.items():
                saved.append((params[name], params[name].data))
                params[name].data = tensor
        with adapter.skipping(state.removed) if state.removed else contextlib.nullcontext():
            yield
    finally:
        for param, data in reversed(saved):
            param.data = data


# -- the pruner --------------------------------------------------------------------------------------
@pruner_registry.register("laco")
class LaCoPruner(Pruner):
    name = "laco"
    paper = "Yang et al. 2024, LaCo: Large Language Model Pruning via Layer Collapse (EMNLP 2024 Findings)"

    @dataclass
    class Options:
        merge: str = option("rdsc", "rdsc = the paper's merge theta_l + sum_k (theta_(l+k) - theta_l); notebook = the "
                                    "reference notebook's in-place bug (layer l ends up equal to layer l+m).")
        pre_norm: bool = option(False, "Compare h_L (before the final norm) instead of the notebook's "
                                       "hidden_states[-1] (after it).")
        C: int = option(7, "Layers per merge including the target (merges up to C-1 layers); notebook 7 for "
                           "Llama-2-13B (40 layers), 3 for Baichuan2-13B.")
        T: float = option(0.45, "Similarity threshold: a merge is accepted when the mean cosine is > T (notebook "
                                "0.45 for Llama-2-13B, 0.6 for Baichuan2-13B).")
        I: int = option(1, "Layers to step down after an accepted merge (notebook 1).")  # noqa: E741
        H: int | None = option(None, "Highest layer a merge may reach; the scan starts at l = H - C (null = L - 1, "
                                     "the notebook's 39 for 40 layers).")
        lo: int = option(0, "Lowest layer the scan visits (notebook 0).")
        stop: str = option("target", "target = exactly round(r L) layers removed (the last merge shrinks to the "
                                     "remainder; T lowered by bisection if the scan falls short); threshold = the "
                                     "notebook (the number removed follows from T).")
        sentences: int = option(5, "Calibration sequences the similarity is measured on (notebook: 5 short "
                                   "sentences; 0 = all).")
        bisection_steps: int = option(12, "Scans of the bisection on T when stop=target falls short.")

    def validate_options(self) -> None:
        o = self.options
        if o.merge not in MERGES:
            raise ConfigError(f"laco merge={o.merge!r}; allowed: {', '.join(MERGES)}")
        if o.stop not in STOPS:
            raise ConfigError(f"laco stop={o.stop!r}; allowed: {', '.join(STOPS)}")
        for key, low in (("C", 2), ("I", 1), ("lo", 0), ("sentences", 0), ("bisection_steps", 0)):
            if getattr(o, key) < low:
                raise ConfigError(f"laco {key}={getattr(o, key)!r}; allowed: an integer >= {low}")
        if not math.isfinite(o.T):
            raise ConfigError(f"laco T={o.T!r}; allowed: a finite number (a cosine threshold)")

    def highest(self, num_layers: int) -> int:
        return num_layers - 1 if self.options.H is None else self.options.H

    def check_feasible(self, num_layers: int, n_remove: int) -> None:
        super().check_feasible(num_layers, n_remove)
        o = self.options
        H = self.highest(num_layers)
        if not 0 <= H <= num_layers - 1 or H - o.C < o.lo:
            raise ConfigError(f"laco H={H}, C={o.C}, lo={o.lo} leave no merge for {num_layers} layers; allowed: "
                              f"lo <= H - C and H <= {num_layers - 1}")
        if o.stop == "target":
            most = capacity(num_layers, o.C, o.I, H, o.lo)
            if most < n_remove:
                raise ConfigError(f"laco: with C={o.C}, I={o.I}, H={H}, lo={o.lo} the scan removes at most {most} of "
                                  f"{num_layers} layers even accepting every merge; {n_remove} requested")

    def statistics(self, adapter, n_remove):
        return []  # the similarity needs the merged candidates: `select` runs its own passes

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        o = self.options
        L = adapter.num_layers
        sentences = first_sentences(service.batches, o.sentences)
        reference = final_states(adapter, sentences, o.pre_norm)
        original = [{name: p.data for name, p in adapter.linear_parameters(layer).items()}
                    for layer in adapter.decoder_layers()]
        memo: dict = {}
        bar = tqdm(desc=f"{self.name}: merged candidates", unit="pass", disable=not service.progress, leave=False)

        def similarity(state: MergeState) -> float:
            if state.history not in memo:
                with installed(adapter, state):
                    memo[state.history] = float(sentence_cosines(reference, final_states(adapter, sentences,
                                                                                        o.pre_norm)).mean())
                bar.update(1)
            return memo[state.history]

        def candidate(state, at, m):
            return state.merge(at, m, original, o.merge)

        H = self.highest(L)
        target = n_remove if o.stop == "target" else None
        try:
            result = scan(L, target, o.C, o.T, o.I, H, o.lo, candidate, similarity)
            bisection = []
            if target is not None and L - len(result.state.alive) < target:
                result, bisection = self._bisect(result, L, target, H, candidate, similarity)
        finally:
            bar.close()
        state = result.state
        removed = sorted(set(range(L)) - set(state.alive))
        merges = _merge_groups(result.trace)
        log.info("laco: removed %d layers at T=%.4g (%d merged-model passes)", len(removed), result.threshold,
                 len(memo))
        return Selection(
            removed_layers=removed,
            blocks=[Block(k, k + 1) for k in removed],
            scores={"metric": "mean over sentences of cos(flattened final hidden states of the original model, of "
                              f"the merged candidate) ({'h_L' if o.pre_norm else 'after the final norm'})",
                    "threshold_used": result.threshold, "threshold_option": o.T, "bisection": bisection,
                    "scan": result.trace, "merges": merges, "history": [list(h) for h in state.history],
                    "sentences": sum(int(b["input_ids"].shape[0]) for b in sentences),
                    "merged_model_passes": len(memo), "requested": n_remove})

    def _bisect(self, short: ScanResult, L: int, target: int, H: int, candidate, similarity):
        """Lower T until the scan reaches ``target``: T below -1 accepts everything (feasible by
        `check_feasible`); bisect between it and the option's T, keeping the largest T that reaches it."""
        o = self.options
        everything = scan(L, target, o.C, ACCEPT_ALL, o.I, H, o.lo, candidate, similarity)
        # a finite T below every similarity on that path takes the same path
        low = min([-1.0] + [t["similarity"] for t in everything.trace]) - 1e-9
        best, high = ScanResult(everything.state, low, everything.trace), o.T
        history = [{"T": o.T, "removed": L - len(short.state.alive)},
                   {"T": low, "removed": L - len(everything.state.alive)}]
        for _ in range(o.bisection_steps):
            mid = 0.5 * (low + high)
            attempt = scan(L, target, o.C, mid, o.I, H, o.lo, candidate, similarity)
            reached = L - len(attempt.state.alive)
            history.append({"T": mid, "removed": reached})
            if reached >= target:
                low, best = mid, attempt
            else:
                high = mid
        log.info("laco: the scan at T=%.4g removed %d of %d layers; T lowered by bisection to %.4g", o.T,
                 history[0]["removed"], target, best.threshold)
        return best, history

    def apply(self, adapter, selection, replacement, service) -> dict:
        o = self.options
        original = [{name: p.data for name, p in adapter.linear_parameters(layer).items()}
                    for layer in adapter.decoder_layers()]
        state = MergeState.initial(adapter.num_layers)
        for at, m in selection.scores["history"]:
            state = state.merge(at, m, original, o.merge)
        layers = adapter.decoder_layers()
        with torch.no_grad():
            for index, weights in state.weights.items():
                params = adapter.linear_parameters(layers[index])
                for name, tensor in weights.items():
                    params[name].data = tensor.clone()
        if state.removed:
            ModelSurgery(adapter).remove_layers(state.removed)
        return {"type": "laco_merge", "merge": o.merge, "merges": selection.scores["merges"],
                "new_parameters": 0}


def _merge_groups(trace: list[dict]) -> list[dict]:
    """Accepted merges (original indices), in scan order."""
    return [{"into": t["into"], "merged": t["merged"], "similarity": t["similarity"]} for t in trace if t["accepted"]]
