"""How good is the top-k storage of the dense side? Exact KL(dense || pruned) against the top-k
approximation and its stated bound (`depthbench.evaluation.fidelity`), on SmolLM2 and its held-out text.

    .venv/bin/python benchmarks/fidelity_topk.py [--windows 8] [--remove 11-18] [--k 16,64,256,1024]

The pruned model removes a fixed block of layers (default 11..18: UIDL's choice at 25% in the demo on the former
default text, BIG-bench Wikipedia).
Exact KL is computed from both full distributions in float64. Prints one Markdown table row per k:
mean exact KL, mean approximate KL, mean and max error, mean bound, and the fraction of tokens whose
bound holds (must be 100%).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--remove", default="11-18", help="first-last layer (inclusive) to remove")
    parser.add_argument("--k", default="16,64,256,1024")
    args = parser.parse_args()
    from depthbench.evaluation import fidelity as fid
    from depthbench.evaluation.perplexity import heldout_windows
    from depthbench.modeling.adapters import adapter_for
    from depthbench.modeling.surgery import ModelSurgery
    from depthbench.modeling.loading import load_model
    from depthbench.benchmarks._config import compose

    cfg = compose(f"evaluation.perplexity.max_windows={args.windows}")
    loaded = load_model(cfg.model)
    dense = loaded.model.eval()
    pruned = copy.deepcopy(dense)
    first, last = map(int, args.remove.split("-"))
    ModelSurgery(adapter_for(pruned)).remove_layers(list(range(first, last + 1)))
    windows = heldout_windows(cfg.evaluation.perplexity, loaded.tokenizer)
    ks = [int(k) for k in args.k.split(",")]
    rows = {k: {"exact": [], "approx": [], "bound": []} for k in ks}
    with torch.no_grad():
        for batch in windows.batches:
            keep, _ = fid._positions(batch)
            lp = fid._log_probs(dense, batch, "cpu")[keep]
            lq = fid._log_probs(pruned, batch, "cpu")[keep]
            exact = (lp.double().exp() * (lp.double() - lq.double())).sum(-1)
            for k in ks:
                values, ids = lp.topk(k, -1)
                ref = {"topk_logprobs": values, "topk_ids": ids.int(),
                       "tail_logmass": lp.scatter(-1, ids, float("-inf")).logsumexp(-1)}
                s = fid.token_statistics(lq, ref)
                rows[k]["exact"].append(exact)
                rows[k]["approx"].append(s["kl"])
                rows[k]["bound"].append(s["kl_error_bound"])
    print(f"SmolLM2-135M-Instruct ({cfg.model.dtype}), layers {first}..{last} removed, "
          f"{args.windows} held-out windows x {cfg.evaluation.perplexity.seq_len} tokens; "
          f"`python benchmarks/fidelity_topk.py {' '.join(sys.argv[1:])}`\n")
    print("| k | bytes/token | exact KL | top-k KL | mean error | max error | mean bound | bound holds |")
    print("|---|---|---|---|---|---|---|---|")
    for k in ks:
        e, a, b = (torch.cat(rows[k][x]) for x in ("exact", "approx", "bound"))
        err = e - a
        holds = ((err >= -1e-5) & (err <= b + 1e-5)).double().mean()
        print(f"| {k} | {fid.bytes_per_token(k)} | {e.mean():.4f} | {a.mean():.4f} | {err.mean():.4f} | "
              f"{err.max():.4f} | {b.mean():.4f} | {100 * holds:.1f}% |")


if __name__ == "__main__":
    main()
