"""The calibration service: everything a pruner asks of the calibration data, behind one object.

A pruner holds no caching or storage state. Its stages receive a `CalibrationService` and ask it:

- `original(statistics)`: statistics of the ORIGINAL model (before any change made by this prune):
  answered from the shared statistics cache, from stored activations, or by one forward pass that
  also stores every layer's activations for the later fits of this run and of other runs of a sweep, or
  not where a second pass costs less (`depthbench.calibration.strategy`: ``store`` / ``recompute`` / ``auto``).
  Refused once the model's layer count has changed (neither the cache key nor the stored
  activations see in-place changes);
- `current(statistics, skip=...)`: statistics of the model as it is NOW, optionally with some units
  skipped (`depthbench.modeling.adapters.ModelAdapter.skipping`): always a fresh pass, never cached;
- `nll(skip=...)`: mean next-token NLL of the calibration tokens under the current model with some
  units skipped (what SLEB / BlockPruner-style methods re-score after each removal);
- `masked_nll(candidates, skip=...)`: the same NLL for many candidates, each with one more unit skipped,
  running only the layers from each candidate up;
- `masked_divergence(candidates, skip=..., divergence=...)`: for the same candidates, the mean divergence of
  the candidate model's next-token distributions from the dense model's (nothing skipped) at every real
  position, the same way (FinerCut);
- `first_sequences(n)`: the same service on the first n calibration sequences only (a declared subset for
  methods that re-score the model per candidate), without cache or stored activations;
- `scratch()`: a temporary directory for the method's own spill files, deleted afterwards;
- `rows_storage(nbytes)`: where a method's training rows go (`depthbench.calibration.spill`): on the model's
  device where they fit what is left of the run's memory budget, else files in a scratch directory;
- `layer_in_memory(k)`: decoder layer k with its weights in memory while a block lasts (a layer-wise prune
  reads it from the checkpoint).

Caching and storage are wrapped around pruners from outside: `open_service` builds a service with or
without a statistics cache and decides where stored activations live (the cache's slot, a temporary
directory for this prune only, or nowhere).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from depthbench.calibration.activations import ActivationSlot
from depthbench.calibration.batches import CalibrationData, first_sequences
from depthbench.calibration.cache import StatisticsCache, data_fingerprint, gather
from depthbench.calibration.memory_store import MemorySlot
from depthbench.calibration.spill import DeviceRows, DiskRows, RowStorage
from depthbench.calibration.masked_nll import (DivergenceScorer, checked_mean, masked_nlls, masked_scores,
                                               runs_single_layers, token_nll_sum, whole_pass_scores)
from depthbench.calibration.statistics import Statistic, collect
from depthbench.calibration.strategy import ActivationStrategy

#: Default cap on the disk space of one model's stored calibration activations.
DEFAULT_ACTIVATION_BUDGET = 4 * 1024**3


@dataclass(frozen=True)
class CalibrationService:
    """Answers a pruner's questions about the calibration data (see the module docstring)."""

    adapter: object
    calibration: CalibrationData
    cache: StatisticsCache | None = None
    activations: ActivationSlot | None = None
    progress: bool = True
    label: str = ""
    strategy: ActivationStrategy | None = None
    #: Bytes a method may keep on the model's device for its training rows (`rows_storage`): what the activation
    #: store left of ``cache.activations_memory_gb``; 0 = always files.
    memory_budget_bytes: int = 0

    def __post_init__(self):
        object.__setattr__(self, "_original_depth", self.adapter.num_layers)

    @property
    def batches(self) -> list[dict[str, torch.Tensor]]:
        return self.calibration.batches

    def _describe(self, what: str) -> str:
        return f"{self.label}: {what}" if self.label else what

    def original(self, statistics: Iterable[Statistic], what: str = "calibration") -> list[Statistic]:
        """Statistics of the original model: cache, stored activations, else one (storing) pass."""
        self._check_original()
        try:
            return gather(self.adapter, self.batches, statistics, cache=self.cache, progress=self.progress,
                          description=self._describe(what), activations=self.activations, strategy=self.strategy)
        finally:
            if self.strategy is not None:
                self.strategy.requests += 1

    def _check_original(self) -> None:
        if self.adapter.num_layers != self._original_depth:
            raise RuntimeError(
                f"statistics of the original model requested after it was changed ({self._original_depth} -> "
                f"{self.adapter.num_layers} layers); ask `current` for the model as it is now")

    def before_apply(self, layers: Iterable[int]) -> None:
        """Called before a method's ``apply`` with the decoder layers whose weights it changes (original
        numbering, `depthbench.pruners.base.Pruner.layers_apply_changes`): nothing to do where the whole model
        is in memory; a layer-wise prune reads them in (`depthbench.calibration.layerwise.LayerwiseService`)."""

    @contextlib.contextmanager
    def layer_in_memory(self, index: int) -> Iterator[torch.nn.Module]:
        """Decoder layer ``index`` (current numbering) with its weights in memory while the block lasts, for a
        method that reads them before its ``apply`` (LLM-Streamline copies layer j* as its module's start): the
        layer itself where the whole model is in memory; a layer-wise prune reads it from the checkpoint."""
        yield self.adapter.layer(index)

    def current(self, statistics: Iterable[Statistic], what: str = "calibration", skip=()) -> list[Statistic]:
        """Statistics of the model as it is now (``skip``: units left out of the pass); a fresh pass."""
        with self._skipping(skip):
            return collect(self.adapter, self.batches, statistics, progress=self.progress,
                           description=self._describe(what))

    @torch.no_grad()
    def nll(self, skip=(), what: str = "calibration NLL") -> float:
        """Mean next-token NLL per real token (float64 sum) of the current model with ``skip`` left out."""
        from tqdm.auto import tqdm

        model = self.adapter.model
        device = self.adapter.embeddings().weight.device
        total, count = 0.0, 0
        with self._skipping(skip):
            for batch in tqdm(self.batches, desc=self._describe(what), unit="batch", disable=not self.progress,
                              leave=False):
                ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"].to(device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                batch_total, batch_count = token_nll_sum(logits, ids.to(logits.device), mask.to(logits.device))
                total += batch_total
                count += batch_count
        return checked_mean(total, count, skip)

    def masked_nll(self, candidates, skip=(), what: str = "calibration NLL per candidate") -> dict:
        """``{c: nll(skip=[*skip, c])}`` for every candidate unit c (layers ``K`` or sub-blocks ``"K.attn"``,
        ``"K.mlp"``; keys as given), without re-running the layers below each candidate: per batch the
        model with ``skip`` is walked up once and each candidate's tail runs from its layer
        (`depthbench.calibration.masked_nll`). Equal to `nll` up to floating-point summation order."""
        if not runs_single_layers(self.adapter):  # a plugin adapter without `layer_forward`: whole passes
            skip = list(skip)
            return {c: self.nll(skip=[*skip, c], what=what) for c in dict.fromkeys(candidates)}
        return masked_nlls(self.adapter, self.batches, candidates, skip=skip, progress=self.progress,
                           description=self._describe(what))

    def masked_divergence(self, candidates, skip=(), divergence: str = "js_ref",
                          what: str = "divergence from the dense model per candidate") -> dict:
        """``{c: D(skip + [c])}`` for every candidate unit c (keys as given): the mean over every real
        calibration position (no label shift, padding masked, float64 sums) of ``divergence`` (``js_ref``,
        ``js``, ``kl``; `depthbench.calibration.divergence`) between the next-token distribution of the model
        as it is now with nothing skipped (the dense reference) and of the model with ``skip`` and c skipped.
        Per batch the dense logits are computed once (one pass of the unskipped model) and every candidate
        is compared with them, so the dense distributions are never held for the whole calibration set;
        the candidates' logits come from the walk of `masked_nll` (each tail runs from its own layer)."""
        scores = masked_scores if runs_single_layers(self.adapter) else whole_pass_scores
        return scores(self.adapter, self.batches, candidates, DivergenceScorer(divergence), skip=skip,
                      progress=self.progress, description=self._describe(what))

    def first_sequences(self, count: int) -> "CalibrationService":
        """This service on the first ``count`` calibration sequences (0 = all of them: this service), for
        scoring candidates on a declared subset; the subset has no statistics cache or stored activations
        (they belong to the whole calibration set)."""
        if count == 0:
            return self
        data = CalibrationData(first_sequences(self.batches, count), self.calibration.seq_len,
                               self.calibration.description)
        return CalibrationService(self.adapter, data, progress=self.progress, label=self.label)

    def _skipping(self, skip):
        skip = list(skip)
        return self.adapter.skipping(skip) if skip else contextlib.nullcontext()

    @contextlib.contextmanager
    def scratch(self, prefix: str = "depthbench-", directory: str | None = None) -> Iterator[Path]:
        """A temporary directory (under ``directory`` when given, else the system's), deleted when the
        block ends."""
        with tempfile.TemporaryDirectory(prefix=prefix, dir=directory) as tmp:
            yield Path(tmp)

    @contextlib.contextmanager
    def rows_storage(self, nbytes: int, prefix: str = "depthbench-", directory: str | None = None
                     ) -> Iterator[RowStorage]:
        """Where a method's ``nbytes`` of training rows go while the block lasts: `DeviceRows` on the model's
        device where they fit ``memory_budget_bytes`` (no copy to the host, no file), else `DiskRows` in a
        `scratch` directory (under ``directory`` when given). The storage's ``where`` says which."""
        if 0 < nbytes <= self.memory_budget_bytes:
            yield DeviceRows(self.adapter.embeddings().weight.device)
            return
        with self.scratch(prefix, directory) as tmp:
            yield DiskRows(tmp)


@contextlib.contextmanager
def open_service(adapter, calibration: CalibrationData, *, cache: StatisticsCache | None = None,
                 store_activations: bool = True, activation_budget_bytes: int = DEFAULT_ACTIVATION_BUDGET,
                 keep_activations: bool = True, progress: bool = True, label: str = "",
                 strategy: ActivationStrategy | None = None,
                 memory_budget_bytes: int = 0) -> Iterator[CalibrationService]:
    """A service for one prune. ``store_activations`` (the method's fit replays activations): with a
    ``cache`` and ``keep_activations`` they live in the cache's slot on disk (shared with later runs);
    otherwise they serve this prune only: held in memory on the model's device when the store fits
    ``memory_budget_bytes`` (`depthbench.calibration.memory_store`: no copy, write or read back), else in a
    temporary directory deleted when the block ends. What the store leaves of ``memory_budget_bytes`` is the
    methods' training rows' (`CalibrationService.rows_storage`). ``activation_budget_bytes`` caps the disk store (0:
    never stored, fits then run their own pass). ``strategy`` (`depthbench.calibration.strategy`) says
    whether the pass stores them at all (``recompute``: no slot) and records what ran; None = ``store``
    with no record (the pipeline passes the config's, ``auto`` by default)."""
    if strategy is not None and not store_activations:
        strategy.decide("none", "the method's fit reads no activations of the original model")
    elif strategy is not None and strategy.mode == "recompute":
        strategy.decide("recompute", "cache.activation_strategy=recompute")
    in_memory = 0  # bytes of the store held in memory
    with tempfile.TemporaryDirectory(prefix="depthbench-activations-") as tmp:
        if not store_activations or (strategy is not None and strategy.mode == "recompute"):
            slot = None
        elif cache is not None and keep_activations:
            slot = cache.activation_slot(data_fingerprint(calibration.batches), activation_budget_bytes)
        else:
            memory = MemorySlot(memory_budget_bytes)
            size = memory.store_size(adapter, calibration.batches)
            slot = memory if memory.admits(size) else ActivationSlot(Path(tmp) / "store", activation_budget_bytes)
            in_memory = size if slot is memory else 0
        try:
            yield CalibrationService(adapter, calibration, cache=cache, activations=slot, progress=progress,
                                     label=label, strategy=strategy,
                                     memory_budget_bytes=max(memory_budget_bytes - in_memory, 0))
        finally:
            if slot is not None and slot.where == "memory":
                slot.discard()  # the tensors go with the prune, not with the service object
