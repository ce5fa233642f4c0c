"""miniyaie.tokenizer and the loader's config reading against transformers, which they replace
at start-up (importing transformers costs ~3 s on 2 cores)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import transformers

from miniyaie.loader import _load_config, load_model
from miniyaie.model import ModelArgs
from miniyaie.tokenizer import Tokenizer

CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "ünïcödé 🎉 日本語"}, {"role": "assistant", "content": "OK."},
     {"role": "user", "content": "  spaces \n\n newlines\t"}],
    [{"role": "assistant", "content": ""}, {"role": "user", "content": "<|im_start|> in text"}],
]
TEXTS = ["Hello world", "  leading and trailing  ", "<|im_start|>user\nhi<|im_end|>", "don't stop ,now .",
         "日本語 🎉 emoji", "a" * 300, "\n\n\t", "tab\tand 123456789"]


@pytest.fixture(scope="module")
def pair():
    """Our tokenizer and transformers' for the embedded model's directory."""
    directory = load_model("embedded").source_dir
    ours = Tokenizer.from_dir(directory)
    assert ours is not None, "the embedded model's tokenizer should not need transformers"
    return ours, transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(pair, chat, generation_prompt):
    ours, theirs = pair
    text = ours.apply_chat_template(CHATS[chat], add_generation_prompt=generation_prompt)
    assert text == theirs.apply_chat_template(CHATS[chat], tokenize=False, add_generation_prompt=generation_prompt)
    assert ours.apply_chat_template(CHATS[chat], tokenize=True, add_generation_prompt=generation_prompt) == \
        ours.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_as_transformers(pair, text):
    ours, theirs = pair
    for special in (True, False):
        assert ours.encode(text, add_special_tokens=special) == theirs.encode(text, add_special_tokens=special)
    ids = theirs.encode(text)
    for skip in (True, False):
        for clean in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean) == \
                theirs.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
    assert (ours.eos_token_id, ours.bos_token_id) == (theirs.eos_token_id, theirs.bos_token_id)


def test_tokenizers_that_need_transformers_still_load_through_it(tmp_path, pair):
    """A model-specific tokenizer class, or BOS/EOS switched by config flags: transformers'."""
    _, theirs = pair
    theirs.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    assert Tokenizer.from_dir(str(tmp_path)) is not None
    for change in ({"tokenizer_class": "Qwen2Tokenizer"}, {"add_bos_token": True}):
        config_path.write_text(json.dumps({**config, **change}))
        assert Tokenizer.from_dir(str(tmp_path)) is None


@pytest.mark.parametrize("config_cls", [transformers.LlamaConfig, transformers.MistralConfig,
                                        transformers.Qwen2Config, transformers.Qwen3Config])
def test_config_defaults_as_transformers(tmp_path, config_cls):
    """A config.json holding only the shape: the fields left out get transformers' defaults."""
    model_type = config_cls.model_type
    shape = dict(model_type=model_type, vocab_size=100, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4)
    (tmp_path / "config.json").write_text(json.dumps(shape))
    assert ModelArgs.from_hf_config(_load_config(str(tmp_path))) == \
        ModelArgs.from_hf_config(transformers.AutoConfig.from_pretrained(tmp_path))


def test_starting_the_embedded_engine_imports_neither_transformers_nor_sympy():
    """Start-up cost we removed: transformers (~3 s: config and tokenizer are read without it) and
    sympy (~0.6 s: the network is materialised without ``Module.to_empty``)."""
    load_model("embedded")  # the cache exists after this
    code = ("import sys; from miniyaie import Engine; e = Engine(); "
            "e.tokenizer.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True); "
            "print(sorted(m for m in ('transformers', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"
