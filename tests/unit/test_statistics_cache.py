import pytest
import torch

from depthbench.calibration.cache import StatisticsCache, data_fingerprint, gather
from depthbench.calibration.statistics import LinearMapMoments, PairwiseSimilarity, collect
from depthbench.modeling.adapters import adapter_for
from tests.helpers import random_batches, build_tiny_llama64


def _requests(adapter):
    L = adapter.num_layers
    return [PairwiseSimilarity(L, 2, "last"), PairwiseSimilarity(L, 1, "all"), PairwiseSimilarity(L, 3, "all"),
            LinearMapMoments(1, 4, adapter.hidden_size)]


def test_table_slices_equal_direct_pairwise_statistics(tiny_llama64):
    adapter = adapter_for(tiny_llama64)
    batches = random_batches(n_batches=2)
    via_table = gather(adapter, batches, _requests(adapter), cache=None, progress=False)
    direct = collect(adapter, batches, _requests(adapter), progress=False)
    for a, b in zip(via_table[:3], direct[:3]):
        assert a.count == b.count
        torch.testing.assert_close(a.sum_cos, b.sum_cos, rtol=1e-12, atol=1e-10)
        if a.tokens == "last":
            torch.testing.assert_close(a.sum_angular, b.sum_angular, rtol=1e-12, atol=1e-12)
        else:  # all-token tables carry cosine sums only (a flattened product, no per-token cosines)
            with pytest.raises(ValueError, match="not collected"):
                a.mean_angular_distance()


def test_second_gather_reads_the_cache_without_a_forward_pass(tiny_llama64, tmp_path, counting_collect):
    adapter = adapter_for(tiny_llama64)
    batches = random_batches(n_batches=2)
    cache = StatisticsCache(tmp_path, model_fingerprint="m")
    first = gather(adapter, batches, _requests(adapter), cache=cache, progress=False)
    assert len(counting_collect) == 1, "one pass for every statistic"
    # a different block size and token set, same model and data: answered from the tables
    L = adapter.num_layers
    again = gather(adapter, batches, [PairwiseSimilarity(L, 5, "last"), *_requests(adapter)], cache=cache,
                   progress=False)
    assert len(counting_collect) == 1
    direct = collect(adapter, batches, [PairwiseSimilarity(L, 5, "last")], progress=False)[0]
    torch.testing.assert_close(again[0].sum_angular, direct.sum_angular, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again[-1].A, first[-1].A, rtol=0, atol=0)
    # other data: a new pass
    gather(adapter, random_batches(n_batches=2, seed=7), _requests(adapter), cache=cache, progress=False)
    assert len(counting_collect) == 2


def test_corrupted_entry_is_detected_and_recomputed(tiny_llama64, tmp_path, counting_collect):
    adapter = adapter_for(tiny_llama64)
    batches = random_batches(n_batches=1)
    cache = StatisticsCache(tmp_path, model_fingerprint="m")
    reference = gather(adapter, batches, [LinearMapMoments(1, 3, adapter.hidden_size)], cache=cache, progress=False)[0]
    (entry,) = tmp_path.glob("LinearMapMoments-*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-20] ^= 0xFF  # flip bits inside the tensor bytes
    entry.write_bytes(bytes(data))
    fresh = LinearMapMoments(1, 3, adapter.hidden_size)
    assert cache.load(fresh, data_fingerprint(batches)) is False
    assert not entry.exists(), "a corrupted entry is removed"
    again = gather(adapter, batches, [LinearMapMoments(1, 3, adapter.hidden_size)], cache=cache, progress=False)[0]
    assert len(counting_collect) == 2
    torch.testing.assert_close(again.A, reference.A, rtol=0, atol=0)


def test_data_fingerprint_sees_padding_and_order():
    a = random_batches(n_batches=2)
    b = [dict(x) for x in a]
    b[1] = {"input_ids": a[1]["input_ids"].clone(), "attention_mask": a[1]["attention_mask"].clone()}
    b[1]["attention_mask"][1, -1] = 1 - b[1]["attention_mask"][1, -1]
    assert data_fingerprint(a) == data_fingerprint([dict(x) for x in a])
    assert data_fingerprint(a) != data_fingerprint(b)
    assert data_fingerprint(a) != data_fingerprint(a[::-1])


def test_replaceme_ablation_reuses_moments_without_a_pass(tmp_path, counting_collect):
    """An alpha/diag ablation on the same model and data reads the score tables and the LS moments
    from the cache (no forward pass) and produces the same model as an uncached run."""
    import copy

    from depthbench.calibration.batches import CalibrationData
    from depthbench.pruners import build_pruner

    base = build_tiny_llama64(num_layers=6, hidden=16)
    data = CalibrationData(random_batches(n_batches=3, batch_size=8, seq_len=16), 16)
    cache = StatisticsCache(tmp_path, model_fingerprint="tiny")
    _prune_cached(build_pruner("replaceme_ls"), adapter_for(copy.deepcopy(base)), data, cache)
    passes = len(counting_collect)
    assert passes == 1, "one pass: the score tables, with every layer's activations stored for the moments"
    cached_model = copy.deepcopy(base)
    _prune_cached(build_pruner("replaceme_ls", {"diag": True}), adapter_for(cached_model), data, cache)
    assert len(counting_collect) == passes, "the ablation ran no forward pass"
    fresh_model = copy.deepcopy(base)
    build_pruner("replaceme_ls", {"diag": True}).prune(adapter_for(fresh_model), data, 2, progress=False)
    batch = data.batches[0]
    with torch.no_grad():
        torch.testing.assert_close(cached_model(**batch).logits, fresh_model(**batch).logits, rtol=0, atol=0)


def _prune_cached(pruner, adapter, data, cache):
    with pruner.service(adapter, data, cache=cache, progress=False) as service:
        return pruner.prune(adapter, service, 2)
