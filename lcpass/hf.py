"""The transformers door: run planned sites inside a model that keeps its class, config, ``generate()``
and ``save_pretrained()``.

In transformers 5 every attention module hands ``q, k, v`` (after ``cache.update``) to the function
registered under ``config._attn_implementation``. lcpass registers ``lcpass_sdpa`` / ``lcpass_eager``
(each paired with the mask builder of the implementation it replaces, so masks keep their format) and
attaches each detected site's plan to its module. The function runs the planned op for planned sites
and the model's own implementation for everything else (dense heads, inputs below the crossover,
dropout in training, T5-style ``position_bias``).

KV compression: ``generate()`` on an installed model creates a :class:`lcpass.kv.CompressedCache`
(see :func:`set_kv_cache`); the attention function binds each cache layer to its site's plan on the
first call and, once heads have evicted tokens, attends each head group's kept keys.

Example::

    >>> install(model, {"model.layers.0.self_attn": SiteRuntime(...)})   # done by lcpass.optimize
    >>> model.generate(ids)                                              # planned sites run sparse
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

from lcpass.lower import PLANNED_OP

__all__ = ["SiteRuntime", "install", "uninstall", "is_transformers_model", "set_kv_cache"]

_ATTR = "_lcpass_site"
_KV_ATTR = "_lcpass_kv_options"


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
    plan: str = ""  # the plan's label (lcpass.kv.plan_label), set by install


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
        handle = getattr(key, "_lcpass_kv", None)
        if handle is not None and handle.mode != "prefill":
            _check_binding(handle.layer, rt, query)
            if handle.mode == "compressed":
                from lcpass.kv.attend import attend_layer

                scale = float(scaling) if scaling is not None else (rt.scale if rt else query.shape[-1] ** -0.5)
                softcap = kwargs.get("softcap") or (rt.softcap if rt else 0.0) or 0.0
                if query.shape[2] == 1:
                    handle.layer.evict()  # one query: what it may not see is exactly what the policy drops now
                out = attend_layer(handle.layer, query, scale, float(softcap))
                handle.layer.evict()
                return out.transpose(1, 2).contiguous(), None
        out = _site_attention(impl, rt, module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        if handle is not None and handle.mode == "prefill":
            _bind(handle.layer, rt, query, key, attention_mask)
        return out

    lcpass_attention.__name__ = f"lcpass_{impl}_attention"
    return lcpass_attention


def _site_attention(impl: str, rt: Optional[SiteRuntime], module, query, key, value, attention_mask,
                    dropout: float, scaling: Optional[float], **kwargs: Any):
    """The site's planned attention on complete k, v (or the model's own for dense/unplanned sites)."""
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


def _kv_keep(mask: Optional[torch.Tensor], batch: int, kv_len: int) -> Optional[torch.Tensor]:
    """[B, Sk] bool: keys any query of the row may attend (padding excluded); None = no padding."""
    if mask is None or mask.dim() != 4:
        return None
    mask = mask[..., :kv_len]
    keep = mask if mask.dtype == torch.bool else mask > -1e4
    keep = keep.any(1).any(1)  # [B|1, Sk]
    if keep.shape[0] != batch:
        keep = keep.expand(batch, -1)
    return None if bool(keep.all()) else keep


def _binding(rt: Optional[SiteRuntime], query: torch.Tensor, key: torch.Tensor, kv_len: int):
    from lcpass.kv.cache import LayerBinding, _heads_key, parse_spec

    n_heads, n_kv = query.shape[1], key.shape[1]
    if rt is None or rt.dense:
        specs: list = []
        return LayerBinding(rt.site if rt else "", rt.plan if rt else "", _heads_key([("dense", {})]), "", n_heads,
                            n_kv, kv_len, True, -1, 0.0), specs
    specs = parse_spec(rt.spec)
    return LayerBinding(rt.site, rt.plan, _heads_key(specs), rt.spec, n_heads, n_kv, kv_len, rt.is_causal,
                        rt.window, rt.softcap), specs


def _check_binding(layer, rt: Optional[SiteRuntime], query: torch.Tensor) -> None:
    """A bound cache layer used by a model whose plan (at this site) differs -> ValueError naming both."""
    b = layer.binding
    if b is None:
        return
    label = rt.plan if rt else ""
    if (rt.site if rt else "") != b.site or (label and b.label and label != b.label):
        raise ValueError(
            f"CompressedCache layer {layer.layer_idx} holds KV compressed for {b.label or 'no plan'} (site "
            f"{b.site!r}) but is reused by a model running {label or 'no plan'} (site {rt.site if rt else None!r}); "
            f"use a fresh lcpass.kv.CompressedCache() per model and plan")


def _bind(layer, rt: Optional[SiteRuntime], query: torch.Tensor, key: torch.Tensor, attention_mask) -> None:
    keep = _kv_keep(attention_mask, key.shape[0], key.shape[2])
    kv_len = int(keep.sum(1).max()) if keep is not None else key.shape[2]
    binding, specs = _binding(rt, query, key, kv_len)
    layer.cache.check_plan(binding.site, binding.heads_key, binding.label, binding.n_heads)
    layer.bind(binding, specs, keep)


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
    from lcpass.kv.cache import parse_spec, plan_label

    label = plan_label({n: parse_spec(rt.spec) for n, rt in runtimes.items() if not rt.dense})
    for name, rt in runtimes.items():
        setattr(model.get_submodule(name), _ATTR, replace(rt, plan=label))
    model._lcpass_plan_label = label
    name = _register(impl)
    _set_impl(model, name)
    if hasattr(model, "_prepare_cache_for_generation") and not hasattr(model, _KV_ATTR):
        set_kv_cache(model, True)


def set_kv_cache(model: torch.nn.Module, enabled: bool = True, select: Any = None) -> None:
    """Make ``model.generate()`` use a :class:`lcpass.kv.CompressedCache` (the default after ``optimize``).

    ``select``: a :class:`lcpass.kv.Selector` for decode-time selection (Quest, TokenSelect, Recycled
    Attention, TidalDecode) on the heads that keep their whole KV. ``enabled=False`` restores
    transformers' own cache. A cache passed to ``generate(past_key_values=...)`` is always used as is.

    Example::

        >>> set_kv_cache(model, select=lcpass.kv.Selector("quest", {"token_budget": 1600}))
    """
    setattr(model, _KV_ATTR, {"enabled": bool(enabled), "select": select})
    if enabled:
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
    elif "_prepare_cache_for_generation" in model.__dict__:
        del model._prepare_cache_for_generation


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name the model's forward takes its KV cache under: ``cache`` (transformers >= the rename) or
    ``past_key_values`` (earlier 5.x releases; later ones still accept it, with a FutureWarning)."""
    import inspect as _inspect

    try:
        params = _inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: torch.nn.Module) -> Any:
    """The cache ``generate()`` would give ``model``: a fresh :class:`lcpass.kv.CompressedCache` (with the
    decode selector set by :func:`set_kv_cache`) for an ``lcpass.optimize``-d model, else None (the model's
    own default). Pass it to a plain forward to keep only the KV the plan keeps::

        >>> out = model(ids, **{lcpass.hf.cache_kwarg(model): lcpass.hf.new_cache(model)}, use_cache=True)
    """
    opts = getattr(model, _KV_ATTR, None) or {}
    if not opts.get("enabled"):
        return None
    from lcpass.kv.cache import CompressedCache

    return CompressedCache(select=opts.get("select"))


def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args: Any, **kwargs: Any):
    """generate()'s cache hook: a CompressedCache unless the caller passed a cache or asked for another kind."""
    opts = getattr(self, _KV_ATTR, None) or {}
    user = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if (opts.get("enabled") and user is None and generation_config.use_cache is not False
            and generation_config.cache_implementation is None):
        from lcpass.kv.cache import CompressedCache

        model_kwargs["cache"] = CompressedCache(select=opts.get("select"))
        return None
    return type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)


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
    if hasattr(model, _KV_ATTR):
        set_kv_cache(model, False)
        delattr(model, _KV_ATTR)
