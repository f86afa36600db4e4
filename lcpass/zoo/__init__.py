"""The model zoo: tiny random-weight models whose attention sites are known exactly.

Every entry is a plain factory returning a `ZooModel`: the module (eval, fp32, deterministic: each factory
seeds torch itself), keyword example inputs, the exact number of attention computations one forward performs
(`n_attention` = expected canonical sites) and, in forward execution order, what each site must be
detected as (`expected`, built by `site()`). Nothing is downloaded: transformers models are built from
configs.

Registries (explicit and ordered; no auto-discovery):
    ZOO       name -> factory, models with attention (transformers tiny configs, then hand-written torch).
    NEGATIVE  name -> factory, models with a softmax that is NOT attention (n_attention == 0); the detector
              must reject every softmax, and its reason must contain `reason_contains`.

Naming: transformers entries are `<family>-tiny` (attn_implementation="sdpa") and `<family>-tiny-eager`
(attn_implementation="eager"); Gemma2 only supports eager (softcapping), so it is `gemma2-tiny-eager` only.

Site expectation keys (see `site()`):
    mask      what the scores are masked with, the logical kind the detector must recover:
              "none" (full, bidirectional), "causal", "sliding" (causal + window), "padding" (key padding,
              bidirectional), "causal+padding", "bias" (an additive float tensor that must be kept: T5's
              learned relative position bias, or T5 cross-attention's all-zero bias), "causal+bias".
    window    for "sliding": HF `sliding_window` semantics, key j is kept for query i iff 0 <= i - j < window
              (window keys including the query's own position); else None.
    hq, hkv   query and key/value heads (hkv divides hq; 1 = MQA).
    head_dim  D of q/k/v.
    softcap   tanh soft-capping of the scores (Gemma2's attn_logit_softcapping), else None.
    cross     True when keys/values come from another sequence (encoder-decoder cross-attention).
    scale     the softmax scale actually applied to q·kᵀ (T5: 1.0; Gemma: query_pre_attn_scalar**-0.5).

Example:
    >>> from lcpass.zoo import get_zoo_model
    >>> z = get_zoo_model("mistral-tiny")
    >>> z.n_attention, z.expected[0]["mask"], z.expected[0]["window"]
    (2, 'sliding', 8)
    >>> logits = z.model(**z.example_inputs).logits
"""

from __future__ import annotations

from collections.abc import Callable

from lcpass.zoo.base import MASK_KINDS, UnknownZooModelError, ZooModel, site
from lcpass.zoo.hf_tiny import (bert_tiny, bert_tiny_eager, gemma2_tiny_eager, gemma3_tiny, gemma3_tiny_eager, gpt2_tiny,
                                gpt2_tiny_eager, gptneox_tiny, gptneox_tiny_eager, llama_tiny, llama_tiny_eager, llama_tiny_padded, mistral_tiny, mistral_tiny_eager, phi3_tiny, phi3_tiny_eager, qwen2_tiny, qwen2_tiny_eager, qwen3_tiny, qwen3_tiny_eager, t5_tiny, t5_tiny_eager, vit_tiny,
                                vit_tiny_eager)
from lcpass.zoo.torch_models import NEGATIVE, TORCH_ZOO

__all__ = [
    "ZooModel",
    "ZOO",
    "TRANSFORMERS_ZOO",
    "TORCH_ZOO",
    "NEGATIVE",
    "MASK_KINDS",
    "site",
    "zoo_names",
    "negative_names",
    "get_zoo_model",
    "UnknownZooModelError",
]


# ---------------------------------------------------------------------------------------- registry

TRANSFORMERS_ZOO: dict[str, Callable[[], ZooModel]] = {
    "llama-tiny": llama_tiny,
    "llama-tiny-eager": llama_tiny_eager,
    "llama-tiny-padded": llama_tiny_padded,
    "mistral-tiny": mistral_tiny,
    "mistral-tiny-eager": mistral_tiny_eager,
    "qwen2-tiny": qwen2_tiny,
    "qwen2-tiny-eager": qwen2_tiny_eager,
    "qwen3-tiny": qwen3_tiny,
    "qwen3-tiny-eager": qwen3_tiny_eager,
    "phi3-tiny": phi3_tiny,
    "phi3-tiny-eager": phi3_tiny_eager,
    "gemma2-tiny-eager": gemma2_tiny_eager,
    "gemma3-tiny": gemma3_tiny,
    "gemma3-tiny-eager": gemma3_tiny_eager,
    "gpt2-tiny": gpt2_tiny,
    "gpt2-tiny-eager": gpt2_tiny_eager,
    "gptneox-tiny": gptneox_tiny,
    "gptneox-tiny-eager": gptneox_tiny_eager,
    "bert-tiny": bert_tiny,
    "bert-tiny-eager": bert_tiny_eager,
    "vit-tiny": vit_tiny,
    "vit-tiny-eager": vit_tiny_eager,
    "t5-tiny": t5_tiny,
    "t5-tiny-eager": t5_tiny_eager,
}

ZOO: dict[str, Callable[[], ZooModel]] = {**TRANSFORMERS_ZOO, **TORCH_ZOO}


def zoo_names(source: str | None = None) -> list[str]:
    """Names in ZOO in registry order; `source` = "transformers" or "torch" selects one half."""
    if source is None:
        return list(ZOO)
    if source == "transformers":
        return list(TRANSFORMERS_ZOO)
    if source == "torch":
        return list(TORCH_ZOO)
    raise ValueError(f"zoo_names(source={source!r}): use None, 'transformers' or 'torch'")


def negative_names() -> list[str]:
    """Names in NEGATIVE, in registry order."""
    return list(NEGATIVE)


def get_zoo_model(name: str) -> ZooModel:
    """Build the entry `name` from ZOO or NEGATIVE (a fresh, deterministic model each call).

    Raises:
        UnknownZooModelError: the name is in neither registry (the message lists the known names).
    """
    factory = ZOO.get(name) or NEGATIVE.get(name)
    if factory is None:
        raise UnknownZooModelError(
            f"unknown zoo model {name!r}; known: {', '.join(ZOO)}; negatives: {', '.join(NEGATIVE)}"
        )
    return factory()
