"""The calibration pass of a layer-wise prune (``model.layerwise=true``): one decoder layer in memory at a time.

A normal pass runs every batch through the whole model. Here the order is turned around: the embeddings
give every batch's ``h_0``; then decoder layer 0 is read from the checkpoint (`LayerwiseModel.layer_weights`),
every batch goes through it (`ModelAdapter.layer_forward`: the same layer, rotary embeddings and causal mask
as inside the model), its outputs become the carried ``h_1`` of every batch, and layer 0's weights are dropped;
then layer 1, and so on, up to the last layer any requested statistic needs. Activations at the requested hook
points are captured on the way (the adapter's observers fire inside ``layer_forward`` as inside the model) and
held until every point a statistic needs exists; the statistic is then fed exactly as `collect` feeds it (one
`BatchActivations` per batch, batches in order), so methods keep their own statistics, selection and fit.

What is held between layers, and so bounds memory besides one layer's weights:

- the carried residual stream of every batch (calibration tokens x hidden x dtype bytes);
- the captured points until their statistics are fed. A statistic of last tokens only (`PairwiseSimilarity` /
  `LayerSimilarityTable` with ``tokens="last"``: UIDL, ReplaceMe's selection) keeps one row per sequence; one
  of all tokens keeps whole batches, so per method, in units of the carried state (calibration tokens x hidden):
  ReplaceMe-LS's moments and ReplaceMe-cosine's token rows 3 per block (``M_i``, ``h_{i+1}``, ``h_e``; the rows
  then go to the method's own spill files); LLM-Streamline's training pairs 2 (``h_j*``, ``h_{j*+n+1}``, then
  its spill files); ShortGPT's all-token similarity and LinearPatch's cosine and channel ratios every layer's
  residual stream, L + 1 (the statistics share the points); LLM-Drop's sub-block similarity every residual
  stream and every post-attention stream, 2L + 1 (``drop_norm: false``: each sub-block's normalised input and
  module output, 4L), because one statistic spans all layers and is fed only after the last.

A method's later passes over the model as pruned so far (ReplaceMe-cosine's blocks after the first:
`LayerwiseService.current`) run the same way over the skeleton as it is then, the layers it changed staying in
memory.

Both live in a `TensorBuffer`: in memory up to ``buffer_bytes``, written to files in a scratch directory beyond
it (read back with plain reads, never mapped), so the pass fits any memory at the cost of disk traffic.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from depthbench.calibration.activations import host_bytes
from depthbench.calibration.cache import similarity_sources
from depthbench.calibration.service import CalibrationService
from depthbench.calibration.statistics import (
    RESIDUAL, BatchActivations, HookPoint, LayerSimilarityTable, PairwiseSimilarity, Statistic, check_finite,
    observe_point, producing_layer, unique,
)
from depthbench.errors import ConfigError

#: Default memory for the carried residual stream and the captured activations before they spill to disk.
DEFAULT_BUFFER_BYTES = 1024**3


class TensorBuffer:
    """Tensors by key: in memory while their total stays within ``budget_bytes``, beyond it in files under
    ``directory`` (raw bytes, read back with ``numpy.fromfile``: no mapping, so nothing of a file stays
    resident after it is read)."""

    def __init__(self, budget_bytes: int, directory: str | Path):
        self.budget_bytes, self.directory = int(budget_bytes), Path(directory)
        self._memory: dict = {}
        self._files: dict = {}
        self.memory_bytes = 0
        self.peak_memory_bytes = 0
        self.spilled_bytes = 0
        self._names = 0

    def put(self, key, tensor: torch.Tensor) -> None:
        self.pop(key)
        tensor = tensor.detach()
        size = tensor.numel() * tensor.element_size()
        if self.memory_bytes + size <= self.budget_bytes:
            self._memory[key] = tensor
            self.memory_bytes += size
            self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)
            return
        self._names += 1
        path = self.directory / f"tensor-{self._names}.bin"
        host_bytes(tensor).tofile(path)
        self._files[key] = (path, tensor.dtype, tuple(tensor.shape), tensor.device)
        self.spilled_bytes += size

    def get(self, key) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        path, dtype, shape, device = self._files[key]
        raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        return raw.view(dtype).view(shape).to(device)

    def pop(self, key) -> torch.Tensor | None:
        if key in self._memory:
            tensor = self._memory.pop(key)
            self.memory_bytes -= tensor.numel() * tensor.element_size()
            return tensor
        if key in self._files:
            tensor = self.get(key)
            self._files.pop(key)[0].unlink(missing_ok=True)
            return tensor
        return None

    def keys(self) -> list:
        return [*self._memory, *self._files]


def token_scope(stat: Statistic) -> str:
    """``"last"`` where the statistic reads each sequence's last real token only (its points are then kept as
    one row per sequence), else ``"all"``."""
    if isinstance(stat, (PairwiseSimilarity, LayerSimilarityTable)) and stat.tokens == "last":
        return "last"
    return "all"


def _kept_rows(x: torch.Tensor, scope: str, mask: torch.Tensor) -> torch.Tensor:
    if scope == "all":
        return x
    last = mask.sum(1) - 1
    return x[torch.arange(x.shape[0], device=x.device), last.to(x.device)].unsqueeze(1)


def _activations(points: dict[HookPoint, torch.Tensor], scope: str, mask: torch.Tensor) -> BatchActivations:
    """The batch as a statistic of ``scope`` sees it: all tokens with the real mask, or the last tokens as a
    one-token batch (``tokens(x, "last")`` then picks the same rows)."""
    if scope == "all":
        return BatchActivations(points=points, mask=mask, last_index=mask.sum(1) - 1)
    rows = mask.shape[0]
    return BatchActivations(points=points, mask=torch.ones(rows, 1, dtype=torch.bool),
                            last_index=torch.zeros(rows, dtype=torch.long))


@torch.no_grad()
def layerwise_collect(weights, batches: list[dict[str, torch.Tensor]], statistics: Iterable[Statistic],
                      buffer: TensorBuffer, progress: bool = True,
                      description: str = "layer-wise pass") -> list[Statistic]:
    """Feed ``statistics`` from a pass over ``batches`` that reads one decoder layer of ``weights``
    (`depthbench.modeling.layerwise.LayerwiseModel`) at a time (see the module docstring); returns them."""
    from tqdm.auto import tqdm

    statistics = list(statistics)
    adapter = weights.adapter
    needs = {id(s): (sorted(s.hook_points()), token_scope(s)) for s in statistics}
    ready_after = {id(s): max((producing_layer(p) for p in needs[id(s)][0]), default=-1) for s in statistics}
    pending = list(statistics)
    masks = [batch["attention_mask"].bool() for batch in batches]

    def scopes_of(point: HookPoint) -> set[str]:
        return {needs[id(s)][1] for s in pending if point in needs[id(s)][0]}

    def keep(point: HookPoint, b: int, x: torch.Tensor) -> None:
        for scope in scopes_of(point):
            buffer.put((point, scope, b), _kept_rows(x, scope, masks[b]))

    def feed(layer: int) -> None:
        for stat in [s for s in pending if ready_after[id(s)] <= layer]:
            points, scope = needs[id(stat)]
            for b in range(len(batches)):
                acts = _activations({p: buffer.get((p, scope, b)) for p in points}, scope, masks[b])
                check_finite(acts)
                stat.update(acts)
            pending.remove(stat)
        wanted = {(p, needs[id(s)][1]) for s in pending for p in needs[id(s)][0]}
        for key in buffer.keys():
            if key[0] != "h" and key[:2] not in wanted:
                buffer.pop(key)

    device = weights.device
    for b, batch in enumerate(batches):
        h = weights.embedding_output(batch["input_ids"], batch["attention_mask"])
        buffer.put(("h", b), h)
        keep((RESIDUAL, 0), b, h)
    feed(-1)
    deepest = max(ready_after.values(), default=-1)
    current: dict[str, int] = {}  # the batch going through the layer, for the observers
    for k in tqdm(range(deepest + 1), desc=description, unit="layer", disable=not progress, leave=False):
        inner = sorted({p for s in pending for p in needs[id(s)][0] if p[0] != RESIDUAL and p[1] == k})
        with weights.layer_weights(k) as layer:
            handles = [observe_point(adapter, p, lambda x, p=p: keep(p, current["b"], x.detach())) for p in inner]
            try:
                for b, batch in enumerate(batches):
                    current["b"] = b
                    h = buffer.pop(("h", b))
                    out = adapter.layer_forward(layer, h, batch["attention_mask"].to(device))
                    buffer.put(("h", b), out)
                    keep((RESIDUAL, k + 1), b, out)
            finally:
                for handle in handles:
                    handle.remove()
        feed(k)
    for key in buffer.keys():
        buffer.pop(key)
    return statistics


@dataclass(frozen=True)
class LayerwiseService(CalibrationService):
    """The calibration service of a layer-wise prune: statistics of the original model from `layerwise_collect`
    (a fresh pass per request: no statistics cache, no activation store), the layers a method changes read into
    memory before its ``apply``, statistics of the model as pruned so far by the same kind of pass (`current`);
    everything that re-scores candidates (units skipped, NLL, divergence) is refused."""

    weights: object = None
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    scratch_dir: str | None = None

    def original(self, statistics: Iterable[Statistic], what: str = "calibration") -> list[Statistic]:
        self._check_original()
        return self._pass(statistics, what)

    def current(self, statistics: Iterable[Statistic], what: str = "calibration", skip=()) -> list[Statistic]:
        """Statistics of the model as pruned so far, by a layer-wise pass over the skeleton as it is now: the
        layers the method changed (read in by `before_apply`) stay in memory, the others are read from the
        checkpoint, removed ones are gone. Nothing may be skipped (``skip`` would need stand-ins swapped into
        layers that are not in memory): a method that re-scores candidates this way is refused."""
        if list(skip):
            self._refuse("statistics of the model with units skipped")
        return self._pass(statistics, what)

    def _pass(self, statistics: Iterable[Statistic], what: str) -> list[Statistic]:
        requested = unique(statistics)
        sources, fill = similarity_sources(requested)
        with self.scratch("depthbench-layerwise-", self.scratch_dir) as tmp:
            layerwise_collect(self.weights, self.batches, sources, TensorBuffer(self.buffer_bytes, tmp),
                              self.progress, self._describe(f"{what} (layer-wise)"))
        fill()
        return requested

    def before_apply(self, layers: Iterable[int]) -> None:
        self.weights.edit(layers)

    @contextlib.contextmanager
    def layer_in_memory(self, index: int):
        with self.weights.layer_weights(index) as layer:
            yield layer

    def _refuse(self, what: str):
        raise ConfigError(f"{self.label or 'this method'} asks for {what}, which needs the whole model in memory; "
                          "not available with model.layerwise=true")

    def nll(self, skip=(), what: str = "calibration NLL"):
        self._refuse("the calibration NLL of the model")

    def masked_nll(self, candidates, skip=(), what: str = ""):
        self._refuse("the calibration NLL per candidate")

    def masked_divergence(self, candidates, skip=(), divergence: str = "js_ref", what: str = ""):
        self._refuse("the divergence from the dense model per candidate")

    def first_sequences(self, count: int):
        self._refuse("a re-scoring subset of the calibration data")


@contextlib.contextmanager
def open_layerwise_service(weights, calibration, *, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                           scratch_dir: str | None = None, progress: bool = True, label: str = ""):
    """A `LayerwiseService` for one prune of ``weights`` (`depthbench.modeling.layerwise.LayerwiseModel`)."""
    yield LayerwiseService(weights.adapter, calibration, progress=progress, label=label, weights=weights,
                           buffer_bytes=buffer_bytes, scratch_dir=scratch_dir)
