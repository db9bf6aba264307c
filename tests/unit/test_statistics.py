import numpy as np
import torch

from depthbench.calibration.statistics import (
    MLP_OUT,
    RESIDUAL,
    LinearMapMoments,
    PairwiseSimilarity,
    Statistic,
    collect,
)
from depthbench.modeling.adapters import adapter_for
from tests.helpers import random_batches
from tests.reference import manual_llama_forward


class _Recorder(Statistic):
    """Keeps every captured tensor (test only)."""

    def __init__(self, points):
        self.points, self.seen = points, []

    def hook_points(self):
        return set(self.points)

    def update(self, batch):
        self.seen.append({p: batch.points[p].clone() for p in self.points})


# transformers runs RMSNorm and rotary tables in float32 even in a float64 model, so the float64
# manual forward agrees to about 1e-8, not 1e-15; a hook on the wrong layer would be off by O(1).
TOL = dict(rtol=1e-6, atol=1e-7)


def test_hooks_match_manual_layer_by_layer_forward(tiny_llama64):
    adapter = adapter_for(tiny_llama64)
    L = adapter.num_layers
    batch = random_batches(n_batches=1, ragged=False)[0]
    points = [(RESIDUAL, k) for k in range(L + 1)] + [(MLP_OUT, k) for k in range(L)]
    rec = collect(adapter, [batch], [_Recorder(points)], progress=False)[0]
    hs, ms = manual_llama_forward(tiny_llama64, batch["input_ids"])
    got = rec.seen[0]
    for k in range(L + 1):
        torch.testing.assert_close(got[(RESIDUAL, k)], hs[k], **TOL)
    for k in range(L):
        torch.testing.assert_close(got[(MLP_OUT, k)], ms[k], **TOL)


def test_early_stop_captures_same_points(tiny_llama64):
    adapter = adapter_for(tiny_llama64)
    batch = random_batches(n_batches=1, ragged=False)[0]
    rec = collect(adapter, [batch], [_Recorder([(RESIDUAL, 2), (MLP_OUT, 1)])], progress=False)[0]
    hs, ms = manual_llama_forward(tiny_llama64, batch["input_ids"])
    torch.testing.assert_close(rec.seen[0][(RESIDUAL, 2)], hs[2], **TOL)
    torch.testing.assert_close(rec.seen[0][(MLP_OUT, 1)], ms[1], **TOL)


def test_a_pass_that_needs_the_last_layer_runs_no_final_norm_or_head(tiny_llama64):
    """h_L is the last decoder layer's output: the pass ends there (no statistic reads the final norm or the LM
    head), and h_L is still the manual forward's."""
    adapter = adapter_for(tiny_llama64)
    L = adapter.num_layers
    batch = random_batches(n_batches=1, ragged=False)[0]
    calls = []
    handles = [m.register_forward_hook(lambda *a, name=name: calls.append(name))
               for name, m in (("norm", tiny_llama64.model.norm), ("head", tiny_llama64.lm_head))]
    try:
        rec = collect(adapter, [batch], [_Recorder([(RESIDUAL, L)])], progress=False)[0]
    finally:
        for h in handles:
            h.remove()
    assert calls == []
    hs, _ = manual_llama_forward(tiny_llama64, batch["input_ids"])
    torch.testing.assert_close(rec.seen[0][(RESIDUAL, L)], hs[L], **TOL)
    out = tiny_llama64(**batch)  # the stop is removed with the pass: the model runs whole again
    assert out.logits.shape[-1] == tiny_llama64.config.vocab_size


def _stats(adapter, batches):
    L = adapter.num_layers
    stats = [PairwiseSimilarity(L, 2, "last"), PairwiseSimilarity(L, 1, "all"),
             LinearMapMoments(1, 3, adapter.hidden_size)]
    return collect(adapter, batches, stats, progress=False)


def test_padding_never_changes_a_statistic(tiny_llama64):
    """The same sequences, unpadded one by one vs. right-padded together in wider batches."""
    adapter = adapter_for(tiny_llama64)
    padded = random_batches(n_batches=2, batch_size=4, seq_len=16, ragged=True)
    singles = []
    for b in padded:
        for row in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][row].sum())
            singles.append({"input_ids": b["input_ids"][row:row + 1, :n],
                            "attention_mask": b["attention_mask"][row:row + 1, :n]})
    # extra padding on top: widen every padded batch by 5 pad tokens
    wider = [{"input_ids": torch.nn.functional.pad(b["input_ids"], (0, 5)),
              "attention_mask": torch.nn.functional.pad(b["attention_mask"], (0, 5))} for b in padded]
    a, b, c = _stats(adapter, singles), _stats(adapter, padded), _stats(adapter, wider)
    for x, y in ((a, b), (a, c)):
        for sx, sy in zip(x[:2], y[:2]):
            assert sx.count == sy.count
            torch.testing.assert_close(sx.sum_cos, sy.sum_cos, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(sx.sum_angular, sy.sum_angular, rtol=1e-9, atol=1e-9)
        assert x[2].count == y[2].count
        torch.testing.assert_close(x[2].A, y[2].A, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x[2].B, y[2].B, rtol=1e-9, atol=1e-9)


def test_pairwise_and_moments_equal_numpy_reference(tiny_llama64):
    """The float64 reductions against numpy on the same captured activations (padding dropped by hand)."""
    adapter = adapter_for(tiny_llama64)
    L = adapter.num_layers
    batch = random_batches(n_batches=1, ragged=True)[0]
    points = [(RESIDUAL, k) for k in range(L + 1)] + [(MLP_OUT, 1)]
    rec = _Recorder(points)
    last, all_, mom = _stats(adapter, [batch])
    collect(adapter, [batch], [rec], progress=False)
    real = batch["attention_mask"].bool().numpy()
    lengths = real.sum(1)
    h = [rec.seen[0][(RESIDUAL, k)].numpy() for k in range(L + 1)]

    def cos(a, b):
        return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    flat = [x[real] for x in h]
    np.testing.assert_allclose(all_.mean_cosine().numpy(), [cos(flat[s], flat[s + 1]).mean() for s in range(L)],
                               rtol=1e-12)
    rows = np.arange(len(lengths))
    lastrows = [x[rows, lengths - 1] for x in h]
    expected = [np.mean(np.arccos(np.clip(cos(lastrows[s], lastrows[s + 2]), -1, 1)) / np.pi) for s in range(L - 1)]
    np.testing.assert_allclose(last.mean_angular_distance().numpy(), expected, rtol=1e-12)
    m = rec.seen[0][(MLP_OUT, 1)].numpy()[real]
    y = flat[2] - m
    np.testing.assert_allclose(mom.A.numpy(), m.T @ m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mom.B.numpy(), m.T @ (flat[3] - y), rtol=1e-10, atol=1e-12)
