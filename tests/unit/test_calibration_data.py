import json

import pandas as pd
import pytest
from omegaconf import OmegaConf

from depthbench.calibration.batches import build_batches, load_calibration
from depthbench.calibration.sources import LocalFile, build_source
from depthbench.errors import ConfigError
from tests.offline_packages import needs_bigbench


class WordTokenizer:
    """One token per whitespace-separated word (ids from a fixed table): an independent tokenizer."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, truncation=False, max_length=None):
        ids = [2 + (sum(map(ord, w)) % 97) for w in text.split()]
        return {"input_ids": ids[:max_length] if truncation else ids}


def _cfg(**kw):
    base = dict(source="local", text_field="text", n_samples=4, seq_len=5, batch_size=3, seed=0, packing=False)
    base.update(kw)
    return OmegaConf.create(base)


def test_txt_jsonl_parquet_give_the_same_documents(tmp_path):
    docs = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota kappa lambda mu"]
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    pd.DataFrame({"body": docs}).to_parquet(tmp_path / "a.parquet")
    assert LocalFile(str(tmp_path / "a.txt")).documents() == docs
    assert LocalFile(str(tmp_path / "a.jsonl"), "body").documents() == docs
    assert LocalFile(str(tmp_path / "a.parquet"), "body").documents() == docs


def test_batches_truncate_pad_and_mask(tmp_path):
    docs = ["a b c d e f g", "h i", "j k l"]
    data = build_batches(docs, WordTokenizer(), n_samples=3, seq_len=5, batch_size=3, seed=1)
    (batch,) = data.batches
    tok = WordTokenizer()
    rows = {tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"])}
    assert rows == {tuple(tok(d)["input_ids"][:5]) for d in docs}
    assert batch["input_ids"].shape == (3, 5)
    assert data.n_tokens == 5 + 2 + 3
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


def test_seed_changes_order_but_not_content():
    docs = [f"w{i} x y" for i in range(10)]
    a = build_batches(docs, WordTokenizer(), 10, 5, 10, seed=0).batches[0]["input_ids"]
    b = build_batches(docs, WordTokenizer(), 10, 5, 10, seed=1).batches[0]["input_ids"]
    assert not (a == b).all()
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))


def test_too_short_data_is_one_clear_error(tmp_path):
    (tmp_path / "short.txt").write_text("only three words")
    with pytest.raises(ConfigError, match=r"too short: 3 tokens .*seq_len=256"):
        load_calibration(_cfg(path=str(tmp_path / "short.txt"), seq_len=256), WordTokenizer())


@pytest.mark.parametrize("content,match", [
    (b"", "has no documents"),
    (b"\xff\xfe bad bytes", "not UTF-8"),
])
def test_empty_and_non_utf8_files(tmp_path, content, match):
    (tmp_path / "x.txt").write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_calibration(_cfg(path=str(tmp_path / "x.txt")), WordTokenizer())


def test_missing_or_unsupported_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        build_source(_cfg(path=str(tmp_path / "missing.txt"))).check()
    with pytest.raises(ConfigError, match="allowed: .txt, .jsonl, .parquet"):
        build_source(_cfg(path=str(tmp_path / "x.csv"))).check()
    (tmp_path / "x.jsonl").write_text('{"other": "text"}\n')
    with pytest.raises(ConfigError, match="no field calibration.text_field='text'; found: other"):
        build_source(_cfg(path=str(tmp_path / "x.jsonl"))).documents()


def test_unknown_source_lists_available():
    with pytest.raises(ConfigError, match="unknown calibration source 'nope'; available: .*bigbench_wikipedia"):
        build_source(_cfg(source="nope"))


@pytest.mark.parametrize("key,value", [("n_samples", 0), ("seq_len", -1), ("batch_size", "x")])
def test_sizes_are_validated(key, value):
    with pytest.raises(ConfigError, match=key):
        build_batches(["a b c"], WordTokenizer(), **{"n_samples": 1, "seq_len": 2, "batch_size": 1, key: value}, seed=0)


@needs_bigbench
def test_bigbench_wikipedia_splits_are_disjoint_and_english():
    src = build_source(OmegaConf.create({"source": "bigbench_wikipedia", "heldout_percent": 20}))
    cal, held = src.documents("calibration"), src.documents("heldout")
    assert not set(cal) & set(held)
    assert 900 < len(cal) + len(held) < 1200  # ~1,050 English articles of 9,000
    assert 0.1 < len(held) / (len(cal) + len(held)) < 0.3
    assert all(" the " in d for d in cal[:50] + held[:50])
