"""How much of the trained replacements' MSE objectives the first token of each window carries (issue #15's
first lead): on SmolLM2 over calibration windows, for a removed block [s, e) (default: 11..18, the block the
cosine criterion picks at 25% on the former default text, BIG-bench Wikipedia),

- the per-token squared error of dropping the block, ||h_s - h_e||^2 (UIDL's error, and ReplaceMe's mse
  objective at T = I, since Y + M = h_s), by position in the window;
- ReplaceMe's mse objective ||Y + M T - h_e||^2 at its least-squares optimum T* fitted on every token, and at
  T*' fitted without the windows' first tokens, each split into first-token and other-token parts;
- the residual-stream norms ||h_s|| at position 0 and elsewhere;
- the conditioning of the mse objective (eigenvalues of M^T M / n, with and without the first tokens) and the
  distance of the least-squares T from the identity Adam starts at: what bounds a first-order fit's speed.

With W-token windows the first token is 1 / W of the tokens: its share of an objective says how far a fit of
that objective is a fit of those few tokens. Sums in float64; the least squares by Cholesky on the float64
normal equations (ridge 1e-6 x mean diagonal, stated in the record).

    .venv/bin/python benchmarks/objective_by_position.py [--samples 32] [--seq-len 256] [--start 11 --end 19] \\
        [--output docs/objective_by_position.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from depthbench.benchmarks._record import emit, machine_fields


def conditioning(m: torch.Tensor) -> dict:
    """Spectrum of the mse objective's Hessian in T, ``M^T M / n`` (the same for every column of T): its
    extreme eigenvalues and condition number. Gradient descent on a quadratic needs about kappa steps per
    e-fold of the error along the flattest direction."""
    eig = torch.linalg.eigvalsh(m.T @ m / m.shape[0])
    return {"eig_max": float(eig[-1]), "eig_min": float(eig[0]), "eig_median": float(eig.median()),
            "condition_number": float(eig[-1] / eig[0])}


def distance(delta: torch.Tensor) -> dict:
    """How far the least-squares T is from the identity that Adam starts from. Adam moves each entry by
    about lr per step at most (Kingma & Ba 2015, section 2.1), so an entry at distance D needs >= D / lr steps."""
    return {"max_abs_entry": float(delta.abs().max()), "rms_entry": float(delta.pow(2).mean().sqrt()),
            "frobenius": float(delta.norm()),
            "min_adam_steps": {f"lr={lr:g}": float(delta.abs().max()) / lr for lr in (1e-4, 1e-3)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--start", type=int, default=11, help="first removed layer s")
    parser.add_argument("--end", type=int, default=19, help="first kept layer after the block, e")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    from depthbench.benchmarks._config import compose
    from depthbench.calibration.batches import load_calibration
    from depthbench.modeling.adapters import adapter_for
    from depthbench.modeling.loading import load_model

    cfg = compose(f"calibration.n_samples={args.samples}", f"calibration.seq_len={args.seq_len}", "model.dtype=float32")
    loaded = load_model(cfg.model, device="cpu")
    adapter = adapter_for(loaded.model)
    batches = load_calibration(cfg.calibration, loaded.tokenizer).batches
    s, e = args.start, args.end
    seen: dict[str, torch.Tensor] = {}
    handles = [adapter.observe_residual(s, lambda h: seen.__setitem__("h_s", h.detach())),
               adapter.observe_residual(e, lambda h: seen.__setitem__("h_e", h.detach())),
               adapter.observe_mlp_output(s - 1, lambda m: seen.__setitem__("m", m.detach()))]
    rows = {"h_s": [], "h_e": [], "m": [], "position": []}
    with torch.no_grad():
        for batch in batches:
            loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            mask = batch["attention_mask"].bool()
            positions = mask.long().cumsum(1) - 1  # position within the real tokens (padding on either side)
            for key in ("h_s", "h_e", "m"):
                rows[key].append(seen[key][mask].to(torch.float64))
            rows["position"].append(positions[mask])
    for handle in handles:
        handle.remove()
    h_s, h_e, m, pos = (torch.cat(rows[k]) for k in ("h_s", "h_e", "m", "position"))
    first = pos == 0
    y = h_s - m  # Y: the residual stream before layer s-1's MLP output is added (h_s = Y + M)

    def parts(err: torch.Tensor) -> dict:
        total = float(err.sum())
        return {"mean_per_token": total / err.numel(), "first_token_share": float(err[first].sum()) / total,
                "first_token_mean": float(err[first].mean()), "other_token_mean": float(err[~first].mean())}

    def ls(rows_mask: torch.Tensor) -> torch.Tensor:
        a = m[rows_mask].T @ m[rows_mask]
        b = m[rows_mask].T @ (h_e - y)[rows_mask]
        ridge = 1e-6 * float(a.diagonal().mean())
        chol = torch.linalg.cholesky(a + ridge * torch.eye(a.shape[0], dtype=a.dtype))
        return torch.cholesky_solve(b, chol)

    def objective(t: torch.Tensor) -> torch.Tensor:
        return ((y + m @ t - h_e) ** 2).sum(-1)

    t_all, t_rest = ls(torch.ones_like(first)), ls(~first)
    identity = torch.eye(m.shape[1], dtype=m.dtype)
    norms = h_s.norm(dim=-1)
    record = {
        "what": f"SmolLM2 float32, block [{s}, {e}), {args.samples} x {args.seq_len} calibration tokens "
                "(per document windows, as the default calibration)",
        "samples": args.samples, "seq_len": args.seq_len, "block": [s, e],
        "tokens": int(pos.numel()), "first_tokens": int(first.sum()),
        "first_token_fraction_of_tokens": float(first.float().mean()),
        "residual_norm_h_s": {"first_token_mean": float(norms[first].mean()),
                              "other_token_mean": float(norms[~first].mean())},
        "drop_block_error": parts(((h_s - h_e) ** 2).sum(-1)),
        "replaceme_mse_at_ls_all_tokens": parts(objective(t_all)),
        "replaceme_mse_at_ls_without_first_tokens": parts(objective(t_rest)),
        "ls_ridge": "1e-6 x mean diagonal of M^T M",
        "conditioning": {"all_tokens": conditioning(m), "without_first_tokens": conditioning(m[~first])},
        "ls_distance_from_identity": distance(t_all - identity),
        "ls_distance_from_identity_whitened": distance(
            torch.linalg.cholesky(m.T @ m / m.shape[0]).T @ (t_all - identity)),
        **machine_fields(),
    }
    emit(record, args.output)


if __name__ == "__main__":
    main()
