"""What a new user tripped over (issue 18): the model's recorded name, and errors that need only
config.json or the tokenizer, raised before any weights are read or the packaged GGUF converted."""

from __future__ import annotations

from pathlib import Path

import pytest

from depthbench.errors import ConfigError
from tests.helpers import compose, tiny_llama_config

def _compose(*overrides):
    return compose("logger=none", "benchmark=none", *overrides)


def _word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 6-layer Llama directory with a tokenizer; named like a model a user would have."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("models") / "my-gemma-finetune"
    AutoModelForCausalLM.from_config(tiny_llama_config(num_layers=6, vocab=101)).save_pretrained(directory)
    _word_tokenizer(101).save_pretrained(directory)
    return directory


@pytest.fixture
def no_weights(monkeypatch):
    """Reading weights or converting the GGUF fails the test."""
    import transformers

    import depthbench.modeling.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the configuration was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(loading, "_plain_copy_of_gguf", refuse)
    monkeypatch.setattr(loading, "load_pruned", refuse)


def _run(cfg, tmp_path):
    from depthbench.experiments.pipeline import run

    return run(cfg, tmp_path / "run")


def test_directory_model_is_recorded_under_its_own_name(model_dir, tmp_path):
    from depthbench.experiments.pipeline import run

    cfg = _compose(f"model.name_or_path={model_dir}", "model.dtype=float32", "scale=fast", "ratio=0.34",
                   "pruner=uidl", "evaluate=false", "save_model=false", "calibration=local",
                   f"calibration.path={_text_file(tmp_path, 4000)}", "calibration.seq_len=16",
                   "calibration.packing=true", "progress=false")  # one document: packed into windows
    record = run(cfg, tmp_path / "run")
    assert record["model"]["name"] == "my-gemma-finetune"  # not the default model's name
    assert record["model"]["source"] == str(model_dir)


def test_model_name_comes_from_what_is_loaded_unless_set():
    from depthbench.modeling.loading import model_name

    assert model_name(_compose().model) == "smollm2-135m-instruct"
    assert model_name(_compose("model.name_or_path=google/gemma-2-2b").model) == "google/gemma-2-2b"
    assert model_name(_compose("model=llama3_8b").model) == "meta-llama/Meta-Llama-3-8B"
    assert model_name(_compose("model.name_or_path=google/gemma-2-2b", "model.name=mine").model) == "mine"


def _text_file(tmp_path: Path, n_words: int, name: str = "text.txt") -> Path:
    path = tmp_path / name
    path.write_text(" ".join(f"w{4 + i % 90}" for i in range(n_words)) + "\n")
    return path


def test_ratio_removing_no_layer_fails_before_the_gguf_is_converted(tmp_path, no_weights):
    with pytest.raises(ConfigError, match="ratio=0.001 removes no layer of 30"):
        _run(_compose("ratio=0.001"), tmp_path)


def test_ratio_removing_no_layer_of_a_directory_fails_before_its_weights(model_dir, tmp_path, no_weights):
    with pytest.raises(ConfigError, match="ratio=0.05 removes no layer of 6"):
        _run(_compose(f"model.name_or_path={model_dir}", "ratio=0.05"), tmp_path)


def test_gguf_layer_count_from_its_header():
    from depthbench.modeling.loading import num_layers_of

    assert num_layers_of(_compose().model) == 30  # SmolLM2-135M: 30 decoder layers


@pytest.mark.parametrize("content,expected", [
    (b"", "is empty"),
    (b"w4 w5 w6\n", "shorter than|too short|fewer|not enough"),
    ("caf\u00e9 w4 w5".encode("latin-1") * 400, "is not UTF-8"),
])
def test_calibration_file_problems_fail_before_any_weights(model_dir, tmp_path, no_weights, content, expected):
    path = tmp_path / "calib.txt"
    path.write_bytes(content)
    cfg = _compose(f"model.name_or_path={model_dir}", "calibration=local", f"calibration.path={path}",
                   "calibration.seq_len=64", "calibration.n_samples=8", "progress=false")
    with pytest.raises(ConfigError, match=expected):
        _run(cfg, tmp_path)


def test_calibration_path_that_is_a_directory_says_so(tmp_path):
    from depthbench.calibration.sources import build_source

    cfg = _compose("calibration=local", f"calibration.path={tmp_path}")
    with pytest.raises(ConfigError, match="is a directory"):
        build_source(cfg.calibration).check()


def test_dtype_auto_is_bfloat16_only_where_its_arithmetic_is_native(monkeypatch):
    """An AVX2-only CPU emulates bfloat16 matmuls: auto must pick float32 there, bfloat16 with the kernels."""
    import torch

    from depthbench.modeling import loading

    monkeypatch.setattr(loading, "cpu_has_bfloat16_kernels", lambda: False)
    assert loading.resolve_dtype("auto", "cpu") == "float32"
    assert loading.parse_dtype("auto") is torch.float32
    monkeypatch.setattr(loading, "cpu_has_bfloat16_kernels", lambda: True)
    assert loading.resolve_dtype("auto", "cpu") == "bfloat16"
    assert loading.resolve_dtype("float16", "cpu") == "float16"  # an explicit dtype is kept
    with pytest.raises(ConfigError, match=r"model.dtype='int8' is not supported; allowed: auto, float32"):
        loading.parse_dtype("int8")
