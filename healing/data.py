"""The healing text: packed windows from the calibration source's calibration split, never held-out text.

Disjointness from the held-out evaluation text is guaranteed twice:
- by construction: training windows come from ``source.documents("calibration")`` of the run's
  ``calibration`` source, and held-out perplexity / fidelity from the ``heldout`` split of
  ``evaluation.perplexity``; for the offline default both are the reading passages, split per document
  by a hash bucket (``heldout_percent``, which the evaluation group takes from the calibration group);
- by a check before any weights are read (`check_disjoint`): every training document is compared
  (exact text, SHA-256) with every held-out document of the evaluation source, and a shared document
  (e.g. ``evaluation.perplexity.heldout_percent`` set apart from the calibration's, or a local
  calibration file that contains held-out documents) stops the run with a ConfigError.
Packing never crosses into the held-out part: windows are cut from the calibration documents only.

A healing mode that selects a checkpoint (``partial_layers``: ``settings.val_windows``) also gets a
validation split of the training text, by document: the first calibration documents in the seeded
order that fill ``val_windows`` packed windows are set apart before the training windows are packed
from the others, so no validation token (nor any other token of its documents) is trained on.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from depthbench.calibration.batches import build_batches
from depthbench.errors import ConfigError


@dataclass
class HealingText:
    batches: list  # one {"input_ids", "attention_mask"} batch per optimiser step
    description: str
    documents: int
    heldout_documents_checked: int | None
    validation: list = field(default_factory=list)  # batches of the validation windows (empty: none asked)
    validation_documents: int = 0

    @property
    def tokens(self) -> int:
        return sum(int(b["attention_mask"].sum()) for b in self.batches)

    def to_dict(self) -> dict:
        out = {"description": self.description, "split": "calibration", "documents": self.documents,
               "tokens": self.tokens, "sequences": sum(int(b["input_ids"].shape[0]) for b in self.batches),
               "heldout_documents_checked": self.heldout_documents_checked, "shared_with_heldout": 0}
        if self.validation:
            out["validation"] = {"documents": self.validation_documents,
                                 "windows": sum(int(b["input_ids"].shape[0]) for b in self.validation),
                                 "tokens": sum(int(b["attention_mask"].sum()) for b in self.validation),
                                 "shared_with_training": 0}
        return out


def _digests(documents) -> set[str]:
    return {hashlib.sha256(d.encode("utf-8")).hexdigest() for d in documents}


def check_disjoint(training: list[str], heldout: list[str], where: str = "evaluation.perplexity") -> None:
    """One ConfigError when a training document is also a held-out document (exact text)."""
    shared = _digests(training) & _digests(heldout)
    if shared:
        raise ConfigError(f"healing text shares {len(shared)} document(s) with the held-out text of {where}; "
                          "healing would train on what is evaluated. Use the same heldout_percent for "
                          "calibration and evaluation, or calibration text without the held-out documents")


def healing_text(calibration_cfg, tokenizer, settings, heldout_cfg=None) -> HealingText:
    """``settings.num_steps`` batches of ``settings.batch_size`` packed windows of ``settings.seq_len``
    tokens from the calibration split (documents shuffled with ``settings.seed``). ``heldout_cfg`` (the
    ``evaluation.perplexity`` group, when the run evaluates) is checked to share no document. A budget
    larger than the text stops here, before any weights are read."""
    from depthbench.calibration.sources import build_source

    source = build_source(calibration_cfg)
    documents = source.render(source.documents("calibration"), tokenizer)
    if not documents:
        raise ConfigError(f"healing: calibration source {source.description} has no documents")
    checked = None
    if heldout_cfg is not None:
        held = build_source(heldout_cfg)
        heldout = held.render(held.documents(heldout_cfg.split), tokenizer)
        check_disjoint(documents, heldout)
        checked = len(heldout)
    validation, validation_documents = [], 0
    if getattr(settings, "val_windows", 0):
        documents, held, validation = _validation_split(documents, tokenizer, settings, source.description)
        validation_documents = len(held)
    steps, per_step = settings.num_steps, settings.batch_size
    needed = steps * per_step
    data = build_batches(documents, tokenizer, needed, settings.seq_len, per_step, seed=settings.seed, packing=True,
                         description=source.description)
    windows = data.n_samples
    if windows < needed or any(int(b["attention_mask"].sum()) != b["attention_mask"].numel() for b in data.batches):
        full = sum(int(b["input_ids"].shape[0]) for b in data.batches
                   if int(b["attention_mask"].sum()) == b["attention_mask"].numel())
        raise ConfigError(
            f"healing budget larger than the text: {steps} steps x {per_step} windows x {settings.seq_len} tokens = "
            f"{needed * settings.seq_len:,} tokens, but the calibration split of {source.description} packs into "
            f"{full} full windows ({full * settings.seq_len:,} tokens); lower healing.steps / healing.tokens, "
            f"healing.batch_size or healing.seq_len")
    return HealingText(batches=data.batches, description=source.description, documents=len(documents),
                       heldout_documents_checked=checked, validation=validation,
                       validation_documents=validation_documents)


def _validation_split(documents: list[str], tokenizer, settings, description: str) -> tuple[list, list, list]:
    """``(training documents, validation documents, validation batches)``: the first documents in the
    order shuffled with ``settings.seed`` whose packed tokens fill ``settings.val_windows`` windows of
    ``settings.seq_len`` become the validation split (whole documents, so none is shared with training)."""
    order = list(range(len(documents)))
    random.Random(settings.seed).shuffle(order)
    wanted = settings.val_windows * settings.seq_len
    extra = 0 if tokenizer.eos_token_id is None else 1  # packing appends EOS after each document
    tokens, taken = 0, 0
    while taken < len(order) and tokens < wanted:
        tokens += len(tokenizer(documents[order[taken]])["input_ids"]) + extra
        taken += 1
    if tokens < wanted or taken == len(order):
        raise ConfigError(f"healing.val_windows={settings.val_windows} x {settings.seq_len} tokens = {wanted:,} "
                          f"validation tokens leave no training text in the calibration split of {description} "
                          f"({tokens:,} tokens); lower healing.val_windows or healing.seq_len")
    held = [documents[i] for i in order[:taken]]
    training = [documents[i] for i in sorted(order[taken:])]
    data = build_batches(held, tokenizer, settings.val_windows, settings.seq_len, settings.batch_size, seed=None,
                         packing=True, description=description)
    return training, held, data.batches
