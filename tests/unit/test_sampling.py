"""benchmark.limit's sample: proportional allocation by hand, sources kept in proportion, seeded, and the
config errors."""

import pytest

from depthbench.errors import ConfigError
from depthbench.evaluation.sampling import allocate, check_sampling, sample_indices, sample_size, stratum


def test_allocation_by_largest_remainders_by_hand():
    # 200 of 3243 + 6799: exact 64.59 and 135.41 -> 64 and 135, one left for the larger remainder (0.59)
    assert allocate({"activitynet": 3243, "wikihow": 6799}, 200) == {"activitynet": 65, "wikihow": 135}
    assert allocate({"a": 1, "b": 1, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}  # ties by name
    assert sum(allocate({"a": 7, "b": 5, "c": 3}, 11).values()) == 11


def test_a_sorted_task_is_sampled_across_its_sources():
    docs = [{"source_id": f"first~{i}"} for i in range(300)] + [{"source_id": f"second~{i}"} for i in range(700)]
    ids, strata = sample_indices(docs, 100, "stratified", seed=3)
    assert strata == {"first": 30, "second": 70} and len(set(ids)) == 100 and ids == sorted(ids)
    assert sum(1 for i in ids if i < 300) == 30
    assert sample_indices(docs, 100, "stratified", seed=3)[0] == ids  # the same for every model
    assert sample_indices(docs, 100, "stratified", seed=4)[0] != ids
    assert sample_indices(docs, 100, "first")[0] == list(range(100))


def test_limits_without_sources_fractions_and_everything():
    docs = [{"question": str(i)} for i in range(50)]
    ids, strata = sample_indices(docs, 10, "stratified", seed=0)
    assert strata == {} and len(ids) == 10 and stratum(docs[0]) == ""
    assert sample_size(0.1, 45) == 5 and sample_size(80, 50) == 50
    assert sample_indices(docs, None)[0] == list(range(50)) == sample_indices(docs, 50)[0]


@pytest.mark.parametrize("method,seed,match", [("random", 0, "limit_sampling='random'"),
                                               ("stratified", -1, "sample_seed=-1"),
                                               ("first", True, "sample_seed=True")])
def test_bad_sampling_settings_name_the_value_and_what_is_allowed(method, seed, match):
    with pytest.raises(ConfigError, match=match):
        check_sampling(method, seed)
