"""benchmarks/eval_throughput.py: the spy records the token rows a model is fed, without their right
padding, and the bare baseline runs exactly those rows (same logits as calling the model directly)."""

import torch

from depthbench.benchmarks import eval_throughput


def test_spy_records_unpadded_rows_and_bare_forward_replays_them(tiny_llama):
    a = torch.tensor([5, 6, 7, 8, 9])
    b = torch.tensor([10, 11, 12, 0, 0])  # right-padded with 0 as lm-eval does
    with eval_throughput.ForwardSpy(tiny_llama) as spy:
        out = tiny_llama(torch.stack([a, b]))
    assert tiny_llama.forward == spy.original  # restored
    assert [r.tolist() for r in spy.rows] == [a.tolist(), b[:3].tolist()]
    assert spy.seconds > 0 and out.logits.shape[:2] == (2, 5)

    seen = []
    original = tiny_llama.forward

    def record(*args, **kwargs):
        seen.append(kwargs["input_ids"].clone())
        return original(*args, **kwargs)

    tiny_llama.forward = record
    try:
        seconds = eval_throughput.bare_forward(tiny_llama, spy.rows + [torch.tensor([3, 4, 5, 6, 7, 8])], 2, 0)
    finally:
        tiny_llama.forward = original
    assert seconds > 0
    # longest first, two rows per call, right-padded with the pad id
    assert [s.tolist() for s in seen] == [[[3, 4, 5, 6, 7, 8], [5, 6, 7, 8, 9, 0]], [[10, 11, 12]]]
