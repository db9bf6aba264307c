"""Tokenised calibration data: ``n_samples`` sequences of at most ``seq_len`` tokens, in batches.

Per-document mode (default, as the ReplaceMe reference does): each sampled document is truncated to
``seq_len`` tokens and shorter ones are right-padded within their batch (or, with ``full_length``, skipped,
so that every sequence is ``seq_len`` tokens); the attention mask marks padding, which never enters a
statistic. Packed mode concatenates documents (EOS-separated) and cuts full windows, as LLM-Streamline and
perplexity evaluation do. No document is used twice: asking for more calibration sequences than the text
holds is an error that names the maximum.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from depthbench.errors import ConfigError


@dataclass
class CalibrationData:
    batches: list[dict[str, torch.Tensor]]
    seq_len: int
    description: str = ""

    @property
    def n_samples(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    @property
    def n_tokens(self) -> int:
        return sum(int(b["attention_mask"].sum()) for b in self.batches)


def first_sequences(batches: list[dict[str, torch.Tensor]], count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` sequences of ``batches`` in order (0 = all), as batches: whole batches, then the
    first rows of the next one."""
    if count == 0:
        return list(batches)
    out, left = [], count
    for batch in batches:
        if left <= 0:
            break
        rows = min(left, int(batch["input_ids"].shape[0]))
        out.append({k: v[:rows] for k, v in batch.items()})
        left -= rows
    return out


def validate_sizes(n_samples: int, seq_len: int, batch_size: int) -> None:
    for name, value in (("n_samples", n_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"calibration.{name}={value!r} must be a positive integer")
    if seq_len < 2:
        raise ConfigError(f"calibration.seq_len={seq_len} must be at least 2 tokens")


def build_batches(documents: list[str], tokenizer, n_samples: int, seq_len: int, batch_size: int,
                  seed: int | None, packing: bool = False, description: str = "",
                  full_length: bool = False) -> CalibrationData:
    """Up to ``n_samples`` sequences from ``documents`` (seeded shuffle; ``seed=None`` keeps the documents'
    order), batched: fewer when the documents hold fewer (`load_calibration` makes that an error)."""
    validate_sizes(n_samples, seq_len, batch_size)
    order = list(range(len(documents)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    if packing:
        sequences = _packed(documents, order, tokenizer, n_samples, seq_len)
    else:
        sequences = _per_document(documents, order, tokenizer, n_samples, seq_len, seq_len if full_length else 2)
    n_tokens = sum(len(s) for s in sequences)
    if n_tokens < seq_len:
        raise ConfigError(
            f"calibration data too short: {n_tokens} tokens from {len(documents)} documents, "
            f"fewer than one sequence of calibration.seq_len={seq_len}"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [_pad(sequences[i:i + batch_size], pad_id) for i in range(0, len(sequences), batch_size)]
    return CalibrationData(batches=batches, seq_len=seq_len, description=description)


def _per_document(documents, order, tokenizer, n_samples, seq_len, min_tokens) -> list[list[int]]:
    out = []
    for i in order:
        ids = tokenizer(documents[i], truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) >= min_tokens:
            out.append(list(ids))
        if len(out) == n_samples:
            break
    return out


def _packed(documents, order, tokenizer, n_samples, seq_len) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    out: list[list[int]] = []
    for i in order:
        stream.extend(tokenizer(documents[i])["input_ids"])
        if eos is not None:
            stream.append(eos)
        while len(stream) >= seq_len and len(out) < n_samples:
            out.append(stream[:seq_len])
            stream = stream[seq_len:]
        if len(out) == n_samples:
            break
    if not out and stream:  # less than one window in total: keep it so the caller can report the size
        out.append(stream)
    return out


def _pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _setting(cfg, key: str):
    """``cfg[key]``; for a Python caller's config without it, the default `CalibrationSizes` declares (the only
    one: a composed config always has the key)."""
    from depthbench.settings import CalibrationSizes, declared_defaults

    return cfg[key] if key in cfg else declared_defaults(CalibrationSizes)[key]


def load_calibration(cfg, tokenizer) -> CalibrationData:
    """Build the source in ``cfg`` (a ``conf/calibration`` entry) and tokenise its calibration split."""
    from depthbench.calibration.sources import build_source

    source = build_source(cfg)
    docs = source.render(source.documents("calibration"), tokenizer)
    if not docs:
        raise ConfigError(f"calibration source {source.description} has no documents")
    n_samples, seq_len, packing = int(cfg.n_samples), int(cfg.seq_len), bool(_setting(cfg, "packing"))
    full_length = bool(_setting(cfg, "full_length"))
    data = build_batches(docs, tokenizer, n_samples, seq_len, int(cfg.batch_size), int(cfg.seed), packing,
                         description=source.description, full_length=full_length)
    if data.n_samples < n_samples:
        raise ConfigError(_too_few(n_samples, seq_len, data.n_samples, packing, full_length, docs, tokenizer,
                                   source.description))
    return data


def _too_few(n_samples: int, seq_len: int, available: int, packing: bool, full_length: bool, docs: list[str],
             tokenizer, description: str) -> str:
    """The error for more calibration sequences than the text holds without repeating a document."""
    asked = f"calibration.n_samples={n_samples}"
    if packing:
        return (f"{asked}: the calibration split of {description} packs into {available} windows of "
                f"calibration.seq_len={seq_len} tokens, so at most calibration.n_samples={available}; a larger budget "
                f"needs more text (calibration=local or a Hub source)")
    kind = f"documents of at least {seq_len} tokens" if full_length else "documents"
    eos = 1 if tokenizer.eos_token_id is not None else 0
    windows = sum(len(tokenizer(d)["input_ids"]) + eos for d in docs) // seq_len
    return (f"{asked}: the calibration split of {description} holds {available} {kind}, so at most "
            f"calibration.n_samples={available} sequences of {seq_len} tokens without repeating a document; or set "
            f"calibration.packing=true (documents concatenated: at most {windows} windows of {seq_len} tokens)")
