"""Tokenizer: a Hugging Face fast tokenizer (``tokenizer.json``) run by the ``tokenizers`` library,
with the chat template rendered by jinja2 the way transformers renders it.

Why not transformers' ``AutoTokenizer``: importing it costs ~3 s on a 2-core machine (it pulls in
much of transformers and ``torch.distributed``), a quarter of the demo's start-up. A directory
whose tokenizer needs more than ``tokenizer.json`` — a sentencepiece model only, a model-specific
tokenizer class, BOS/EOS switched by config flags — still loads through transformers
(see ``loader._load_tokenizer``).
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Optional

# tokenizer classes that are tokenizer.json and nothing more
PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


class Tokenizer:
    """Text <-> token ids for one model, and its chat template.

    Owns a ``tokenizers.Tokenizer`` and the special tokens named in ``tokenizer_config.json``.
    The methods the engine uses behave as transformers' (same ids, same text, same rendered chat).
    """

    def __init__(self, backend, config: dict, chat_template: Optional[str]) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = {name: _content(config.get(name)) for name in
                               ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.eos_token_id = self.token_id(self.special_tokens["eos_token"])
        self.bos_token_id = self.token_id(self.special_tokens["bos_token"])
        self._template = None

    @classmethod
    def from_dir(cls, source_dir: str) -> Optional["Tokenizer"]:
        """The directory's tokenizer, or None if it needs transformers (see the module docstring)."""
        path = os.path.join(source_dir, "tokenizer.json")
        config_path = os.path.join(source_dir, "tokenizer_config.json")
        if not (os.path.isfile(path) and os.path.isfile(config_path)):
            return None
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        if (config.get("tokenizer_class") not in PLAIN_CLASSES
                or "add_bos_token" in config or "add_eos_token" in config):
            return None
        from tokenizers import Tokenizer as Backend
        backend = Backend.from_file(path)
        # transformers cleans up spaces before punctuation only for non-BPE (WordPiece) models
        if config.get("clean_up_tokenization_spaces") and type(backend.model).__name__ != "BPE":
            return None
        return cls(backend, config, _chat_template(source_dir, config))

    def token_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        """Token ids to text. Spaces before punctuation are kept whatever the flag says, as
        transformers does for BPE tokenizers (the only kind loaded here)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False):
        """Render a chat with the model's template (jinja2, sandboxed, transformers' settings)."""
        if self.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead of messages")
        if self._template is None:
            self._template = _compile(self.chat_template)
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **self.special_tokens)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _content(token) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _chat_template(source_dir: str, config: dict) -> Optional[str]:
    path = os.path.join(source_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
