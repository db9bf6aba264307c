"""MKA (Liu et al. 2024, "Pruning via Merging: Compressing LLMs via Manifold Alignment Based Layer Merging"):
merge layers with coefficients from a diffusion-map similarity of their activations (NPIB).

1. Activations: ``h_k``, the input of layer k, k = 0..L-1, of the DENSE model, per calibration sequence cut or
   zero-padded to ``positions`` (`depthbench.calibration.prompt_sequences`), one hooked pass, float32 on disk.
2. Points (``points``): ``prompt`` = one point per sequence, the flattened ``positions x d`` array (what the n x n
   kernel means); ``reference`` = the reference's bug: its chunked distance keeps only the first chunk of token
   rows, i.e. for n <= 100 tokens 0..n-1 of the first sequence (`reference_distances`, general n included).
3. Per layer, the diffusion map of the points (`diffusion_map`, sigma = 8, alpha = 0.5, d = 2), its two coordinates
   rank-normalised per column (`rank_normalise`).
4. NPIB for every pair i <= j (`npib_matrix`): ``S_ij = MI(Y_i, Y_j) / sqrt(H_i H_j)``, MI the mean of sklearn's
   ``mutual_info_regression(Y_i, Y_j[:, c], n_neighbors=5)`` over c and both features (seeded:
   ``random_state``), H the k-NN entropy with k = 50 (`knn_entropy`); NaN where H_i, H_j differ in sign.
5. R merges (`plan_merges`): ``pair: last`` (the reference) merges the last two layers of the current model R
   times (L-1 into L-2, that into L-3, ...); ``most_similar_adjacent`` the adjacent pair with the highest S.
   Coefficient ``alpha = sigmoid(beta s_i / (s_i + s_j))``, ``s_i`` the mean of row i of S (``alpha: npib``), or
   ``alpha = S_ij`` (``alpha: similarity``).
6. Merge (``merge``): ``interpolate`` = ``theta_l <- alpha theta_l + (1 - alpha) theta_(l+1)`` over the layer's
   linear weights and biases (float64, cast back; layer l keeps its norms), layer l+1 removed; ``reference`` = the
   reference's no-op merge (it writes into a ``state_dict()`` copy), i.e. only the removal: reverse-order pruning
   for ``pair: last``.

Positions: S is the dense model's, indexed by dense layers. A layer of the current model is identified with the
dense layer it started as (merges write into the lower layer of a pair, which keeps its identity), so the current
pair (i, i+1) reads S at (alive[i], alive[i+1]). For ``pair: last`` that is exactly the reference's current-index
lookup: only the tail is merged, so alive[i] = i for every i that is read.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from depthbench.calibration.prompt_sequences import PromptSequences, virtual_rows
from depthbench.errors import ConfigError, NumericalError
from depthbench.modeling.surgery import ModelSurgery
from depthbench.pruners.base import Pruner, Selection, pruner_registry
from depthbench.pruners.options import option
from depthbench.selection.blocks import Block, merge_touching

log = logging.getLogger(__name__)

POINTS = ("prompt", "reference")
PAIRS = ("last", "most_similar_adjacent")
ALPHAS = ("npib", "similarity")
MERGES = ("interpolate", "reference")
#: The reference's constants (pipeline.py :732, :744): kernel scale, density normalisation, embedding dimension,
#: neighbours of the MI estimate, neighbour of the entropy estimate.
SIGMA, DENSITY_ALPHA, DIMENSIONS, MI_NEIGHBORS, ENTROPY_K = 8.0, 0.5, 2, 5, 50
#: The reference's chunked distance: the largest divisor of n up to this size.
REFERENCE_CHUNK = 100


# -- distances --------------------------------------------------------------------------------------
def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``a`` and ``b``, float64 (both shifted by their common mean first,
    which leaves distances unchanged and keeps the Gram expansion free of cancellation)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    centre = np.concatenate([a, b]).mean(0)
    a, b = a - centre, b - centre
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def prompt_distances(sequences) -> np.ndarray:
    """``points: prompt``: distances between the sequences flattened to ``positions * d`` (the zero positions past
    the stored width add nothing), float64, zero diagonal."""
    flat = np.asarray(sequences[:], np.float64).reshape(sequences.shape[0], -1)
    out = pairwise_distances(flat, flat)
    np.fill_diagonal(out, 0.0)
    return out


def reference_chunk(n: int) -> int:
    """The reference's ``adaptive_chunk_size``: the largest divisor of n up to 100."""
    return next(size for size in range(min(n, REFERENCE_CHUNK), 0, -1) if n % size == 0)


def reference_distances(sequences, positions: int) -> np.ndarray:
    """``points: reference``: for every pair of chunk starts (i, j), the block ``D[i:i+c, j:j+c]`` is the distance
    between the first c token rows of sequences i..i+c-1 flattened to ``(c * positions, d)`` rows and those of j,
    with the block's diagonal set to 0 (the reference zeroes it on the first chunk its generator yields, which is
    every block it keeps). For n <= 100, c = n: tokens 0..n-1 of the first sequence."""
    n = sequences.shape[0]
    c = reference_chunk(n)
    starts = list(range(0, n, c))
    rows = {i: virtual_rows(sequences, positions, i * positions, c) for i in starts}
    out = np.zeros((n, n))
    for i in starts:
        for j in starts:
            block = pairwise_distances(rows[i], rows[j])
            np.fill_diagonal(block, 0.0)
            out[i:i + c, j:j + c] = block
    return out


# -- the diffusion map, entropy, NPIB ---------------------------------------------------------------
@dataclass
class DiffusionMap:
    coordinates: np.ndarray  # [n, dims]: U[:, 1:dims+1] / U[:, 0]
    singular_values: np.ndarray  # the top dims + 1 of A (the first is 1)
    regularisation_steps: int  # identity shifts the conditioning loop added


def diffusion_map(distances: np.ndarray, sigma: float = SIGMA, alpha: float = DENSITY_ALPHA,
                  dims: int = DIMENSIONS) -> DiffusionMap:
    """The reference's ``diffusionKernel`` on a distance matrix, in float64: ``K = exp(-sqrt(D / sigma))``;
    ``K1 = K / (p_i p_j)^alpha`` with p the column sums; ``A = K1 / (v_i v_j)``, v = sqrt(column sums of K1);
    while cond(A) is infinite (at most 10 times) A += 1e-6 * 10^t I; NaN -> 0; |A| < 1e-12 -> 1e-12; then
    ``U = svd(A).U[:, :dims+1]``, a zero in U[:, 0] -> 1e-8, ``Y = (U / U[:, 0])[:, 1:]``."""
    K = np.exp(-np.sqrt(np.asarray(distances, np.float64) / sigma))
    p = K.sum(0)
    K1 = K / np.outer(p, p) ** alpha
    v = np.sqrt(K1.sum(0))
    A = K1 / np.outer(v, v)
    steps, shift = 0, 1e-6
    while steps < 10 and np.isinf(np.linalg.cond(A)):
        A = A + shift * np.eye(A.shape[0])
        shift *= 10
        steps += 1
    A = np.nan_to_num(A)
    A[np.abs(A) < 1e-12] = 1e-12
    U, S, _ = np.linalg.svd(A, full_matrices=False)
    U = U[:, :dims + 1].copy()
    U[:, 0] = np.where(U[:, 0] == 0, 1e-8, U[:, 0])
    return DiffusionMap((U / U[:, :1])[:, 1:], S[:dims + 1].copy(), steps)


def rank_normalise(y: np.ndarray) -> np.ndarray:
    """Each column's ranks divided by n, ``argsort(argsort(y)) / n`` (non-finite values counted as 0, as the
    reference's ``nan_to_num``; ties in order of appearance)."""
    y = np.nan_to_num(np.asarray(y, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.argsort(np.argsort(y, axis=0, kind="stable"), axis=0, kind="stable") / y.shape[0]


def knn_entropy(x: np.ndarray, k: int = ENTROPY_K) -> float:
    """``-mean log(k / (n r_k^d))``, r_k the distance of each point to its k-th nearest other point, d the number
    of columns (2 for MKA: the spec's r_k^2)."""
    x = np.asarray(x, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n, d = x.shape
    if not 0 < k < n:
        raise ConfigError(f"mka: the entropy's k={k}-th neighbour needs more than {k} points; got {n}")
    r = np.sort(pairwise_distances(x, x), axis=1)[:, k]  # column 0 is the point itself
    with np.errstate(divide="ignore"):
        return float(-np.mean(np.log(k / (n * r ** d))))


def mutual_information(y_i: np.ndarray, y_j: np.ndarray, neighbors: int, random_state: int) -> float:
    """The mean over the columns c of y_j of sklearn's ``mutual_info_regression(y_i, y_j[:, c])`` (itself one value
    per column of y_i, averaged); ``random_state`` fixes sklearn's jitter."""
    from sklearn.feature_selection import mutual_info_regression

    return float(np.mean([np.mean(mutual_info_regression(y_i, y_j[:, c], discrete_features=False,
                                                         n_neighbors=neighbors, random_state=random_state))
                          for c in range(y_j.shape[1])]))


@dataclass
class Similarity:
    S: np.ndarray  # [L, L], symmetric
    entropy: np.ndarray  # [L]
    nan_pairs: list  # (i, j), i <= j, where H_i and H_j differ in sign


def npib_matrix(embeddings: list[np.ndarray], neighbors: int = MI_NEIGHBORS, k: int = ENTROPY_K,
                random_state: int = 1, progress: bool = False) -> Similarity:
    """``S_ij = MI(Y_i, Y_j) / sqrt(H_i H_j)`` for every i <= j (mirrored); NaN where H_i H_j < 0."""
    L = len(embeddings)
    H = np.array([knn_entropy(y, k) for y in embeddings])
    S = np.full((L, L), np.nan)
    nan_pairs = []
    pairs = [(i, j) for i in range(L) for j in range(i, L)]
    for i, j in tqdm(pairs, desc="mka: NPIB pairs", unit="pair", disable=not progress, leave=False):
        product = H[i] * H[j]
        if product < 0:
            nan_pairs.append((i, j))
            continue
        mi = mutual_information(embeddings[i], embeddings[j], neighbors, random_state)
        with np.errstate(divide="ignore", invalid="ignore"):
            S[i, j] = S[j, i] = mi / np.sqrt(product)
    if nan_pairs:
        log.warning("mka: %d of %d NPIB pairs are NaN (layer entropies of opposite signs): %s", len(nan_pairs),
                    len(pairs), nan_pairs[:10])
    return Similarity(S, H, nan_pairs)


# -- which layers merge, with which coefficient ----------------------------------------------------
def npib_alpha(s_i: float, s_j: float, beta: float = 1.0) -> float:
    """``sigmoid(beta s_i / (s_i + s_j))``: the share of the lower layer."""
    return float(1.0 / (1.0 + math.exp(-beta * s_i / (s_i + s_j))))


def layer_means(S: np.ndarray) -> np.ndarray:
    """``s_i``: the mean of row i of S over all L columns, self included (NaN entries left out)."""
    with np.errstate(invalid="ignore"):
        return np.array([np.nanmean(row) if np.isfinite(row).any() else np.nan for row in S])


def plan_merges(S: np.ndarray, n_remove: int, pair: str = "last", alpha: str = "npib", beta: float = 1.0
                ) -> list[dict]:
    """The R merges in order, in dense numbering: ``into`` absorbs ``merged`` with coefficient ``alpha`` (module
    docstring: a current layer is the dense layer it started as)."""
    L = S.shape[0]
    s = layer_means(S)
    alive = list(range(L))
    merges = []
    for _ in range(n_remove):
        if pair == "last":
            at = len(alive) - 2
        else:
            scores = [S[alive[i], alive[i + 1]] for i in range(len(alive) - 1)]
            finite = [(-v, i) for i, v in enumerate(scores) if np.isfinite(v)]
            if not finite:
                raise NumericalError(f"mka pair=most_similar_adjacent: every adjacent S is NaN among layers {alive}; "
                                     f"use pair=last")
            at = min(finite)[1]  # highest S, lowest position on ties
        a, b = alive[at], alive[at + 1]
        coefficient = npib_alpha(s[a], s[b], beta) if alpha == "npib" else float(S[a, b])
        if not math.isfinite(coefficient):
            raise NumericalError(f"mka: merge coefficient of layers {a} <- {b} is {coefficient} (alpha={alpha}, "
                                 f"S={S[a, b]}, s=({s[a]}, {s[b]})); "
                                 f"{'use alpha=npib' if alpha == 'similarity' else 'the NPIB matrix is degenerate'}")
        merges.append({"position": at, "into": a, "merged": b, "alpha": coefficient, "similarity": float(S[a, b]),
                       "s_into": float(s[a]), "s_merged": float(s[b])})
        del alive[at + 1]
    return merges


# -- the merge -------------------------------------------------------------------------------------
@torch.no_grad()
def interpolate_into(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], alpha: float) -> None:
    """``target <- alpha target + (1 - alpha) source`` in place, per tensor, computed in float64 and cast back."""
    for name, t in target.items():
        mixed = alpha * t.to(torch.float64) + (1 - alpha) * source[name].to(t.device, torch.float64)
        t.copy_(mixed.to(t.dtype))


def _json(x: np.ndarray):
    """Array -> nested lists with NaN as None (JSON-able)."""
    return [_json(v) for v in x] if np.ndim(x) > 0 else (float(x) if np.isfinite(x) else None)


# -- the pruner ------------------------------------------------------------------------------------
@pruner_registry.register("mka")
class MKAPruner(Pruner):
    name = "mka"
    paper = ("Liu et al. 2024, Pruning via Merging: Compressing LLMs via Manifold Alignment Based Layer Merging "
             "(arXiv 2406.16330)")

    @dataclass
    class Options:
        points: str = option("prompt", "prompt = one diffusion-map point per calibration sequence (its positions x d "
                                       "activations flattened); reference = the reference's bug, the first n token "
                                       "rows of the first sequence.")
        positions: int = option(512, "Positions per sequence: real tokens cut to this many, then zero-padded "
                                     "(reference 512).")
        pair: str = option("last", "last = merge the last two layers of the current model, R times (reference); "
                                   "most_similar_adjacent = the adjacent pair with the highest NPIB similarity.")
        alpha: str = option("npib", "npib = sigmoid(beta s_i / (s_i + s_j)), s_i the mean NPIB of layer i "
                                    "(reference); similarity = S_ij itself.")
        beta: float = option(1.0, "Temperature of the npib coefficient (reference 1).")
        merge: str = option("interpolate", "interpolate = theta_l <- alpha theta_l + (1 - alpha) theta_(l+1) (the "
                                           "paper); reference = the reference's no-op merge, only layer l+1 is "
                                           "removed (reverse-order pruning with pair=last).")
        random_state: int = option(1, "Seed of sklearn's mutual_info_regression jitter (reference seed 1).")

    def validate_options(self) -> None:
        o = self.options
        for key, allowed in (("points", POINTS), ("pair", PAIRS), ("alpha", ALPHAS), ("merge", MERGES)):
            if getattr(o, key) not in allowed:
                raise ConfigError(f"mka {key}={getattr(o, key)!r}; allowed: {', '.join(allowed)}")
        if o.positions < 1:
            raise ConfigError(f"mka positions={o.positions!r}; allowed: an integer >= 1")
        if not math.isfinite(o.beta):
            raise ConfigError(f"mka beta={o.beta!r}; allowed: a finite number")
        if not 0 <= o.random_state < 2**32:
            raise ConfigError(f"mka random_state={o.random_state!r}; allowed: an integer in [0, 2^32)")

    def check_calibration(self, n_samples: int, seq_len: int) -> None:
        self.check_samples(n_samples)

    @staticmethod
    def check_samples(n_samples: int) -> None:
        """The entropy's 50th neighbour needs more than 50 points (sequences, or token rows with points=reference,
        whose count is n too)."""
        if n_samples <= ENTROPY_K:
            raise ConfigError(f"mka: calibration.n_samples={n_samples}; allowed: at least {ENTROPY_K + 1} (the "
                              f"entropy estimate reads each point's {ENTROPY_K}th neighbour)")

    def statistics(self, adapter, n_remove):
        return []  # the activations are spilled to a scratch directory that `select` owns

    def select(self, statistics, adapter, n_remove, service) -> Selection:
        o = self.options
        n = service.calibration.n_samples
        self.check_samples(n)  # before the pass
        L = adapter.num_layers
        longest = max(int(b["input_ids"].shape[1]) for b in service.batches)
        width = min(o.positions, longest)
        embeddings, maps = [], []
        with service.scratch("depthbench-mka-") as tmp:
            (stat,) = service.original([PromptSequences(list(range(L)), adapter.hidden_size, width, tmp)],
                                       "activations h_0..h_(L-1)")
            for k in tqdm(range(L), desc="mka: diffusion maps", unit="layer", disable=not service.progress,
                          leave=False):
                sequences = stat.open(k)
                D = prompt_distances(sequences) if o.points == "prompt" else reference_distances(sequences,
                                                                                                 o.positions)
                del sequences
                maps.append(diffusion_map(D))
                embeddings.append(rank_normalise(maps[-1].coordinates))
        sim = npib_matrix(embeddings, random_state=o.random_state, progress=service.progress)
        merges = plan_merges(sim.S, n_remove, o.pair, o.alpha, o.beta)
        removed = sorted(m["merged"] for m in merges)
        log.info("mka: %d merges (%s): %s", len(merges), o.pair,
                 ", ".join(f"{m['into']}<-{m['merged']} (alpha {m['alpha']:.4f})" for m in merges))
        return Selection(
            removed_layers=removed,
            blocks=merge_touching([Block(k, k + 1) for k in removed]),
            scores={"metric": "NPIB of rank-normalised diffusion maps of h_k (dense model)",
                    "S": _json(sim.S), "s": _json(layer_means(sim.S)), "entropy": _json(sim.entropy),
                    "nan_count": len(sim.nan_pairs), "nan_pairs": [list(p) for p in sim.nan_pairs],
                    "merges": merges, "singular_values": [_json(m.singular_values) for m in maps],
                    "regularisation_steps": [m.regularisation_steps for m in maps],
                    "points": o.points, "n_points": n, "positions": o.positions, "stored_positions": width,
                    "random_state": o.random_state, "requested": n_remove})

    def apply(self, adapter, selection, replacement, service) -> dict:
        o = self.options
        merges = selection.scores["merges"]
        if o.merge == "interpolate":
            layers = adapter.decoder_layers()  # dense numbering: nothing is removed before the merges are done
            for m in merges:
                target = {k: p.data for k, p in adapter.linear_parameters(layers[m["into"]]).items()}
                source = {k: p.data for k, p in adapter.linear_parameters(layers[m["merged"]]).items()}
                interpolate_into(target, source, m["alpha"])
        ModelSurgery(adapter).remove_layers([m["merged"] for m in merges])
        return {"type": "mka_merge", "merge": o.merge,
                "merges": [{k: m[k] for k in ("into", "merged", "alpha")} for m in merges], "new_parameters": 0}
