"""Tokenised calibration data: ``n_samples`` sequences of at most ``seq_len`` tokens, in batches.

Per-document mode (default, as the ReplaceMe reference does): each sampled document is truncated to
``seq_len`` tokens and shorter ones are right-padded within their batch; the attention mask marks
padding, which never enters a statistic. Packed mode concatenates documents (EOS-separated) and cuts
full windows, as LLM-Streamline and perplexity evaluation do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from depthbench.errors import ConfigError


@dataclass
class CalibrationData:
    batches: list[dict[str, torch.Tensor]]
    seq_len: int
    description: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    @property
    def n_tokens(self) -> int:
        return sum(int(b["attention_mask"].sum()) for b in self.batches)


def validate_sizes(n_samples: int, seq_len: int, batch_size: int) -> None:
    for name, value in (("n_samples", n_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"calibration.{name}={value!r} must be a positive integer")
    if seq_len < 2:
        raise ConfigError(f"calibration.seq_len={seq_len} must be at least 2 tokens")


def build_batches(documents: list[str], tokenizer, n_samples: int, seq_len: int, batch_size: int,
                  seed: int | None, packing: bool = False, description: str = "") -> CalibrationData:
    """Sample ``n_samples`` sequences from ``documents`` (seeded shuffle; ``seed=None`` keeps the
    documents' order) and batch them."""
    validate_sizes(n_samples, seq_len, batch_size)
    order = list(range(len(documents)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    sequences = (_packed if packing else _per_document)(documents, order, tokenizer, n_samples, seq_len)
    n_tokens = sum(len(s) for s in sequences)
    if n_tokens < seq_len:
        raise ConfigError(
            f"calibration data too short: {n_tokens} tokens from {len(documents)} documents, "
            f"fewer than one sequence of calibration.seq_len={seq_len}"
        )
    notes = []
    if len(sequences) < n_samples:
        notes.append(f"only {len(sequences)} sequences available; calibration.n_samples={n_samples} requested")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [_pad(sequences[i:i + batch_size], pad_id) for i in range(0, len(sequences), batch_size)]
    return CalibrationData(batches=batches, seq_len=seq_len, description=description, notes=notes)


def _per_document(documents, order, tokenizer, n_samples, seq_len) -> list[list[int]]:
    out = []
    for i in order:
        ids = tokenizer(documents[i], truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) >= 2:
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


def load_calibration(cfg, tokenizer) -> CalibrationData:
    """Build the source in ``cfg`` (a ``conf/calibration`` entry) and tokenise its calibration split."""
    from depthbench.calibration.sources import build_source

    source = build_source(cfg)
    docs = source.render(source.documents("calibration"), tokenizer)
    if not docs:
        raise ConfigError(f"calibration source {source.description} has no documents")
    return build_batches(docs, tokenizer, int(cfg.n_samples), int(cfg.seq_len), int(cfg.batch_size),
                         int(cfg.seed), bool(cfg.get("packing", False)), description=source.description)
