"""Fidelity: KL, top-1 agreement and the change in p(correct) against a float64 recomputation from the
two models' logits (each row run alone, unpadded); the top-k storage error within its stated bound;
flips against a hand count; the cached reference reloaded from disk; evaluation=local's errors."""

import copy
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from depthbench.errors import ConfigError
from depthbench.evaluation import fidelity as fid
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.surgery import ModelSurgery
from tests.helpers import build_tiny_model, random_batches, tiny_llama_config


def _pair():
    dense = build_tiny_model(tiny_llama_config(), seed=0)
    pruned = copy.deepcopy(dense)
    ModelSurgery(adapter_for(pruned)).remove_layers([2, 3])
    return dense, pruned


@torch.no_grad()
def _float64_reference(dense, pruned, batches):
    """Per-token exact KL(p||q), agreement, q_y - p_y, window: every row run alone without padding."""
    kl, agree, dp, windows = [], [], [], []
    window = 0
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            n = int(mask.sum())
            row = ids[:n].unsqueeze(0)
            lp = torch.log_softmax(dense(input_ids=row).logits[0, :-1].double(), -1)
            lq = torch.log_softmax(pruned(input_ids=row).logits[0, :-1].double(), -1)
            y = row[0, 1:]
            kl.append((lp.exp() * (lp - lq)).sum(-1))
            agree.append(lp.argmax(-1) == lq.argmax(-1))
            dp.append(lq.gather(-1, y[:, None])[:, 0].exp() - lp.gather(-1, y[:, None])[:, 0].exp())
            windows.append(torch.full((n - 1,), window))
            window += 1
    return (torch.cat(kl).numpy(), torch.cat(agree).numpy(), torch.cat(dp).numpy(), torch.cat(windows).numpy())


def test_full_vocabulary_reference_equals_the_float64_recomputation():
    dense, pruned = _pair()
    batches = random_batches(vocab=101, n_batches=2, batch_size=4, seq_len=16, ragged=True)
    ref = fid.dense_reference(dense, batches, top_k=101, progress=False)  # k = V: no approximation
    got = fid.compare_to_reference(pruned, batches, ref, progress=False)
    kl, agree, dp, windows = _float64_reference(dense, pruned, batches)
    assert got["tokens"] == kl.size and got["windows"] == 8
    assert got["kl_mean"] == pytest.approx(kl.mean(), rel=1e-5, abs=1e-7)
    assert got["kl_p90"] == pytest.approx(np.quantile(kl, 0.9), rel=1e-4)
    assert got["kl_p99"] == pytest.approx(np.quantile(kl, 0.99), rel=1e-4)
    assert got["kl_error_bound"] == 0.0
    assert got["top1_agreement_percent"] == pytest.approx(100 * agree.mean())
    assert got["rms_delta_p_correct"] == pytest.approx(math.sqrt((dp ** 2).mean()), rel=1e-5)
    # cluster standard error over windows, written out: sqrt(g/(g-1) sum_w (S_w - mean N_w)^2) / N
    sums = np.array([kl[windows == w].sum() for w in range(8)])
    counts = np.array([(windows == w).sum() for w in range(8)])
    se = math.sqrt(8 / 7 * ((sums - kl.mean() * counts) ** 2).sum()) / counts.sum()
    assert got["kl_stderr"] == pytest.approx(se, rel=1e-4)
    # per-window sums (what paired ranking compares), against the same float64 recomputation; the model runs in
    # float32, batched and padded here but row by row in the recomputation, so a window's sum of small KLs
    # (~1e-2) differs in the 4th digit with the CPU's kernels; a wrong grouping would differ in the first
    per_window = got["per_window"]
    assert per_window["window"] == list(range(8)) and per_window["tokens"] == counts.tolist()
    assert np.allclose(per_window["kl"], sums, rtol=1e-3, atol=1e-7)
    assert np.allclose(per_window["top1"], [agree[windows == w].sum() for w in range(8)])


def test_identical_models_have_zero_kl_and_full_agreement():
    dense, _ = _pair()
    batches = random_batches(n_batches=1)
    ref = fid.dense_reference(dense, batches, top_k=8, progress=False)
    got = fid.compare_to_reference(dense, batches, ref, progress=False)
    assert got["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert got["top1_agreement_percent"] == 100.0
    assert got["rms_delta_p_correct"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("top_k", [1, 4, 16, 64])
def test_top_k_error_is_within_the_stated_bound(top_k):
    """0 <= KL_exact - KL~ <= bound for every token, on the tiny models and on peaked random distributions."""
    dense, pruned = _pair()
    batches = random_batches(n_batches=1, ragged=False)
    exact, *_ = _float64_reference(dense, pruned, batches)
    ref = fid.dense_reference(dense, batches, top_k=top_k, progress=False)
    lq = torch.cat([torch.log_softmax(pruned(input_ids=b["input_ids"]).logits[:, :-1].float(), -1).reshape(-1, 101)
                    for b in batches])
    stats = fid.token_statistics(lq.detach(), ref)
    err = exact - stats["kl"].numpy()
    assert (err >= -1e-5).all()
    assert (err <= stats["kl_error_bound"].numpy() + 1e-5).all()

    g = torch.Generator().manual_seed(top_k)
    logits = 4 * torch.randn(300, 5000, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(logits, -1)
    lq = torch.log_softmax(logits + torch.randn(300, 5000, generator=g, dtype=torch.float64), -1)
    values, ids = lp.float().topk(top_k, -1)
    ref = {"topk_logprobs": values, "topk_ids": ids.int(),
           "tail_logmass": lp.float().scatter(-1, ids, float("-inf")).logsumexp(-1)}
    stats = fid.token_statistics(lq.float(), ref)
    exact = (lp.exp() * (lp - lq)).sum(-1).numpy()
    err = exact - stats["kl"].numpy()
    assert (err >= -1e-5).all() and (err <= stats["kl_error_bound"].numpy() + 1e-5).all()


def test_the_bound_is_sharp_a_dense_tail_consistent_with_the_storage_reaches_it():
    """Dense p: top-4 stored; its tail puts p_(4) on each of the pruned model's least likely tokens and the
    remainder on the next: exact KL - KL~ equals the bound."""
    g = torch.Generator().manual_seed(0)
    V = 50
    lq = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    top_ids = torch.tensor([3, 7, 11, 20])
    p = torch.zeros(V, dtype=torch.float64)
    p[top_ids] = torch.tensor([0.33, 0.2, 0.1, 0.05], dtype=torch.float64)
    tail = torch.ones(V, dtype=torch.bool)
    tail[top_ids] = False
    order = torch.nonzero(tail).flatten()[lq[tail].argsort()]  # tail tokens, least likely under q first
    p[order[:6]] = 0.05  # 6 x 0.05 = 0.30
    p[order[6]] = 0.02
    assert abs(p.sum() - 1) < 1e-12
    ref = {"topk_logprobs": p[top_ids].log().float()[None], "topk_ids": top_ids.int()[None],
           "tail_logmass": torch.tensor([0.32], dtype=torch.float64).log().float()}
    s = fid.token_statistics(lq.float()[None], ref)
    nz = p > 0
    exact = float((p[nz] * (p[nz].log() - lq[nz])).sum())
    assert exact - float(s["kl"][0]) == pytest.approx(float(s["kl_error_bound"][0]), rel=1e-4)


def test_reference_size_per_token_does_not_depend_on_the_vocabulary():
    dense, _ = _pair()
    batches = random_batches(n_batches=1, ragged=False)
    ref = fid.dense_reference(dense, batches, top_k=16, progress=False)
    n = ref["topk_ids"].shape[0]
    assert sum(t.numel() * t.element_size() for t in ref.values()) == n * fid.bytes_per_token(16)
    assert fid.bytes_per_token(64) == 524


def test_cached_reference_is_reloaded_from_disk_and_a_damaged_file_recomputed(tmp_path):
    dense, _ = _pair()
    batches = random_batches(n_batches=1)
    calls = []

    def compute():
        calls.append(1)
        return fid.dense_reference(dense, batches, top_k=8, progress=False)

    material = {"model": "tiny", "text": "random", "fidelity_top_k": 8}
    first, hit1 = fid.cached_reference(tmp_path, material, compute)
    again, hit2 = fid.cached_reference(tmp_path, material, compute)
    assert (hit1, hit2, len(calls)) == (False, True, 1)
    for key in fid.REFERENCE_KEYS:
        assert torch.equal(first[key], again[key])
    (path,) = (tmp_path / fid.REFERENCE_SUBDIR).glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:-8] + b"garbage!")
    third, hit3 = fid.cached_reference(tmp_path, material, compute)
    assert (hit3, len(calls)) == (False, 2) and torch.equal(third["topk_ids"], first["topk_ids"])


def test_reference_from_other_windows_is_refused():
    dense, pruned = _pair()
    ref = fid.dense_reference(dense, random_batches(n_batches=1), top_k=4, progress=False)
    with pytest.raises(ConfigError, match="does not match"):
        fid.compare_to_reference(pruned, random_batches(n_batches=2), ref, progress=False)


def test_flips_equal_a_hand_count_matched_by_doc_id_and_subtask():
    base = {"doc_id": [0, 1, 2, 3, 4, 5], "correct": [1, 1, 0, 0, 1, 0]}
    # pruned in another order, doc 5 missing, doc 9 extra
    pruned = {"doc_id": [4, 3, 2, 1, 0, 9], "correct": [0, 1, 0, 1, 0, 1]}
    got = fid.flips(base, pruned)
    # shared docs 0..4: base 1,1,0,0,1 ; pruned 0,1,0,1,0 -> right->wrong: 0, 4 ; wrong->right: 3
    assert got["examples"] == 5 and got["right_to_wrong"] == 2 and got["wrong_to_right"] == 1
    assert got["right_to_wrong_percent"] == pytest.approx(40.0) and got["flips_percent"] == pytest.approx(60.0)
    a = {"subtask": ["x", "y"], "doc_id": [0, 0], "correct": [1, 0]}
    b = {"subtask": ["y", "x"], "doc_id": [0, 0], "correct": [0, 0]}
    assert fid.flips(a, b)["right_to_wrong"] == 1 and fid.flips(a, b)["wrong_to_right"] == 0
    with pytest.raises(ConfigError, match="twice"):
        fid.flips({"doc_id": [1, 1], "correct": [0, 1]}, pruned)


def test_task_flips_uses_only_tasks_with_per_example_results():
    s = {"doc_id": [0, 1], "correct": [1, 0]}
    base = {"tasks": {"a": {"value": 0.5, "samples": s}, "b": {"value": 0.5}}}
    pruned = {"tasks": {"a": {"value": 0.5, "samples": {"doc_id": [0, 1], "correct": [0, 1]}}, "b": {"value": 0.5}}}
    assert set(fid.task_flips(base, pruned)) == {"a"}


def test_evaluation_local_errors_on_bad_files(tmp_path):

    from depthbench.calibration.sources import build_source
    from depthbench.evaluation.suite import check_evaluation

    from tests.composed_configs import compose

    local = compose("evaluation=local").evaluation  # the entry on its schema, as a run composes it
    efficiency = compose().efficiency

    def composed(**values):
        return OmegaConf.merge(local, values)

    with pytest.raises(ConfigError, match="evaluation.path=FILE"):
        check_evaluation(composed())
    with pytest.raises(ConfigError, match="evaluation.path=.*no such file"):
        check_evaluation(composed(path=str(tmp_path / "missing.txt")))
    bad = tmp_path / "text.pdf"
    bad.write_text("x")
    with pytest.raises(ConfigError, match="unsupported file type '.pdf'"):
        check_evaluation(composed(path=str(bad)))
    good = tmp_path / "mine.jsonl"
    good.write_text('{"body": "one"}\n')
    cfg = composed(path=str(good), text_field="body")
    check_evaluation(cfg, efficiency)
    assert build_source(cfg.perplexity).documents("heldout") == ["one"]
    with pytest.raises(ConfigError, match="evaluation.text_field='text'"):
        build_source(composed(path=str(good)).perplexity).documents("heldout")
    with pytest.raises(ConfigError, match="fidelity.top_k=0"):
        check_evaluation(OmegaConf.merge(cfg, {"fidelity": {"top_k": 0}}))
    with pytest.raises(ConfigError, match="efficiency.rel_width"):
        check_evaluation(cfg, OmegaConf.merge(efficiency, {"rel_width": 0}))


@torch.no_grad()
def _float64_perplexity(model, batches):
    """exp(mean NLL) over every predicted real token, each row run alone without padding, in float64."""
    nll, n = 0.0, 0
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            m = int(mask.sum())
            lp = torch.log_softmax(model(input_ids=ids[:m].unsqueeze(0)).logits[0, :-1].double(), -1)
            nll -= float(lp.gather(-1, ids[1:m, None]).sum())
            n += m - 1
    return math.exp(nll / n), n


def test_one_pass_gives_the_perplexity_and_the_fidelity_and_the_reference_gives_the_dense_perplexity():
    """The pruned model's held-out perplexity comes from the fidelity pass, the dense one's from its reference:
    both equal a float64 recomputation, and evaluating with a reference runs ONE forward per batch."""
    from depthbench.evaluation.perplexity import perplexity
    from depthbench.evaluation.suite import quality

    dense, pruned = _pair()
    batches = random_batches(vocab=101, n_batches=3, batch_size=4, seq_len=16, ragged=True)
    ref = fid.dense_reference(dense, batches, top_k=8, progress=False)
    expected, tokens = _float64_perplexity(dense, batches)
    dense_ppl = fid.reference_perplexity(ref)
    assert dense_ppl["tokens"] == tokens and dense_ppl["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert dense_ppl["perplexity"] == pytest.approx(perplexity(dense, batches, progress=False)["perplexity"], rel=1e-6)

    calls = []
    handle = pruned.register_forward_hook(lambda *_: calls.append(1))
    windows = type("Windows", (), {"batches": batches})()
    out, fidelity = quality(pruned, None, windows, OmegaConf.create({"tasks": []}), None, False, "pruned", ref)
    handle.remove()
    assert len(calls) == len(batches)  # one forward per batch for both metrics
    expected, tokens = _float64_perplexity(pruned, batches)
    assert out["heldout_perplexity"]["tokens"] == tokens
    assert out["heldout_perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert fidelity == fid.compare_to_reference(pruned, batches, ref, progress=False)
    # the per-window NLL sums add up to the perplexity's: exp(sum / tokens)
    nll = fidelity["per_window"]["nll"]
    assert math.exp(sum(nll) / tokens) == pytest.approx(expected, rel=1e-5) and len(nll) == 12
    plain, none = quality(pruned, None, windows, OmegaConf.create({"tasks": []}), None, False, "pruned")
    assert none is None and plain["heldout_perplexity"]["perplexity"] == pytest.approx(
        out["heldout_perplexity"]["perplexity"], rel=1e-6)
