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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from depthbench.calibration.batches import build_batches
from depthbench.errors import ConfigError


@dataclass
class HealingText:
    batches: list  # one {"input_ids", "attention_mask"} batch per optimiser step
    description: str
    documents: int
    heldout_documents_checked: int | None

    @property
    def tokens(self) -> int:
        return sum(int(b["attention_mask"].sum()) for b in self.batches)

    def to_dict(self) -> dict:
        return {"description": self.description, "split": "calibration", "documents": self.documents,
                "tokens": self.tokens, "sequences": sum(int(b["input_ids"].shape[0]) for b in self.batches),
                "heldout_documents_checked": self.heldout_documents_checked, "shared_with_heldout": 0}


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
                       heldout_documents_checked=checked)
