"""The default text meets the default budgets with SmolLM2's tokenizer, without repeating a document.

Calibration: 128 x 256 tokens, each sequence the first 256 tokens of a different calibration document.
Held-out: 64 windows of 256 tokens cut from the held-out documents in their stored order. LoRA healing's default
budget (100 steps x 8 x 256 tokens) packs from the calibration split without wrapping around. A larger request
stops with one error naming the maximum, counted here independently from the documents.
"""

from __future__ import annotations

import pytest

from depthbench.calibration.batches import load_calibration
from depthbench.calibration.sources import build_source
from depthbench.errors import ConfigError
from depthbench.evaluation.perplexity import heldout_windows
from depthbench.healing.step import prepare as prepare_healing
from depthbench.modeling.loading import load_tokenizer
from tests.helpers import compose
from tests.integration.conftest import needs_offline_packages

pytestmark = [pytest.mark.integration, needs_offline_packages]


@pytest.fixture(scope="module")
def cfg():
    return compose()


@pytest.fixture(scope="module")
def tokenizer(cfg):
    return load_tokenizer(cfg.model)


@pytest.fixture(scope="module")
def calibration_docs(cfg):
    return build_source(cfg.calibration).documents("calibration")


def _rows(batch):
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def test_default_calibration_is_128_full_sequences_of_different_documents(cfg, tokenizer, calibration_docs):
    assert cfg.calibration.source == "reading_passages" and cfg.evaluation.perplexity.source == "reading_passages"
    data = load_calibration(cfg.calibration, tokenizer)
    rows = [row for batch in data.batches for row in _rows(batch)]
    assert len(rows) == 128 and all(len(r) == 256 for r in rows) and data.n_tokens == 128 * 256
    prefixes = {}
    for i, doc in enumerate(calibration_docs):
        ids = tokenizer(doc)["input_ids"]
        if len(ids) >= 256:
            prefixes.setdefault(tuple(ids[:256]), i)
    assert len({prefixes[tuple(r)] for r in rows}) == 128  # each row starts a different calibration document


def test_default_heldout_windows_are_64_x_256_of_heldout_documents_in_order(cfg, tokenizer):
    windows = heldout_windows(cfg.evaluation.perplexity, tokenizer)
    rows = [row for batch in windows.batches for row in _rows(batch)]
    assert len(rows) == 64 and all(len(r) == 256 for r in rows)
    stream = []
    for doc in build_source(cfg.evaluation.perplexity).documents("heldout"):
        stream += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= 64 * 256:
            break
    assert [t for r in rows for t in r] == stream[:64 * 256]


def test_default_healing_budget_fits_the_calibration_split_once(cfg, tokenizer, calibration_docs):
    plan = prepare_healing(compose("healing=lora"), tokenizer)
    assert (plan.settings.steps, plan.settings.batch_size, plan.settings.seq_len) == (100, 8, 256)
    assert plan.text.tokens == 204_800 and len(plan.text.batches) == 100
    split_tokens = sum(len(tokenizer(d)["input_ids"]) + 1 for d in calibration_docs)
    assert split_tokens >= 204_800, "the budget must not need any document twice"


def test_more_sequences_than_the_text_holds_is_one_error_naming_the_maximum(cfg, tokenizer, calibration_docs):
    lengths = [len(tokenizer(d)["input_ids"]) for d in calibration_docs]
    full = sum(n >= 256 for n in lengths)
    windows = sum(n + 1 for n in lengths) // 256
    cal = compose(f"calibration.n_samples={full + 1}").calibration
    with pytest.raises(ConfigError, match=rf"holds {full} documents of at least 256 tokens, so at most "
                                          rf"calibration.n_samples={full} .*at most {windows} windows"):
        load_calibration(cal, tokenizer)
    assert load_calibration(compose(f"calibration.n_samples={full}").calibration, tokenizer).n_samples == full
    packed = compose("calibration.packing=true", f"calibration.n_samples={windows + 1}").calibration
    with pytest.raises(ConfigError, match=rf"packs into {windows} windows .*at most calibration.n_samples={windows};"):
        load_calibration(packed, tokenizer)
