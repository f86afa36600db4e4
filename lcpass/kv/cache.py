"""``CompressedCache``: a transformers ``Cache`` that keeps, per KV head, only what the plan needs.

Each layer (:mod:`lcpass.kv.layer`) stores its KV heads in groups of heads that share one KV policy
(:mod:`lcpass.kv.group`), each a compact tensor of its own length, so evicted entries are freed, not masked.
This module owns the cache itself: its layers, the plan it is bound to (:func:`plan_label`, refusing a model
that runs another plan), the memory reports (``nbytes``, ``dense_nbytes``, ``breakdown``), and
:func:`compress_cache`, which puts compressed layers in place of the attention layers of the cache the
model itself makes (recurrent / convolution layers stay transformers' own).

Example::

    >>> model = lcpass.optimize(model, method="streaming", sink=4, window=252)
    >>> out = model.generate(ids, max_new_tokens=64)          # uses a CompressedCache automatically
    >>> cache = lcpass.kv.CompressedCache()
    >>> model(ids, cache=cache); cache.nbytes()      # by hand (past_key_values= before transformers' rename)
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from torch import Tensor
from transformers.cache_utils import (Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer, EncoderDecoderCache,
                                     LinearAttentionAndFullAttentionLayer,
                                     LinearAttentionAndSlidingWindowAttentionLayer)

# KVGroup, tensor_bytes (group), the layer names (layer) and lower_site_mask (attend) lived here before the
# split: re-exported so ``from lcpass.kv.cache import ...`` keeps working; new code imports their own modules
from lcpass.kv.attend import lower_site_mask
from lcpass.kv.group import KVGroup, tensor_bytes
from lcpass.kv.layer import (CompressedHybridLayer, CompressedLayer, KVHandle, LayerBinding, handle_of, heads_key,
                             parse_spec, within_window)
from lcpass.kv.select import Selector
from lcpass.methods import spec_parts

__all__ = ["CompressedCache", "CompressedLayer", "KVGroup", "KVHandle", "LayerBinding", "compress_cache", "heads_key",
           "plan_label", "tensor_bytes"]


def plan_label(site_specs: dict[str, Any]) -> str:
    """A short human name for a plan: its methods and a hash of its per-site head specs.

    >>> plan_label({"l0": [("streaming", {"sink": 4, "window": 8})]})[:9]
    'streaming'
    """
    norm = {site: [[spec_parts(s)[0], dict(sorted(dict(spec_parts(s)[1]).items()))] for s in specs]
            for site, specs in sorted(site_specs.items())}
    digest = hashlib.sha256(json.dumps(norm, sort_keys=True).encode()).hexdigest()[:8]
    names = sorted({m for specs in norm.values() for m, _ in specs})
    return f"{'+'.join(names) or 'empty'} plan #{digest}"


class CompressedCache(Cache):
    """A KV cache that stores, per layer and KV head, what the optimized model's plan keeps.

    Args:
        plan: the :class:`~lcpass.plan.Plan` this cache is for (optional). When given, every layer checks
            on its first use that the model runs this plan, and refuses another one (ValueError naming
            both). Without it the cache adopts the plan of the first model that uses it, and still refuses
            a model running a different plan.
        select: a decode-time :class:`~lcpass.kv.select.Selector` (Quest, TokenSelect, Recycled Attention,
            TidalDecode) applied to the KV heads that keep everything (retrieval / dense heads of planned
            sites): each generated token then reads only the selected KV blocks.
        layers: the layers to start from (:func:`compress_cache` passes the model's own cache layers with
            its attention layers replaced): a hybrid model's recurrent / convolution layers stay
            transformers' own. Without it, one :class:`CompressedLayer` per layer is made on first use.
        plain_layers: layer indices kept whole, as transformers' ``DynamicLayer`` would (sites whose route
            never sees the cache).

    Example::

        >>> m = lcpass.optimize(model, method="duo", ...)                 # or plan=...
        >>> cache = CompressedCache(plan)
        >>> out = m(ids, cache=cache, use_cache=True)
        >>> cache.nbytes() / cache.dense_nbytes()                         # e.g. 0.54
    """

    is_compileable = False

    def __init__(self, plan: Any = None, *, select: Optional[Selector] = None, layers: Optional[list] = None,
                 plain_layers: frozenset = frozenset()):
        super().__init__(layers=[])
        self.plan = plan
        self.select = select
        self.plain_layers = frozenset(plain_layers)
        self.label: Optional[str] = plan_label({s: list(p.heads) for s, p in plan.sites.items()}) \
            if plan is not None else None
        self.shared: dict[str, Any] = {}  # cross-layer decode state (TidalDecode's positions)
        for i, layer in enumerate(layers or ()):
            kind = _kv_kind(layer)
            self.layers.append(layer if kind is None else self._attention_layer(i, layer))

    def _attention_layer(self, i: int, like: Any = None):
        """The layer that stands in for transformers' attention layer ``like`` (None: a plain one)."""
        if i in self.plain_layers:
            return like if like is not None else DynamicLayer()
        if like is not None and _kv_kind(like) == "hybrid":
            return CompressedHybridLayer(self, i, number_of_states=like.number_of_states)
        return CompressedLayer(self, i)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(self._attention_layer(len(self.layers)))
        layer = self.layers[layer_idx]
        if isinstance(layer, CompressedLayer):
            return layer.update(key_states, value_states)
        return layer.update(key_states, value_states, *args, **kwargs)

    def compressed_layers(self) -> list["CompressedLayer"]:
        return [layer for layer in self.layers if isinstance(layer, CompressedLayer)]

    @property
    def is_croppable(self) -> bool:  # evicted tokens cannot come back
        return False

    @property
    def batch_size(self) -> int:
        values = set()
        for layer in self.layers:
            b = layer.batch_size if isinstance(layer, CompressedLayer) else getattr(layer, "batch_size", -1)
            if isinstance(b, int) and b >= 0:
                values.add(b)
        return values.pop() if len(values) == 1 else -1

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (KV, positions, compensation sums, selector metadata, and
        the recurrent / convolution state of a hybrid model's other layers)."""
        return tensor_bytes([t for layer in self.layers for t in _layer_tensors(layer)])

    def dense_nbytes(self) -> int:
        """Bytes the model's own cache (``DynamicCache``) holding the same tokens would use."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                total += layer.dense_nbytes()
            else:
                total += tensor_bytes(_layer_tensors(layer))
        return total

    def breakdown(self) -> list[dict[str, Any]]:
        """Per layer: site, tokens seen, bytes held, dense bytes, and each group's heads/policy/slots/bytes."""
        out = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, CompressedLayer):
                out.append(layer.breakdown())
            else:
                b = tensor_bytes(_layer_tensors(layer))
                out.append({"layer": i, "site": None, "kind": type(layer).__name__, "bytes": b, "dense_bytes": b,
                            "groups": []})
        return out

    # -- plan checks (called by the attention function when a layer is first used) ----------------
    def check_plan(self, site: str, key: str, label: str, n_heads: int) -> None:
        """Refuse a model whose plan differs from the one this cache is bound to (ValueError naming both)."""
        if self.plan is not None:
            want = heads_key(self.plan.resolve(site, n_heads)) if site else heads_key([])
            if want != key:
                raise ValueError(
                    f"CompressedCache was made for {self.label} but the model runs {label or 'no plan'} "
                    f"(site {site!r}: cache expects {want}, model has {key}); create the cache with "
                    f"CompressedCache(plan) for the model's own plan, or a fresh CompressedCache()")
        if label and self.label is None:
            self.label = label
        elif label and self.label != label and self.plan is None:
            raise ValueError(
                f"CompressedCache is bound to {self.label} but is reused by a model running {label}; "
                f"a cache holds KV compressed for one plan: use a fresh CompressedCache() per model/plan")


def _kv_kind(layer: Any) -> Optional[str]:
    """"attention" for transformers' per-token KV layers (full or sliding), "hybrid" for a layer that also
    carries recurrent / convolution state (Zamba2, Falcon-H1 ...): the kinds lcpass compresses."""
    if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer):
        return "attention"
    if type(layer) in (LinearAttentionAndFullAttentionLayer, LinearAttentionAndSlidingWindowAttentionLayer):
        return "hybrid"
    return None


def _layer_tensors(layer: Any) -> list[Tensor]:
    if isinstance(layer, CompressedLayer):
        return layer.tensors()
    out: list[Tensor] = []
    for v in vars(layer).values():
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else (v,)
        out.extend(t for t in items if isinstance(t, Tensor))
    return out


def compress_cache(cache: Any, *, select: Optional[Selector] = None, plain_layers: frozenset = frozenset()) -> Any:
    """The model's own ``cache`` with its attention KV layers compressed: a :class:`CompressedCache` over the
    same layers, transformers' recurrent / convolution / dummy layers kept as they are; an
    ``EncoderDecoderCache`` keeps its cross-attention cache whole (encoder KV is computed once) and gets its
    self-attention cache compressed. A cache of a kind lcpass does not know is returned unchanged.

    >>> from transformers import DynamicCache
    >>> type(compress_cache(DynamicCache())).__name__
    'CompressedCache'
    """
    if isinstance(cache, CompressedCache):
        return cache
    if isinstance(cache, EncoderDecoderCache):
        return EncoderDecoderCache(compress_cache(cache.self_attention_cache, select=select,
                                                  plain_layers=plain_layers), cache.cross_attention_cache)
    if type(cache) is DynamicCache:
        return CompressedCache(select=select, layers=list(cache.layers), plain_layers=plain_layers)
    return cache
