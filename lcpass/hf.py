"""The transformers door: run planned sites inside a model that keeps its class, config, ``generate()``
and ``save_pretrained()``.

In transformers 5 every attention module hands ``q, k, v`` (after ``cache.update``) to the function
registered under ``config._attn_implementation``. lcpass registers ``lcpass_sdpa`` / ``lcpass_eager``
(each paired with the mask builder of the implementation it replaces, so masks keep their format) and
attaches each detected site's plan to its module. The function runs the planned op for planned sites
and the model's own implementation for everything else (dense heads, inputs below the crossover,
dropout in training, T5-style ``position_bias``).

Example::

    >>> install(model, {"model.layers.0.self_attn": SiteRuntime(...)})   # done by lcpass.optimize
    >>> model.generate(ids)                                              # planned sites run sparse
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from lcpass.lower import PLANNED_OP

__all__ = ["SiteRuntime", "install", "uninstall", "is_transformers_model"]

_ATTR = "_lcpass_site"


@dataclass(frozen=True)
class SiteRuntime:
    """What the attention hook needs to know about one site (from detection and the plan)."""

    site: str
    spec: str  # spec_json of the head specs
    dense: bool
    is_causal: bool
    window: int
    scale: float
    softcap: float
    mask_kind: str


def is_transformers_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def _original(module: torch.nn.Module, impl: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"lcpass: {type(module).__name__} has no eager_attention_forward in "
                               f"{type(module).__module__}; optimize it with attn_implementation='sdpa'")
        return fn
    return ALL_ATTENTION_FUNCTIONS[impl]


def _make_attention(impl: str) -> Callable:
    def lcpass_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: Optional[float] = None, **kwargs: Any):
        rt: Optional[SiteRuntime] = getattr(module, _ATTR, None)
        bias = kwargs.get("position_bias")
        if rt is None or rt.dense or (dropout and module.training) or bias is not None \
                or kwargs.get("s_aux") is not None:
            return _original(module, impl)(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, **kwargs)
        mask = attention_mask
        if mask is not None and mask.dim() == 4 and mask.shape[-1] != key.shape[-2]:
            mask = mask[..., : key.shape[-2]]
        softcap = kwargs.get("softcap") or rt.softcap or 0.0
        scale = float(scaling) if scaling is not None else rt.scale
        # q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D] (cache already updated, heads not repeated)
        out = PLANNED_OP(query, key, value, mask, scale, rt.is_causal, rt.window, float(softcap), 0.0, rt.site,
                         "padding" if mask is not None else rt.mask_kind, rt.spec)
        return out.transpose(1, 2).contiguous(), None

    lcpass_attention.__name__ = f"lcpass_{impl}_attention"
    return lcpass_attention


def _register(impl: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"lcpass_{impl}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(impl))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[impl])
    return name


def install(model: torch.nn.Module, runtimes: dict[str, SiteRuntime]) -> None:
    """Attach each site's runtime to its module and switch the model to the lcpass attention."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl.startswith("lcpass_"):
        impl = impl[len("lcpass_"):]
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"lcpass.optimize: attn_implementation={impl!r} is not supported; load the model with "
                         "attn_implementation='sdpa' or 'eager'")
    for name, rt in runtimes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"lcpass.optimize: site {name!r} is not a submodule of {type(model).__name__}") from exc
        setattr(module, _ATTR, rt)
    name = _register(impl)
    _set_impl(model, name)


def _set_impl(model: torch.nn.Module, name: str) -> None:
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name
            for sub in ("text_config", "vision_config", "encoder", "decoder"):
                subcfg = getattr(cfg, sub, None)
                if subcfg is not None and hasattr(subcfg, "_attn_implementation"):
                    subcfg._attn_implementation = name


def uninstall(model: torch.nn.Module) -> None:
    """Restore the model's own attention implementation."""
    impl = model.config._attn_implementation
    if impl.startswith("lcpass_"):
        _set_impl(model, impl[len("lcpass_"):])
    for mod in model.modules():
        if hasattr(mod, _ATTR):
            delattr(mod, _ATTR)
