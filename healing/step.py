"""The healing step of a run, as the pipeline calls it.

- `prepare` (with the tokenizer, before any weights): the settings and the training windows; a budget
  larger than the text, or text shared with the held-out windows, stops the run here;
- `heal_model` (after pruning and the pruned-only evaluation): LoRA trained and merged in place, or the
  tail of the pruned model fine-tuned in place (``partial_layers``);
- `healed_metrics`: the healed model's quality, fidelity to the dense model and retention, measured
  exactly as the pruned-only ones (same windows, same benchmark, same dense reference).
"""

from __future__ import annotations

from dataclasses import dataclass

from depthbench.healing.data import HealingText, healing_text
from depthbench.healing.settings import LoraSettings, PartialLayerSettings, healing_settings

NO_HEALING = {"method": "none"}


@dataclass
class HealingPlan:
    settings: LoraSettings | PartialLayerSettings
    text: HealingText

    @property
    def needs_dense_model(self) -> bool:
        return self.settings.needs_dense_model


def prepare(cfg, tokenizer) -> HealingPlan | None:
    """None for ``healing=none``; else the checked settings and the tokenised training windows (checked
    against the held-out text of ``evaluation.perplexity`` when the run evaluates)."""
    settings = healing_settings(cfg.get("healing"))
    if settings is None:
        return None
    heldout = cfg.evaluation.perplexity if cfg.evaluate else None
    return HealingPlan(settings, healing_text(cfg.calibration, tokenizer, settings, heldout))


def heal_model(plan: HealingPlan, model, adapter, dense=None, dense_bytes: int | None = None,
               progress: bool = True, removed_layers: list[int] | None = None) -> dict:
    """Train (`depthbench.healing.lora.heal` or `depthbench.healing.partial_layers.heal`); the report the
    record and ``pruning.json`` keep. ``removed_layers`` (original numbering) lets ``partial_layers``
    name the layers it trained in the original numbering."""
    if isinstance(plan.settings, PartialLayerSettings):
        from depthbench.healing.partial_layers import heal as heal_tail

        report = heal_tail(model, adapter, plan.text, plan.settings, removed_layers, progress=progress)
        report["text"] = plan.text.to_dict()
        report["dense_copy_bytes"] = 0
        return report
    from depthbench.healing.lora import heal

    teacher = dense if plan.needs_dense_model else None
    report = heal(model, adapter, plan.text.batches, plan.settings, teacher=teacher, progress=progress)
    report["text"] = plan.text.to_dict()
    report["dense_copy_bytes"] = dense_bytes if teacher is not None else 0
    return report


def healed_metrics(model, tokenizer, windows, benchmark_cfg, data_dir, reference, base: dict,
                   progress: bool = True) -> dict:
    """``metrics.healed``: held-out perplexity and benchmark scores, plus ``fidelity`` (against the same
    dense reference as the pruned-only numbers) and ``retention`` (healed / base) where measured."""
    from depthbench.evaluation.retention import retention_report
    from depthbench.evaluation.suite import quality

    out, fidelity = quality(model, tokenizer, windows, benchmark_cfg, data_dir, progress, "healed", reference, base)
    if fidelity is not None:
        out["fidelity"] = fidelity
    if "tasks" in base and "tasks" in out:
        out["retention"] = retention_report(base, out)
    return out
