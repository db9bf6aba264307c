"""``model.layerwise=true``: a prune that reads one decoder layer at a time from a sharded safetensors checkpoint
selects the same layers, fits the same transform and saves the same weights as the prune of the whole model in
memory (both outputs reloaded from disk and compared tensor by tensor); bad input is refused before any pass."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import build_tiny_model, random_batches, tiny_llama_config

from depthbench.modeling.surgery import ModelSurgery
from depthbench.calibration.batches import CalibrationData
from depthbench.calibration.layerwise import TensorBuffer, open_layerwise_service
from depthbench.errors import ConfigError
from depthbench.modeling.adapters import adapter_for
from depthbench.modeling.layerwise import LayerwiseModel
from depthbench.modeling.safetensors_io import INDEX_FILE, SafetensorsCheckpoint
from depthbench.modeling.saving import save_pruned
from depthbench.pruners import build_pruner

LAYERS = 8


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def _checkpoint(tmp_path, tie: bool = False):
    """A tiny random Llama saved in several safetensors shards, and the model itself."""
    model = build_tiny_model(tiny_llama_config(num_layers=LAYERS, hidden=32, tie=tie), seed=3)
    directory = tmp_path / "checkpoint"
    model.save_pretrained(directory, max_shard_size="40KB")
    shards = set(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values())
    assert len(shards) >= 3, shards
    return directory, model


def _calibration() -> CalibrationData:
    return CalibrationData(random_batches(n_batches=3, batch_size=4, seq_len=16, seed=1), seq_len=16)


def _prune_in_memory(directory, method: str, n_remove: int, out, options=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    pruner = build_pruner(method, options or {})
    result = pruner.prune(adapter_for(model), _calibration(), n_remove, progress=False)
    save_pruned(model, None, out, {"method": method})
    return result


def _prune_layerwise(directory, method: str, n_remove: int, out, options=None, buffer_bytes=1 << 30):
    weights = LayerwiseModel(directory, torch.float32)
    pruner = build_pruner(method, options or {})
    pruner.check_layerwise(weights.adapter)
    with open_layerwise_service(weights, _calibration(), buffer_bytes=buffer_bytes, progress=False,
                                label=method) as service:
        result = pruner.prune(weights.adapter, service, n_remove)
    weights.save(out, metadata={"method": method}, max_shard_bytes=30_000, progress=False)
    return result


def _reloaded_state(directory) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).state_dict()


def _assert_same_saved_weights(memory_dir, layerwise_dir, rtol, atol):
    a, b = _reloaded_state(memory_dir), _reloaded_state(layerwise_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=rtol, atol=atol, msg=key)


def test_replaceme_ls_layerwise_equals_in_memory(tmp_path):
    directory, original = _checkpoint(tmp_path)
    memory = _prune_in_memory(directory, "replaceme_ls", 3, tmp_path / "memory")
    layerwise = _prune_layerwise(directory, "replaceme_ls", 3, tmp_path / "layerwise", buffer_bytes=20_000)
    assert layerwise.removed_layers == memory.removed_layers
    assert layerwise.selection.blocks == memory.selection.blocks
    torch.testing.assert_close(torch.tensor(layerwise.selection.scores["values"], dtype=torch.float64),
                               torch.tensor(memory.selection.scores["values"], dtype=torch.float64),
                               rtol=1e-6, atol=1e-9)
    (fit_memory,), (fit_layerwise,) = memory.replacement["blocks"], layerwise.replacement["blocks"]
    assert fit_layerwise["tokens"] == fit_memory["tokens"]
    assert fit_layerwise["relative_residual"] == pytest.approx(fit_memory["relative_residual"], rel=1e-6)
    _assert_same_saved_weights(tmp_path / "memory", tmp_path / "layerwise", rtol=1e-5, atol=1e-6)

    # independent check of the fold: the kept layer's down_proj is T^T W of the original, every other kept
    # tensor is the original one under its new number
    saved = SafetensorsCheckpoint(tmp_path / "layerwise")
    removed = set(memory.removed_layers)
    kept = [k for k in range(LAYERS) if k not in removed]
    block = memory.selection.blocks[0]
    for new, old in enumerate(kept):
        for name, value in original.model.layers[old].state_dict().items():
            stored = saved.read(f"model.layers.{new}.{name}")
            if old == block.start - 1 and name == "mlp.down_proj.weight":
                assert not torch.equal(stored, value)  # T applied
            else:
                assert torch.equal(stored, value), (new, old, name)
    assert json.loads((tmp_path / "layerwise" / "config.json").read_text())["num_hidden_layers"] == LAYERS - 3


def _assert_only_layers_changed(original, saved_dir, removed, changed: dict[int, set[str]]):
    """Independent check of a saved prune against the original model: the kept layers renumbered in order,
    every tensor equal to the original one under its new number except the tensors ``changed`` names per
    original layer, which must differ (the fold was applied)."""
    saved = SafetensorsCheckpoint(saved_dir)
    kept = [k for k in range(LAYERS) if k not in set(removed)]
    for new, old in enumerate(kept):
        for name, value in original.model.layers[old].state_dict().items():
            stored = saved.read(f"model.layers.{new}.{name}")
            if name in changed.get(old, ()):
                assert not torch.allclose(stored, value, rtol=1e-3, atol=1e-5), (new, old, name)
            else:
                assert torch.equal(stored, value), (new, old, name)
    assert json.loads((saved_dir / "config.json").read_text())["num_hidden_layers"] == len(kept)


@pytest.mark.parametrize("n_remove, options", [
    (3, {}),
    (2, {"num_blocks": 2}),  # the second block trains on a layer-wise pass over the model as pruned so far
    (2, {"num_blocks": 2, "merge_consecutive": False, "loss": "mse", "holdout": 0.0}),
])
def test_replaceme_cosine_layerwise_equals_in_memory(tmp_path, n_remove, options):
    """Same rows in the same order (batches in order, tokens in order) and the same seed: the trained T, and
    so every saved tensor, match the in-memory run (observed bit for bit; compared to 1e-6, far below the
    change a fold makes at lr 0.01)."""
    options = {"epochs": 2, "batch_size": 64, "lr": 0.01, **options}
    directory, original = _checkpoint(tmp_path)
    memory = _prune_in_memory(directory, "replaceme_cosine", n_remove, tmp_path / "memory", options)
    layerwise = _prune_layerwise(directory, "replaceme_cosine", n_remove, tmp_path / "layerwise", options,
                                 buffer_bytes=20_000)
    assert layerwise.removed_layers == memory.removed_layers
    assert layerwise.selection.blocks == memory.selection.blocks
    fits_memory, fits_layerwise = memory.replacement["blocks"], layerwise.replacement["blocks"]
    assert len(fits_layerwise) == len(fits_memory) == options.get("num_blocks", 1)
    for a, b in zip(fits_memory, fits_layerwise):
        assert (b["tokens"], b["folded_into_layer"]) == (a["tokens"], a["folded_into_layer"])
        assert b["objective_after"] == pytest.approx(a["objective_after"], rel=1e-6)
    _assert_same_saved_weights(tmp_path / "memory", tmp_path / "layerwise", rtol=1e-6, atol=1e-7)
    folded = {fit["folded_into_layer"]: {"mlp.down_proj.weight"} for fit in fits_memory}
    _assert_only_layers_changed(original, tmp_path / "layerwise", memory.removed_layers, folded)


@pytest.mark.parametrize("replacement, trained", [
    ("layer", ("self_attn.", "mlp.", "input_layernorm.", "post_attention_layernorm.")),
    ("ffn", ("self_attn.o_proj.", "mlp.", "post_attention_layernorm.")),  # o_proj zeroed, q/k/v kept
])
def test_llm_streamline_layerwise_equals_in_memory(tmp_path, replacement, trained):
    """The trained module (a copy of layer j* read from the checkpoint, trained on pairs of the layer-wise pass,
    same seed and sequence order) takes layer j*'s place in the saved shards exactly as in memory."""
    options = {"replacement": replacement, "max_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0}
    directory, original = _checkpoint(tmp_path)
    memory = _prune_in_memory(directory, "llm_streamline", 2, tmp_path / "memory", options)
    layerwise = _prune_layerwise(directory, "llm_streamline", 2, tmp_path / "layerwise", options,
                                 buffer_bytes=20_000)
    assert layerwise.removed_layers == memory.removed_layers
    assert layerwise.replacement["replaced_range"] == memory.replacement["replaced_range"]
    assert layerwise.replacement["mse_after_training"] == pytest.approx(memory.replacement["mse_after_training"],
                                                                        rel=1e-6)
    _assert_same_saved_weights(tmp_path / "memory", tmp_path / "layerwise", rtol=1e-6, atol=1e-7)
    j = memory.replacement["replaced_range"][0]
    names = {name for name in original.model.layers[j].state_dict() if name.startswith(trained)}
    _assert_only_layers_changed(original, tmp_path / "layerwise", memory.removed_layers, {j: names})


@pytest.mark.parametrize("options", [{}, {"target": "joint"}, {"target": "mlp", "drop_norm": False}])
def test_llm_drop_layerwise_equals_in_memory(tmp_path, options):
    """One shot: the same sub-blocks dropped from the same scores, saved as zeros (pruning.json listing them as
    save_pruned does), every other tensor the original one."""
    directory, original = _checkpoint(tmp_path)
    memory = _prune_in_memory(directory, "llm_drop", 2, tmp_path / "memory", options)
    layerwise = _prune_layerwise(directory, "llm_drop", 2, tmp_path / "layerwise", options, buffer_bytes=20_000)
    assert layerwise.selection.units() == memory.selection.units()
    torch.testing.assert_close(torch.tensor(layerwise.selection.scores["values"], dtype=torch.float64),
                               torch.tensor(memory.selection.scores["values"], dtype=torch.float64),
                               rtol=1e-6, atol=1e-9)
    _assert_same_saved_weights(tmp_path / "memory", tmp_path / "layerwise", rtol=0, atol=0)
    metadata = [json.loads((tmp_path / run / "pruning.json").read_text()) for run in ("memory", "layerwise")]
    assert metadata[1]["zeroed_sub_blocks"] == metadata[0]["zeroed_sub_blocks"]
    assert metadata[1]["zeroed_parameters"] == metadata[0]["zeroed_parameters"]

    saved = SafetensorsCheckpoint(tmp_path / "layerwise")
    # a Llama sub-block is its pre-norm and its module
    parts = {"attention": ("input_layernorm.", "self_attn."), "mlp": ("post_attention_layernorm.", "mlp.")}
    zeroed = {(u.layer, prefix) for u in memory.selection.units() for prefix in parts[u.part]}
    assert len(zeroed) == (8 if options.get("target") == "joint" else 4)
    for k in range(LAYERS):  # no whole layer went: numbering unchanged
        for name, value in original.model.layers[k].state_dict().items():
            stored = saved.read(f"model.layers.{k}.{name}")
            expected = torch.zeros_like(value) if (k, name[:name.index(".") + 1]) in zeroed else value
            assert torch.equal(stored, expected), (k, name)


@pytest.mark.parametrize("options", [{}, {"insert_type": "diag", "cos_axis": "hidden"}])
def test_linearpatch_layerwise_equals_in_memory(tmp_path, options):
    """placement=mlp_fold: the same block, the same d from the one pass, P folded into layer s-1's down
    projection (W <- P^T W, checked against the original W) and nothing else changed."""
    from depthbench.pruners.hadamard import HadamardRotation
    from depthbench.pruners.methods.linearpatch import patch_matrix

    options = {"placement": "mlp_fold", **options}
    directory, original = _checkpoint(tmp_path)
    memory = _prune_in_memory(directory, "linearpatch", 2, tmp_path / "memory", options)
    layerwise = _prune_layerwise(directory, "linearpatch", 2, tmp_path / "layerwise", options, buffer_bytes=20_000)
    assert layerwise.removed_layers == memory.removed_layers
    assert layerwise.selection.scores["values"] == pytest.approx(memory.selection.scores["values"], rel=1e-6)
    (span,) = memory.selection.scores["patch_scale"]
    assert layerwise.selection.scores["patch_scale"][span] == pytest.approx(
        memory.selection.scores["patch_scale"][span], rel=1e-6)
    _assert_same_saved_weights(tmp_path / "memory", tmp_path / "layerwise", rtol=0, atol=0)
    (block,) = memory.selection.blocks
    _assert_only_layers_changed(original, tmp_path / "layerwise", memory.removed_layers,
                                {block.start - 1: {"mlp.down_proj.weight"}})
    scale = torch.tensor(memory.selection.scores["patch_scale"][f"{block.start}-{block.end}"], dtype=torch.float64)
    rotation = None if options.get("insert_type") == "diag" else HadamardRotation(32).matrix()
    P = patch_matrix(scale, rotation)
    W = original.model.layers[block.start - 1].mlp.down_proj.weight.to(torch.float64)
    stored = SafetensorsCheckpoint(tmp_path / "layerwise").read(f"model.layers.{block.start - 1}.mlp.down_proj.weight")
    torch.testing.assert_close(stored.to(torch.float64), P.T @ W, rtol=1e-5, atol=1e-6)


def test_layerwise_spills_beyond_its_budget(tmp_path):
    """A budget smaller than one batch's hidden states writes them to disk and reads them back unchanged."""
    buffer = TensorBuffer(100, tmp_path)
    small, large = torch.arange(4.0), torch.randn(3, 5, 7)
    buffer.put("small", small)
    buffer.put("large", large)
    assert buffer.spilled_bytes == large.numel() * 4 and list(tmp_path.iterdir())
    assert buffer.memory_bytes == small.numel() * 4 and torch.equal(buffer.get("small"), small)
    assert torch.equal(buffer.get("large"), large)
    assert torch.equal(buffer.pop("large"), large) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("method, options", [("uidl", {}), ("shortgpt", {}),
                                             ("shortgpt", {"last_layer": "final_norm"})])
def test_selection_methods_layerwise_equal_in_memory(tmp_path, method, options):
    directory, _ = _checkpoint(tmp_path, tie=True)
    memory = _prune_in_memory(directory, method, 2, tmp_path / "memory", options)
    layerwise = _prune_layerwise(directory, method, 2, tmp_path / "layerwise", options, buffer_bytes=10_000)
    assert layerwise.removed_layers == memory.removed_layers
    torch.testing.assert_close(torch.tensor(layerwise.selection.scores["values"], dtype=torch.float64),
                               torch.tensor(memory.selection.scores["values"], dtype=torch.float64),
                               rtol=1e-6, atol=1e-9)
    _assert_same_saved_weights(tmp_path / "memory", tmp_path / "layerwise", rtol=0, atol=0)


def test_layerwise_save_loads_with_the_projects_loader_and_computes_the_pruned_function(tmp_path):
    """The saved directory loads with `load_model` and gives the logits of the in-memory pruned model."""
    from omegaconf import OmegaConf

    from depthbench.modeling.loading import load_model

    directory, _ = _checkpoint(tmp_path)
    _prune_in_memory(directory, "replaceme_ls", 2, tmp_path / "memory")
    _prune_layerwise(directory, "replaceme_ls", 2, tmp_path / "layerwise")
    ids = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    from transformers import AutoModelForCausalLM

    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").eval()(input_ids=ids).logits
    cfg = OmegaConf.create({"name_or_path": str(tmp_path / "layerwise"), "dtype": "float32", "gguf": None})
    got = load_model(cfg, device="cpu", tokenizer=_FakeTokenizer()).model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


class _FakeTokenizer:
    pad_token, eos_token = "<pad>", "</s>"


def test_refusals(tmp_path):
    directory, _ = _checkpoint(tmp_path)
    # a checkpoint without safetensors
    bin_dir = tmp_path / "bin"
    _fake_bin(directory, bin_dir)
    with pytest.raises(ConfigError, match="no safetensors checkpoint.*pytorch_model.bin"):
        LayerwiseModel(bin_dir, torch.float32)
    # a method that re-scores the model per candidate: the service refuses what needs the whole model
    weights = LayerwiseModel(directory, torch.float32)
    with open_layerwise_service(weights, _calibration(), progress=False, label="sleb") as service:
        with pytest.raises(ConfigError, match="sleb asks for the calibration NLL.*model.layerwise=true"):
            service.nll()
    # the apply of a method changed a weight the layer-wise prune did not read in: refused at save
    weights.edit([])
    with torch.no_grad():
        ModelSurgery(weights.adapter).fold_into_mlp_output(2, torch.eye(32) * 2)
    with pytest.raises(RuntimeError, match=r"model\.layers\.2\.mlp\.down_proj\.weight"):
        weights.save(tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    # a new decoder layer that takes the place of no layer the method declared: no source for its tensors
    weights = LayerwiseModel(directory, torch.float32)
    weights.edit([])
    ModelSurgery(weights.adapter).replace_layer(3, _original_layer(directory, 3))
    with pytest.raises(RuntimeError, match=r"decoder layers \[3\] are new modules but only 0 layer"):
        weights.save(tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()


def _original_layer(directory, index):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).model.layers[index]


def _fake_bin(source, target):
    import shutil

    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    (target / "pytorch_model.bin").write_bytes(b"")


# -- the pipeline: `depthbench model=hf model.name_or_path=DIR model.layerwise=true` ------------------------------
def _compose(*overrides):
    from tests.helpers import compose

    return compose("logger=none", "benchmark=none", *overrides)


@pytest.fixture
def sharded_model_dir(tmp_path):
    from tests.unit.test_newcomer_checks import _word_tokenizer

    directory, _ = _checkpoint(tmp_path)
    _word_tokenizer(101).save_pretrained(directory)
    return directory


def _run_config(model_dir, tmp_path, *extra, pruner="replaceme_ls"):
    from tests.unit.test_newcomer_checks import _text_file

    return _compose("model=hf", f"model.name_or_path={model_dir}", "model.dtype=float32", "ratio=0.25",
                    f"pruner={pruner}", "calibration=local", f"calibration.path={_text_file(tmp_path, 3000)}",
                    "calibration.seq_len=16", "calibration.n_samples=8", "calibration.batch_size=4",
                    "calibration.packing=true", "progress=false", "device=cpu", *extra)


@pytest.mark.parametrize("pruner", ["replaceme_ls", "llm_drop"])
def test_pipeline_layerwise_run_saves_what_the_in_memory_run_saves(sharded_model_dir, tmp_path, pruner):
    from depthbench.experiments.pipeline import run

    memory = run(_run_config(sharded_model_dir, tmp_path, "evaluate=false", pruner=pruner), tmp_path / "memory")
    layerwise = run(_run_config(sharded_model_dir, tmp_path, "evaluate=false", "model.layerwise=true",
                                "model.layerwise_buffer_gb=0.00001", pruner=pruner), tmp_path / "layerwise")
    assert layerwise["pruning"]["removed_layers"] == memory["pruning"]["removed_layers"]
    assert layerwise["config_hash"] != memory["config_hash"]
    _assert_same_saved_weights(tmp_path / "memory" / "pruned_model", tmp_path / "layerwise" / "pruned_model",
                               rtol=1e-5, atol=1e-6)
    saved = tmp_path / "layerwise" / "pruned_model"
    assert (saved / "tokenizer.json").is_file() and (saved / "pruning.json").is_file()
    metadata = json.loads((saved / "pruning.json").read_text())
    assert metadata["removed_layers"] == layerwise["pruning"]["removed_layers"]
    in_memory = json.loads((tmp_path / "memory" / "pruned_model" / "pruning.json").read_text())
    assert metadata.get("zeroed_sub_blocks") == in_memory.get("zeroed_sub_blocks")
    assert bool(metadata.get("zeroed_sub_blocks")) == (pruner == "llm_drop")


@pytest.mark.parametrize("overrides, message", [
    (["evaluate=true"], "model.layerwise=true needs evaluate=false"),
    (["evaluate=false", "save_model=false"], "needs save_model=true"),
    (["evaluate=false", "pruner=sleb"], "pruner=sleb is not supported with model.layerwise=true.*replaceme_ls"),
    (["evaluate=false", "pruner=laco"], "pruner=laco is not supported"),
    (["evaluate=false", "pruner=linearpatch"], "linearpatch placement='interface'.*allowed placement=mlp_fold"),
    (["evaluate=false", "pruner=llm_drop", "pruner.options.iterative=true"],
     "llm_drop iterative=true re-scores.*allowed: iterative=false"),
    (["evaluate=false", "pruner=llm_streamline", "pruner.options.loss=lm"],
     "llm_streamline loss='lm' trains through every layer.*allowed: loss=mse"),
    (["evaluate=false", "pruner=uidl", "pruner.compensate=magnitude"], "pruner.compensate=magnitude is not supported"),
    (["evaluate=false", "healing=lora"], "needs healing=none"),
    (["evaluate=false", "model.layerwise_buffer_gb=-1"], "layerwise_buffer_gb=-1"),
])
def test_pipeline_refuses_before_any_weights(sharded_model_dir, tmp_path, monkeypatch, overrides, message):
    from depthbench.experiments.pipeline import run
    import depthbench.modeling.safetensors_io as io

    monkeypatch.setattr(io.SafetensorsCheckpoint, "read", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(ConfigError, match=message):
        run(_run_config(sharded_model_dir, tmp_path, "model.layerwise=true", *overrides), tmp_path / "run")


def test_pipeline_refuses_a_checkpoint_without_safetensors(sharded_model_dir, tmp_path):
    from depthbench.experiments.pipeline import run

    for shard in sharded_model_dir.glob("*.safetensors*"):
        shard.unlink()
    (sharded_model_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="no safetensors checkpoint \\(found pytorch_model.bin\\)"):
        run(_run_config(sharded_model_dir, tmp_path, "model.layerwise=true", "evaluate=false"), tmp_path / "run")
