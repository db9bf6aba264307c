"""A causal LM pruned without ever holding it whole: decoder layers read from the checkpoint one at a time.

``model.layerwise=true`` (docs/USAGE.md). The model is built from ``config.json`` as a skeleton whose
parameters live on the ``meta`` device (accelerate's ``init_empty_weights``: no memory, no initialisation;
buffers such as the rotary frequencies are real). What every calibration pass needs throughout (the input
embeddings, the final norm: every parameter outside the decoder layers but the output head) is read once and
stays resident; a decoder layer's weights are read from the safetensors shards when the pass reaches it
(`layer_weights`) and dropped back to ``meta`` after it, so the peak is one layer plus the resident part.

Pruning then runs on the skeleton as on a loaded model: selection reads only statistics, layer removal is
structural, and the layers whose weights a method changes (ReplaceMe's kept layer, `edit`) are read into
memory before its ``apply`` so that the change is computed exactly as in memory. `save` writes the pruned
model shard by shard: every tensor that was not changed is copied from the input checkpoint under its new
name (renumbered layers), the changed ones from memory. Each parameter is tracked by (module, attribute), so
renumbering needs no knowledge of a family's key names; a parameter that a method replaced or changed
while it was not in memory is detected (its storage or version differs from the snapshot `edit` takes) and
refused, rather than silently saved unchanged.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from depthbench import atomic
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.safetensors_io import SafetensorsCheckpoint, TensorEntry, write_sharded
from depthbench.modeling.saving import (CUSTOM_MODULES_FILE, METADATA_FILE, zeroed_metadata,
                                        zeroed_sub_block_shapes)
from depthbench.modeling.surgery import ModelSurgery

#: Files besides the weights and config.json that a pruned directory takes over from the input (generation
#: settings; the tokenizer's files when no tokenizer object is given).
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
#: Shard size of a layer-wise save (each tensor is written as soon as it is read, so this bounds file sizes,
#: not memory).
MAX_SHARD_BYTES = 2 * 1024**3

Slot = tuple[nn.Module, str]  # a module and the attribute name of one of its parameters or buffers


def check_layerwise_source(directory: str | Path) -> SafetensorsCheckpoint:
    """The checkpoint of a local directory that a layer-wise prune can read, or one `ConfigError`: no
    config.json, a depthbench-pruned directory with custom modules, no safetensors."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"model.name_or_path={str(directory)!r}: no config.json; model.layerwise=true needs a local "
                          "transformers directory")
    if (directory / CUSTOM_MODULES_FILE).is_file():
        raise ConfigError(f"model.name_or_path={str(directory)!r} carries depthbench's custom modules "
                          f"({CUSTOM_MODULES_FILE}); model.layerwise=true reads plain transformers checkpoints only")
    return SafetensorsCheckpoint(directory)


class LayerwiseModel:
    """The skeleton of a checkpoint, its adapter, and its weights read on demand (see the module docstring)."""

    def __init__(self, directory: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.directory = Path(directory)
        self.checkpoint = check_layerwise_source(self.directory)
        self.dtype, self.device = dtype, torch.device(device)
        config = AutoConfig.from_pretrained(str(self.directory))
        with init_empty_weights():  # parameters on meta, buffers (rotary frequencies) real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model = model.eval()
        self.adapter = adapter_for(model)
        self._modules = list(model.modules())  # keeps every module alive: its id stays its own
        self._source = self._checkpoint_keys()
        self._edited: set[tuple[int, str]] = set()
        self._edited_layers: set[int] = set()  # ids of the decoder layers `edit` read in (may be replaced)
        self._snapshot: dict[tuple[int, str], tuple] | None = None
        self._move_buffers()
        layers = {id(m) for layer in self.adapter.decoder_layers() for m in layer.modules()}
        head = {id(m) for m in self.adapter.lm_head().modules()}
        resident = [m for m in model.modules() if id(m) not in layers and id(m) not in head]
        self._load([slot for m in resident for slot in self._slots(m, recurse=False)])
        if self._tied_head_keys():  # the head shares the embedding just read, as in the loaded model
            self.adapter.lm_head()._parameters["weight"] = self.adapter.embeddings().weight

    # -- which checkpoint tensor each parameter is ---------------------------------------------
    def _checkpoint_keys(self) -> dict[tuple[int, str], str]:
        """``(id(module), attribute) -> checkpoint key`` for every parameter and persistent buffer; a key the
        checkpoint lacks is refused unless it is the output head of a tied model (stored once, as the embedding)."""
        source, absent = {}, []
        tied_head = self._tied_head_keys()
        for prefix, module in self.model.named_modules():
            for attr in self._attributes(module):
                key = f"{prefix}.{attr}" if prefix else attr
                if key in self.checkpoint:
                    source[(id(module), attr)] = key
                elif key not in tied_head and attr in module._parameters:
                    absent.append(key)
        if absent:
            raise ConfigError(f"{self.directory}: the checkpoint lacks tensors the architecture needs "
                              f"({', '.join(absent[:4])}{' ...' if len(absent) > 4 else ''}); model.layerwise=true "
                              "reads checkpoints whose tensor names are the model's own (save_pretrained's)")
        return source

    def _tied_head_keys(self) -> set[str]:
        if not getattr(self.model.config, "tie_word_embeddings", False):
            return set()
        head = self.adapter.lm_head()
        return {f"{name}.weight" for name, module in self.model.named_modules() if module is head}

    @staticmethod
    def _attributes(module: nn.Module) -> list[str]:
        params = [name for name, p in module._parameters.items() if p is not None]
        buffers = [name for name, b in module._buffers.items()
                   if b is not None and name not in module._non_persistent_buffers_set]
        return params + buffers

    def _slots(self, module: nn.Module, recurse: bool = True) -> list[Slot]:
        modules = module.modules() if recurse else [module]
        return [(m, attr) for m in modules for attr in self._attributes(m) if (id(m), attr) in self._source]

    def _move_buffers(self) -> None:
        for module in self.model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device != self.device:
                    module._buffers[name] = buffer.to(self.device)

    # -- reading and dropping weights ------------------------------------------------------------
    def _load(self, slots: Iterable[Slot]) -> None:
        with torch.no_grad():
            for module, attr in slots:
                tensor = self.checkpoint.read(self._source[(id(module), attr)])
                if tensor.is_floating_point():
                    tensor = tensor.to(self.dtype)
                tensor = tensor.to(self.device)
                if attr in module._parameters:
                    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
                else:
                    module._buffers[attr] = tensor

    @contextlib.contextmanager
    def layer_weights(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` (current numbering) with its weights read from the checkpoint; when the block
        ends its parameters are the very ``meta`` placeholders they were before (a layer `edit` read for good
        stays), so a pass after `edit` (a method's `current` statistics) leaves its snapshot as it was."""
        layer = self.adapter.layer(index)
        slots = [s for s in self._slots(layer) if (id(s[0]), s[1]) not in self._edited]
        placeholders = [(m, attr, m._parameters[attr]) for m, attr in slots if attr in m._parameters]
        self._load(slots)
        try:
            yield layer
        finally:
            for module, attr, placeholder in placeholders:
                module._parameters[attr] = placeholder

    def embedding_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``h_0`` for a batch: the model's own forward stopped before layer 0 (embeddings, scaling, positions)."""
        from depthbench.calibration.masked_nll import embedding_output

        return embedding_output(self.adapter, input_ids.to(self.device), attention_mask.to(self.device))

    def edit(self, layers: Iterable[int]) -> None:
        """Read decoder layers ``layers`` (current numbering) into memory for good, for a method's ``apply`` to
        change, and snapshot every other parameter so that `save` can tell a change made elsewhere."""
        for index in sorted(set(int(k) for k in layers)):
            self._edited_layers.add(id(self.adapter.layer(index)))
            slots = self._slots(self.adapter.layer(index))
            self._load([s for s in slots if (id(s[0]), s[1]) not in self._edited])
            self._edited.update((id(m), attr) for m, attr in slots)
        self._snapshot = {(id(m), attr): self._state(m, attr) for m in self._modules for attr in self._attributes(m)
                          if (id(m), attr) not in self._edited}

    @staticmethod
    def _state(module: nn.Module, attr: str) -> tuple:
        tensor = module._parameters[attr] if attr in module._parameters else module._buffers[attr]
        storage = tensor.untyped_storage()
        return tensor, storage, storage._cdata, tensor._version

    def replacement_modules(self) -> set[int]:
        """Ids of the modules of decoder layers a method put in place of layers `edit` read in (LLM-Streamline's
        trained layer): saved from memory under their position's name. More new layers than edited layers gone,
        or a new layer with a parameter not in memory, is refused (its tensors would have no source)."""
        known = {id(m) for m in self._modules}
        current = list(self.adapter.decoder_layers())
        new = [(k, layer) for k, layer in enumerate(current) if id(layer) not in known]
        gone = self._edited_layers - {id(layer) for layer in current}
        if len(new) > len(gone):
            raise RuntimeError(f"decoder layers {[k for k, _ in new]} are new modules but only {len(gone)} layer(s) "
                               "the method declared (Pruner.layers_apply_changes) were replaced; a layer-wise save "
                               "has no source for the others")
        ids = set()
        for k, layer in new:
            on_meta = [name for name, p in layer.named_parameters() if p.device.type == "meta"]
            if on_meta:
                raise RuntimeError(f"the new decoder layer {k} has parameters without values ({on_meta[:4]})")
            ids.update(id(m) for m in layer.modules())
        return ids

    def changed_parameters(self) -> list[str]:
        """Parameters outside the edited layers that differ from the `edit` snapshot (replaced or changed in place),
        those of the layers that replaced edited ones (`replacement_modules`) aside."""
        if self._snapshot is None:
            raise RuntimeError("LayerwiseModel.edit was not called before the method's apply")
        changed, replacements = [], self.replacement_modules()
        for prefix, module in self.model.named_modules():
            if id(module) in replacements:
                continue
            for attr in self._attributes(module):
                key = (id(module), attr)
                if key in self._edited:
                    continue
                before = self._snapshot.get(key)
                tensor, storage, cdata, version = self._state(module, attr)
                if before is None or before[0] is not tensor or before[2] != cdata or before[3] != version:
                    changed.append(f"{prefix}.{attr}" if prefix else attr)
        return changed

    def finite_check(self) -> list[str]:
        """Names of the in-memory (resident or edited) parameters holding a NaN or inf."""
        return [name for name, p in self.model.named_parameters() if p.device.type != "meta"
                and not bool(torch.isfinite(p).all())]

    # -- saving -----------------------------------------------------------------------------------
    def save(self, directory: str | Path, tokenizer=None, metadata: dict | None = None,
             max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = True) -> Path:
        """Write the pruned model to ``directory`` (atomically: a temporary sibling renamed into place) as a plain
        transformers directory: config.json of the pruned skeleton, the weights shard by shard in the run's dtype
        (unchanged tensors copied from the input checkpoint one at a time, changed ones from memory; a removed
        attention / MLP sub-block as zeros, listed in ``pruning.json`` as `save_pruned` does), the index json,
        the tokenizer (``tokenizer`` saved, else the input's tokenizer files copied), and ``pruning.json`` from
        ``metadata``."""
        from tqdm.auto import tqdm

        changed = self.changed_parameters()
        if changed:
            raise RuntimeError(f"the method changed {changed[:4]} outside the layers it declared for apply "
                               "(Pruner.layers_apply_changes); a layer-wise save would lose that change")
        custom = ModelSurgery(self.adapter).custom_modules()
        zeroed = None
        if set(custom) == {"removed_sub_blocks"}:  # saved as zeros, as save_pruned's default does
            zeroed = zeroed_sub_block_shapes(self.model)
            if zeroed is not None:
                metadata = zeroed_metadata(metadata or {}, custom.pop("removed_sub_blocks"), zeroed[1])
        if custom:
            raise ConfigError(f"the pruned model needs depthbench's custom modules ({custom}); "
                              "model.layerwise=true saves plain transformers checkpoints only")
        entries = self._entries()
        if zeroed is not None:
            entries += [TensorEntry(name, self.dtype, shape, lambda shape=shape: torch.zeros(shape, dtype=self.dtype))
                        for name, shape in zeroed[0].items()]
        directory = Path(directory)
        with atomic.directory(directory) as tmp:
            self.model.config.save_pretrained(tmp)
            with tqdm(total=len(entries), desc="layer-wise save", unit="tensor", disable=not progress,
                      leave=False) as bar:
                write_sharded(tmp, entries, max_shard_bytes, on_tensor=lambda entry: bar.update())
            for name in COPIED_FILES:
                if (self.directory / name).is_file() and (name == "generation_config.json" or tokenizer is None):
                    shutil.copy2(self.directory / name, tmp / name)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if metadata is not None:
                atomic.write_json(tmp / METADATA_FILE, metadata)
        return directory

    def _entries(self) -> list[TensorEntry]:
        """One entry per tensor of the pruned model (its current name; a tied head is not stored, as
        transformers does), produced from memory where it was edited or is resident, else from the checkpoint."""
        entries, seen = [], set()
        replacements = self.replacement_modules()
        for prefix, module in self.model.named_modules():
            for attr in self._attributes(module):
                slot = (id(module), attr)
                name = f"{prefix}.{attr}" if prefix else attr
                if id(module) in replacements:
                    entries.append(self._new_entry(name, module, attr))
                    continue
                if slot not in self._source:
                    continue  # a tied head: the checkpoint stores it once, as the embedding
                if slot in seen:
                    continue
                seen.add(slot)
                entries.append(self._entry(name, module, attr))
        return entries

    def _entry(self, name: str, module: nn.Module, attr: str) -> TensorEntry:
        tensor = module._parameters[attr] if attr in module._parameters else module._buffers[attr]
        key = self._source[(id(module), attr)]
        stored_dtype, shape = self.checkpoint.info(key)
        dtype = self.dtype if stored_dtype.is_floating_point else stored_dtype
        if tensor.device.type != "meta":
            return TensorEntry(name, dtype, shape, lambda t=tensor: t.detach().to(dtype))

        def produce(key=key) -> torch.Tensor:
            value = self.checkpoint.read(key)
            return value.to(dtype) if value.is_floating_point() else value

        return TensorEntry(name, dtype, shape, produce)

    def _new_entry(self, name: str, module: nn.Module, attr: str) -> TensorEntry:
        """A tensor of a replacement layer (`replacement_modules`): from memory, in the run's dtype."""
        tensor = module._parameters[attr] if attr in module._parameters else module._buffers[attr]
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        return TensorEntry(name, dtype, tuple(tensor.shape), lambda t=tensor: t.detach().to(dtype))

