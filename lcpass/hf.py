"""The transformers door: run planned sites inside a model that keeps its class, config, ``generate()``
and ``save_pretrained()``.

A site is reached by one of two routes (chosen and proven per model by :mod:`lcpass.hf_probe`):

* **interface** — in transformers 5 most attention modules hand ``q, k, v`` (after ``cache.update``) to
  the function registered under ``config._attn_implementation``. lcpass registers ``lcpass_sdpa`` /
  ``lcpass_eager`` (each paired with the mask builder of the implementation it replaces, so masks keep
  their format) and switches the model's configs to it.
* **function** (:mod:`lcpass.hf_inline`) — for attention written in the modeling file (Falcon's inline
  SDPA, Bloom's and MPT's ALiBi ``baddbmm -> softmax -> bmm``), the site's own ``scaled_dot_product_attention``
  or ``softmax`` call inside its module, found by its position in the captured graph.

Both routes call :func:`site_attention`, which runs the planned op for planned sites and the model's own
attention for everything else (dense heads, dropout in training), counts every call on the site's
:class:`SiteHits` (the probe's evidence that the site was reached), and handles the compressed KV cache:
``generate()`` on an installed model creates a :class:`lcpass.kv.CompressedCache` built from the cache the
model would make itself (so hybrid models keep their recurrent state and encoder-decoders their
cross-attention cache, see :func:`lcpass.kv.compress_cache`); the first call binds each cache layer to its
site's plan and, once heads have evicted tokens, attends each head group's kept keys. A plain forward with
``use_cache=True`` and no cache gets the same compressed cache.

Example::

    >>> install(model, {"model.layers.0.self_attn": [SiteRuntime(...)]})   # done by lcpass.optimize
    >>> model.generate(ids)                                              # planned sites run sparse
"""
from __future__ import annotations

import inspect as _inspect
import sys
import types
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch

from lcpass.kv.attend import attend_layer
from lcpass.kv.cache import compress_cache, plan_label
from lcpass.kv.layer import LayerBinding, heads_key, parse_spec
from lcpass.lower import PLANNED_OP, checked_kind

__all__ = ["SiteRuntime", "SiteHits", "install", "uninstall", "is_transformers_model", "set_kv_cache", "new_cache",
           "cache_kwarg", "site_attention", "module_of", "runtimes_of", "hits_of", "reset_hits", "FALLBACK_OK"]

SITES_ATTR = "_lcpass_sites"  # tuple[SiteRuntime, ...], one per site of the module in call order
HITS_ATTR = "_lcpass_hits"  # tuple[SiteHits, ...]
_NEXT_ATTR = "_lcpass_next"  # which of the module's sites the next interface call is
_HOOK_ATTR = "_lcpass_hf_hooks"
_KV_ATTR = "_lcpass_kv_options"
INLINE_ATTR = "_lcpass_inline"  # the function route's state on a module (lcpass.hf_inline)

# a planned site that runs the model's own attention for one of these reasons still runs its plan's meaning
FALLBACK_OK = ("training-dropout",)


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
    route: str = "interface"  # interface | function
    chunk: int = -1  # chunked attention (Llama-4): a query sees only keys of its own chunk


@dataclass
class SiteHits:
    """How often a site was reached, and why a planned site ran the model's own attention instead."""

    calls: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)

    def fallback(self, why: str) -> None:
        self.fallbacks[why] = self.fallbacks.get(why, 0) + 1


def is_transformers_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def module_of(site: str) -> str:
    """The module path of a site name (``layer#1`` is the second site of ``layer``)."""
    return site.split("#", 1)[0]


def runtimes_of(module: torch.nn.Module) -> tuple[SiteRuntime, ...]:
    return getattr(module, SITES_ATTR, ())


def hits_of(module: torch.nn.Module) -> tuple[SiteHits, ...]:
    return getattr(module, HITS_ATTR, ())


def reset_hits(model: torch.nn.Module) -> None:
    for mod in model.modules():
        if hasattr(mod, HITS_ATTR):
            setattr(mod, HITS_ATTR, tuple(SiteHits() for _ in getattr(mod, HITS_ATTR)))


def _original(module: torch.nn.Module, impl: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"lcpass: {type(module).__name__} has no eager_attention_forward in "
                               f"{type(module).__module__}; optimize it with attn_implementation='sdpa'")
        return fn
    return ALL_ATTENTION_FUNCTIONS[impl]


def _fold_bias(mask: Optional[torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
    """An additive score bias (T5's position_bias) folded into the attention mask as one float mask."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask


def site_attention(rt: Optional[SiteRuntime], hits: Optional[SiteHits], module: torch.nn.Module,
                   query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor], dropout: float, scaling: Optional[float],
                   own: Callable[[], Any], *, softcap: Optional[float] = None,
                   bias: Optional[torch.Tensor] = None, s_aux: Any = None) -> Optional[torch.Tensor]:
    """The site's attention, ``[B, Hq, Sq, Dv]``, or None where the model's own attention (``own()``, called
    by the route) is the right answer: dense sites and dropout in training.

    q: [B, Hq, Sq, Dk]; k, v: [B, Hkv, Sk, Dk|Dv] (cache already updated, heads not repeated).
    Reads the compressed-cache handle a :class:`lcpass.kv.CompressedCache` put on ``key``.
    """
    if hits is not None:
        hits.calls += 1
    handle = getattr(key, "_lcpass_kv", None)
    if handle is not None and s_aux is not None:
        raise ValueError(f"lcpass: site {rt.site if rt else type(module).__name__}: compressed KV caches do not "
                         "carry learned attention sinks (s_aux) yet; use the model's own cache "
                         "(lcpass.hf.set_kv_cache(model, False))")
    if handle is not None and rt is not None and rt.chunk >= 1:
        raise ValueError(f"lcpass: site {rt.site}: compressed KV caches do not carry chunked attention "
                         f"(chunks of {rt.chunk}) yet; use the model's own cache (lcpass.hf.set_kv_cache(model, False))")
    scale = float(scaling) if scaling is not None else (rt.scale if rt else query.shape[-1] ** -0.5)
    cap = float(softcap or (rt.softcap if rt else 0.0) or 0.0)
    if handle is not None and handle.mode != "prefill":
        _check_binding(handle.layer, rt)
        if handle.mode == "compressed":
            if query.shape[2] == 1:
                handle.layer.evict()  # one query: what it may not see is exactly what the policy drops now
            out = attend_layer(handle.layer, query, scale, cap)
            handle.layer.evict()
            return out
    out = None
    if rt is None or rt.dense:
        pass
    elif dropout and module.training:
        hits is not None and hits.fallback("training-dropout")
    elif s_aux is not None and (not isinstance(s_aux, torch.Tensor) or s_aux.numel() != query.shape[1]):
        hits is not None and hits.fallback(f"learned attention sinks (s_aux) of shape "
                                           f"{tuple(getattr(s_aux, 'shape', ()))}, not one per query head")
    else:
        mask = attention_mask
        if mask is not None and mask.dim() == 4 and mask.shape[-1] != key.shape[-2]:
            mask = mask[..., : key.shape[-2]]
        causal, window, chunk, kind = rt.is_causal, rt.window, rt.chunk, rt.mask_kind
        if mask is not None or bias is not None:
            # the model's run-time mask says what this call attends: the site's causality is a claim
            # about it, checked by the planned op (a caller's custom 4-D mask runs exactly)
            base = "bias" if bias is not None else "padding"
            mask = _fold_bias(mask, bias) if bias is not None else mask
            causal, window, chunk, kind = False, -1, -1, checked_kind(rt.is_causal, rt.window, base, rt.chunk)
        sinks = None if s_aux is None else s_aux.reshape(1, -1, 1, 1)  # one logit per query head
        out = PLANNED_OP(query, key, value, mask, scale, causal, window, cap, 0.0, rt.site, kind, rt.spec, sinks,
                         chunk)
    if handle is not None and handle.mode == "prefill":
        own_out = out
        _bind(handle.layer, rt, query, key, attention_mask)
        return own_out
    return out


def _next_site(module: torch.nn.Module) -> tuple[Optional[SiteRuntime], Optional[SiteHits]]:
    rts, hits = runtimes_of(module), hits_of(module)
    if not rts:
        return None, None
    i = getattr(module, _NEXT_ATTR, 0) % len(rts)
    setattr(module, _NEXT_ATTR, i + 1)
    return rts[i], hits[i]


def _make_attention(impl: str) -> Callable:
    def lcpass_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: Optional[float] = None, **kwargs: Any):
        rt, hits = _next_site(module)
        if rt is not None and rt.route != "interface":
            rt, hits = None, None  # reached by the function route; here the model's own attention
        bias = kwargs.get("position_bias")

        def own():
            return _original(module, impl)(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, **kwargs)

        if rt is not None and not rt.dense and _disagrees_on_causality(impl, rt, module, query, key,
                                                                       attention_mask, kwargs):
            hits.fallback(f"the model computes this attention {'bidirectionally' if rt.is_causal else 'causally'}"
                          f" here (no mask; {impl} with is_causal={getattr(module, 'is_causal', None)}), the "
                          f"captured graph {'causally' if rt.is_causal else 'bidirectionally'}")
            rt = None
        out = site_attention(rt, hits, module, query, key, value, attention_mask, dropout, scaling, own,
                             softcap=kwargs.get("softcap"), bias=bias, s_aux=kwargs.get("s_aux"))
        if out is None:
            return own()
        return out.transpose(1, 2).contiguous(), None

    lcpass_attention.__name__ = f"lcpass_{impl}_attention"
    return lcpass_attention


def _disagrees_on_causality(impl: str, rt: SiteRuntime, module: torch.nn.Module, query: torch.Tensor,
                            key: torch.Tensor, mask: Optional[torch.Tensor], kwargs: dict) -> bool:
    """Without a mask, the model's own function decides causality at run time (eager: none; SDPA: the
    call's or the module's ``is_causal``). Where that differs from the captured site (PaliGemma's SDPA path
    runs its prefix bidirectionally while its traced mask is causal), the plan would change the answer."""
    if mask is not None or rt.window >= 0 or rt.chunk >= 1 or query.shape[2] <= 1 or query.shape[2] != key.shape[2]:
        return False
    if impl == "eager":
        own_causal = False
    elif impl == "sdpa":
        flag = kwargs.get("is_causal")
        own_causal = bool(getattr(module, "is_causal", True) if flag is None else flag)
    else:
        return False
    return own_causal != bool(rt.is_causal)


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


def layer_binding(rt: Optional[SiteRuntime], query: torch.Tensor, key: torch.Tensor, kv_len: int):
    """The :class:`lcpass.kv.layer.LayerBinding` (and head specs) a site gives its cache layer."""
    n_heads, n_kv = query.shape[1], key.shape[1]
    if rt is None or rt.dense:
        return LayerBinding(rt.site if rt else "", rt.plan if rt else "", heads_key([("dense", {})]), "", n_heads,
                            n_kv, kv_len, True, rt.window if rt else -1, 0.0), []
    specs = parse_spec(rt.spec)
    return LayerBinding(rt.site, rt.plan, heads_key(specs), rt.spec, n_heads, n_kv, kv_len, rt.is_causal,
                        rt.window, rt.softcap), specs


def _check_binding(layer, rt: Optional[SiteRuntime]) -> None:
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
    binding, specs = layer_binding(rt, query, key, kv_len)
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


def base_impl(model: torch.nn.Module) -> str:
    """The model's own attention implementation (without lcpass's prefix)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return impl[len("lcpass_"):] if impl.startswith("lcpass_") else impl


def _reset_next(modules: list[torch.nn.Module]) -> Callable:
    """A forward pre-hook for the root model: every site module starts the forward at its first site.

    The ordinals count a module's attention calls over one forward of the *model*, not of the module: a
    module shared by several layers (ALBERT) or run in a loop (HRM) has one site per call."""
    def hook(root, args, kwargs=None):
        for mod in modules:
            mod.__dict__[_NEXT_ATTR] = 0
    return hook


def install(model: torch.nn.Module, runtimes: dict[str, list[SiteRuntime]], *, rename: bool = True) -> None:
    """Attach each module's site runtimes (in call order) and, with ``rename``, switch the model to the
    lcpass attention functions. Function-route sites are installed by :func:`lcpass.hf_inline.install_inline`."""
    impl = base_impl(model)
    if rename and impl not in ("sdpa", "eager"):
        raise ValueError(f"lcpass.optimize: attn_implementation={impl!r} is not supported; load the model with "
                         "attn_implementation='sdpa' or 'eager'")
    flat = [rt for rts in runtimes.values() for rt in rts]
    label = plan_label({rt.site: parse_spec(rt.spec) for rt in flat if not rt.dense})
    site_modules = []
    for path, rts in runtimes.items():
        try:
            module = model.get_submodule(path)
        except AttributeError as exc:
            raise ValueError(f"lcpass.optimize: site {rts[0].site!r} names no submodule of "
                             f"{type(model).__name__} ({path!r})") from exc
        setattr(module, SITES_ATTR, tuple(replace(rt, plan=label) for rt in rts))
        setattr(module, HITS_ATTR, tuple(SiteHits() for _ in rts))
        setattr(module, _NEXT_ATTR, 0)
        site_modules.append(module)
    for h in model.__dict__.pop(_HOOK_ATTR, []):
        h.remove()
    model.__dict__[_HOOK_ATTR] = [model.register_forward_pre_hook(_reset_next(site_modules))]
    model._lcpass_plan_label = label
    if rename:
        _set_impl(model, _register(impl))
    else:
        _set_impl(model, impl)
    if hasattr(model, "_prepare_cache_for_generation") and not hasattr(model, _KV_ATTR):
        set_kv_cache(model, True)


def set_kv_cache(model: torch.nn.Module, enabled: bool = True, select: Any = None, *,
                 plain_layers: frozenset = frozenset(), reason: str = "") -> None:
    """Make ``model.generate()`` (and plain forwards with ``use_cache=True``) use a
    :class:`lcpass.kv.CompressedCache` (the default after ``optimize``).

    ``select``: a :class:`lcpass.kv.Selector` for decode-time selection (Quest, TokenSelect, Recycled
    Attention, TidalDecode) on the heads that keep their whole KV. ``enabled=False`` restores
    transformers' own cache (``reason`` says why, e.g. a model with a cache class of its own).
    ``plain_layers``: cache layers kept whole (sites whose route cannot see the cache). A cache passed to
    ``generate`` or ``forward`` is always used as is.

    Example::

        >>> set_kv_cache(model, select=lcpass.kv.Selector("quest", {"token_budget": 1600}))
    """
    setattr(model, _KV_ATTR, {"enabled": bool(enabled), "select": select, "plain_layers": frozenset(plain_layers),
                              "reason": reason})
    hooks = model.__dict__.setdefault("_lcpass_cache_hooks", [])
    for h in hooks:
        h.remove()
    hooks.clear()
    if enabled:
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
        hooks.append(model.register_forward_pre_hook(_inject_cache, with_kwargs=True))
    elif "_prepare_cache_for_generation" in model.__dict__:
        del model._prepare_cache_for_generation


def kv_options(model: torch.nn.Module) -> dict[str, Any]:
    return getattr(model, _KV_ATTR, None) or {}


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name the model's forward takes its KV cache under: ``cache`` (transformers >= the rename) or
    ``past_key_values`` (earlier 5.x releases; later ones still accept it, with a FutureWarning)."""
    try:
        params = _inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _own_cache(model: torch.nn.Module) -> Any:
    """The cache transformers would make for a plain forward of ``model`` (None: the model makes its own)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return None
    config = model.config.get_text_config(decoder=True)
    cache = DynamicCache(config=config)
    if getattr(model.config, "is_encoder_decoder", False):
        cache = EncoderDecoderCache(cache, DynamicCache(config=config))
    return cache


def new_cache(model: torch.nn.Module, own: Any = None) -> Any:
    """The cache ``generate()`` gives ``model``: the model's own cache (``own``, or the one transformers would
    make) with its attention layers compressed as the plan says (:func:`lcpass.kv.compress_cache`), for an
    ``lcpass.optimize``-d model; else None (the model's own default). Pass it to a plain forward::

        >>> out = model(ids, **{lcpass.hf.cache_kwarg(model): lcpass.hf.new_cache(model)}, use_cache=True)
    """
    opts = kv_options(model)
    if not opts.get("enabled"):
        return None
    own = own if own is not None else _own_cache(model)
    if own is None:
        return None
    return compress_cache(own, select=opts.get("select"), plain_layers=opts.get("plain_layers", frozenset()))


def _inject_cache(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: ``use_cache`` asked (or the config's default) and no cache passed -> the compressed
    cache (exactly what generate() would give)."""
    if any(kwargs.get(n) is not None for n in ("cache", "past_key_values")):
        return None
    use = kwargs.get("use_cache")
    if use is None:
        use = getattr(module.config, "use_cache", False)
    if not use or module.training:
        return None
    cache = new_cache(module)
    if cache is None:
        return None
    kwargs = dict(kwargs)
    kwargs[cache_kwarg(module)] = cache
    return args, kwargs


def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args: Any, **kwargs: Any):
    """generate()'s cache hook: the model's own cache, then its attention layers compressed (a cache the
    caller passed, or another kind asked for, is left alone)."""
    from transformers.cache_utils import Cache

    opts = kv_options(self)
    user = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    result = type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
    if user is not None or not opts.get("enabled") or generation_config.cache_implementation is not None:
        return result
    for name in ("cache", "past_key_values"):
        own = model_kwargs.get(name)
        if isinstance(own, Cache):
            model_kwargs[name] = new_cache(self, own)
    return result


def _set_impl(model: torch.nn.Module, name: str) -> None:
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            _set_config_impl(cfg, name)


def _set_config_impl(cfg: Any, name: str, depth: int = 0) -> None:
    current = getattr(cfg, "_attn_implementation", None)
    if current is not None and current.split("lcpass_")[-1] not in ("sdpa", "eager"):
        return  # flash / flex sub-configs are not lcpass's
    try:
        cfg._attn_implementation = name
    except Exception:  # noqa: BLE001 - some sub-configs refuse; their modules keep their attention
        return
    if depth < 2:
        for sub in list(getattr(cfg, "sub_configs", {}) or {}) + ["text_config", "vision_config", "encoder",
                                                                   "decoder"]:
            subcfg = getattr(cfg, sub, None)
            if subcfg is not None and hasattr(subcfg, "_attn_implementation"):
                _set_config_impl(subcfg, name, depth + 1)


def uninstall(model: torch.nn.Module) -> None:
    """Restore the model's own attention implementation, cache and inline calls."""
    _set_impl(model, base_impl(model))
    for mod in model.modules():
        for h in mod.__dict__.pop(INLINE_ATTR, {}).get("hooks", []):
            h.remove()
        for attr in (SITES_ATTR, HITS_ATTR, _NEXT_ATTR):
            if hasattr(mod, attr):
                delattr(mod, attr)
        for h in mod.__dict__.pop(_HOOK_ATTR, []):
            h.remove()
    if hasattr(model, _KV_ATTR):
        set_kv_cache(model, False)
        delattr(model, _KV_ATTR)
