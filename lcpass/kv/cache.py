"""``CompressedCache``: a transformers ``Cache`` that keeps, per KV head, only what the plan needs.

Each layer stores its KV heads in *groups* of heads that share one KV policy (from
:func:`lcpass.methods.kv_head_policies`): ``all`` (retrieval / dense heads), ``sinks+recent``
(StreamingLLM, DuoAttention streaming heads, MoA) or ``compensated`` (RazorAttention: sinks + recent +
one running-mean token of everything dropped). Every group is a compact tensor of its own length, so
evicted entries are freed, not masked::

    group.keys, group.values : [B, h, L, D]     h = KV heads of the group, L = kept slots
    group.pos                : [B, L] int32     row-relative position of each slot (-1 = empty slot)
    group.comp_k/comp_v      : [B, h, 1, D] fp32 sums of the dropped keys / values (razor only)
    group.comp_n             : [B] fp32         how many tokens were folded into them

RoPE is applied before ``cache.update``, so a kept key keeps the rotation of its original position;
``pos`` only serves the method's mask (sinks count from each row's first real token, as the row would
run alone) and left padding (empty slots).

How it meets the model: ``update`` returns the tensors the attention function needs, tagged with the
layer (``key._lcpass_kv``). The lcpass attention function (:mod:`lcpass.hf`) binds the layer to the
site's plan on the first call (prefill: full attention on the prompt, then eviction), and afterwards
attends each group's kept keys (:mod:`lcpass.kv.attend`). While a layer holds every token of a
single group (nothing evicted yet, or a dense plan) it behaves exactly like ``DynamicCache``.

Example::

    >>> model = lcpass.optimize(model, method="streaming", sink=4, window=252)
    >>> out = model.generate(ids, max_new_tokens=64)          # uses a CompressedCache automatically
    >>> cache = lcpass.kv.CompressedCache()
    >>> model(ids, cache=cache); cache.nbytes()      # by hand (past_key_values= before transformers' rename)
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from transformers.cache_utils import (Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer,
                                     LinearAttentionAndFullAttentionLayer,
                                     LinearAttentionAndSlidingWindowAttentionLayer, LinearAttentionLayer)

from lcpass.kv.select import Selector, selector_from_spec
from lcpass.methods import KVPolicy, kv_head_policies, spec_parts

__all__ = ["CompressedCache", "CompressedLayer", "KVGroup", "KVHandle", "LayerBinding", "compress_cache", "heads_key",
           "plan_label", "tensor_bytes"]


def tensor_bytes(tensors: Sequence[Optional[Tensor]]) -> int:
    """Bytes of the storages behind ``tensors`` (each storage counted once; views count their whole base).

    >>> t = torch.zeros(4, 8)
    >>> tensor_bytes([t, t[:2]])
    128
    """
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


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


@dataclass(eq=False)
class KVGroup:
    """The KV heads of one layer that share a policy (and decode selector), in compact storage."""

    heads: list[int]  # KV head indices within the layer
    policy: KVPolicy
    selector: Optional[Selector] = None
    keys: Optional[Tensor] = None  # [B, h, L, D]
    values: Optional[Tensor] = None
    pos: Optional[Tensor] = None  # [B, L] int32, -1 = empty slot
    comp_k: Optional[Tensor] = None  # [B, h, 1, D] fp32 sum of dropped keys (compensated policy)
    comp_v: Optional[Tensor] = None
    comp_n: Optional[Tensor] = None  # [B] fp32
    state: dict = field(default_factory=dict)  # decode selector state (page statistics, last query, ...)

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def tensors(self) -> list[Tensor]:
        out = [t for t in (self.keys, self.values, self.pos, self.comp_k, self.comp_v, self.comp_n) if t is not None]
        for v in self.state.values():  # selector state (page statistics, gathered selections) is memory too
            items = v.values() if isinstance(v, dict) else v if isinstance(v, (tuple, list)) else (v,)
            out.extend(x for x in items if isinstance(x, Tensor))
        return out

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """k, v: [B, h, q, D] new entries; pos: [B, q] their row-relative positions (-1 = padding)."""
        if self.keys is None:
            self.keys, self.values, self.pos = k, v, pos
            return
        self.keys = torch.cat([self.keys, k], dim=2)
        self.values = torch.cat([self.values, v], dim=2)
        self.pos = torch.cat([self.pos, pos], dim=1)

    def needs_eviction(self) -> bool:
        if self.policy.kind not in ("sinks+recent", "compensated") or self.keys is None:
            return False
        return self.length > self.policy.sink + self.policy.recent or not bool((self.pos >= 0).all())

    def evict(self) -> None:
        """Drop what the policy does not keep (per row: first ``sink`` and last ``recent`` real tokens).

        Compensated groups fold every dropped entry into the running sums ``comp_k``/``comp_v``.
        """
        if not self.needs_eviction():
            return
        sink, recent = self.policy.sink, self.policy.recent
        K, V, pos = self.keys, self.values, self.pos
        B, h, L, D = K.shape
        valid = pos >= 0
        if bool(valid.all()):
            # every row holds the same slots: slice (no gather)
            drop = slice(sink, L - recent)
            if self.policy.kind == "compensated":
                self._fold(K[:, :, drop].float().sum(2, keepdim=True), V[:, :, drop].float().sum(2, keepdim=True),
                           torch.full((B,), float(L - recent - sink), device=K.device))
            self.keys = torch.cat([K[:, :, :sink], K[:, :, L - recent:]], dim=2)
            self.values = torch.cat([V[:, :, :sink], V[:, :, L - recent:]], dim=2)
            self.pos = torch.cat([pos[:, :sink], pos[:, L - recent:]], dim=1)
            return
        rank = valid.long().cumsum(1) - 1  # [B, L] rank among the row's real entries
        n = valid.sum(1, keepdim=True)  # [B, 1]
        keep = valid & ((rank < sink) | (rank >= n - recent))
        if self.policy.kind == "compensated":
            dropped = (valid & ~keep).to(torch.float32)  # [B, L]
            w = dropped[:, None, :, None]
            self._fold((K.float() * w).sum(2, keepdim=True), (V.float() * w).sum(2, keepdim=True), dropped.sum(1))
        new_len = int(keep.sum(1).max().item())
        # kept slots of each row, right-aligned, original order; rows with fewer get empty slots first
        order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, L - new_len:]  # [B, new_len]
        kept = keep.gather(1, order)
        idx = order[:, None, :, None].expand(B, h, new_len, D)
        self.keys = K.gather(2, idx)
        self.values = V.gather(2, idx)
        self.pos = torch.where(kept, pos.gather(1, order), torch.full_like(order, -1, dtype=pos.dtype))

    def _fold(self, ks: Tensor, vs: Tensor, n: Tensor) -> None:
        if self.comp_k is None:
            self.comp_k, self.comp_v, self.comp_n = ks, vs, n.to(torch.float32)
        else:
            self.comp_k = self.comp_k + ks
            self.comp_v = self.comp_v + vs
            self.comp_n = self.comp_n + n

    def index_batch(self, fn) -> None:
        for name in ("keys", "values", "pos", "comp_k", "comp_v", "comp_n"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        self.state.clear()


@dataclass(frozen=True)
class LayerBinding:
    """What a layer learned from its site on the first call."""

    site: str
    label: str  # the plan's label (plan_label) as installed on the model
    heads_key: str  # normalised per-head specs (to compare plans)
    spec: str  # the planned op's spec JSON ('' for sites without a plan)
    n_heads: int
    n_kv_heads: int
    kv_len: int  # prompt length the policies were computed for
    is_causal: bool
    window: int
    softcap: float


@dataclass(frozen=True)
class KVHandle:
    """The tag ``update`` puts on the key it returns: which layer, and which path the attention takes.

    mode: ``"prefill"`` (layer not bound yet; k, v are the whole context), ``"plain"`` (k, v are the
    layer's complete cache, nothing evicted: attend as usual) or ``"compressed"`` (k, v are only the new
    entries; attend the groups' kept keys through :func:`lcpass.kv.attend.attend_layer`).
    """

    layer: "CompressedLayer"
    mode: str
    step: int


def _tag(t: Tensor, handle: KVHandle) -> Tensor:
    t._lcpass_kv = handle  # plain Python attribute: the attention module passes k through unchanged
    return t


def handle_of(key: Tensor) -> Optional[KVHandle]:
    """The :class:`KVHandle` a :class:`CompressedCache` put on ``key`` (None for any other tensor)."""
    return getattr(key, "_lcpass_kv", None)


class CompressedLayer(CacheLayerMixin):
    """One layer of a :class:`CompressedCache`: KV groups plus the per-row position bookkeeping."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, cache: "CompressedCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.seen = 0  # tokens (slots) appended so far, padding included
        self.n_real: Optional[Tensor] = None  # [B] real tokens per row
        self.groups: Optional[list[KVGroup]] = None
        self.binding: Optional[LayerBinding] = None
        self.pending: Optional[tuple[Tensor, Tensor]] = None
        self.steps = 0

    # -- transformers' CacheLayerMixin -------------------------------------------------------------
    @property
    def keys(self) -> Optional[Tensor]:
        """The kept keys ``[B, Hkv, L, D]`` in head order, for code that reads ``layer.keys`` (transformers'
        own generate helpers); a ValueError when the heads keep different numbers of slots (read ``groups``)."""
        return self._stacked("keys")

    @keys.setter
    def keys(self, value: Optional[Tensor]) -> None:
        if value is not None:
            raise AttributeError("CompressedLayer.keys is read-only; use update()")

    @property
    def values(self) -> Optional[Tensor]:
        return self._stacked("values")

    @values.setter
    def values(self, value: Optional[Tensor]) -> None:
        if value is not None:
            raise AttributeError("CompressedLayer.values is read-only; use update()")

    def _stacked(self, name: str) -> Optional[Tensor]:
        if self.groups is None:
            pending = getattr(self, "pending", None)
            return None if pending is None else pending[0 if name == "keys" else 1]
        if len(self.groups) == 1:
            return getattr(self.groups[0], name)
        lengths = {g.length for g in self.groups}
        if len(lengths) != 1:
            raise ValueError(f"CompressedCache layer {self.layer_idx}: its KV heads keep {sorted(lengths)} slots "
                             f"(per-head budgets); read layer.groups instead of layer.{name}")
        parts = [getattr(g, name) for g in self.groups]
        order = torch.tensor([h for g in self.groups for h in g.heads], device=parts[0].device)
        return torch.cat(parts, 1).index_select(1, torch.argsort(order))

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        # key_states, value_states: [B, Hkv, q, D], RoPE already applied
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.steps += 1
        q = key_states.shape[2]
        if self.groups is None:
            if self.pending is not None:
                raise ValueError(
                    f"CompressedCache layer {self.layer_idx}: a second forward reached the cache but no lcpass "
                    f"attention function ever bound this layer to a plan (the model is not optimized); call "
                    f"lcpass.optimize(model, ...) first, or use transformers' DynamicCache")
            self.pending = (key_states, value_states)
            self.seen += q
            return _tag(key_states, KVHandle(self, "prefill", self.steps)), value_states
        B = key_states.shape[0]
        pos = (self.n_real[:, None] + torch.arange(q, device=key_states.device)[None]).to(torch.int32)  # [B, q]
        for g in self.groups:
            if len(g.heads) == key_states.shape[1]:
                g.append(key_states, value_states, pos)
            else:
                idx = torch.tensor(g.heads, device=key_states.device)
                g.append(key_states.index_select(1, idx), value_states.index_select(1, idx), pos)
        self.seen += q
        self.n_real = self.n_real + q
        if self.is_plain():
            g = self.groups[0]
            return _tag(g.keys, KVHandle(self, "plain", self.steps)), g.values
        del B
        return _tag(key_states, KVHandle(self, "compressed", self.steps)), value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen, self.n_real, self.groups, self.binding, self.pending = 0, None, None, None, None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(f"CompressedCache layer {self.layer_idx}: crop({tokens_to_remove}) is not supported "
                             f"(evicted tokens cannot be restored); disable assisted/speculative decoding")

    def _batch(self, fn) -> None:
        if self.groups:
            for g in self.groups:
                g.index_batch(fn)
        if self.n_real is not None:
            self.n_real = fn(self.n_real)
        if self.pending is not None:
            self.pending = (fn(self.pending[0]), fn(self.pending[1]))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._batch(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    @property
    def batch_size(self) -> int:
        if self.pending is not None:
            return self.pending[0].shape[0]
        return -1 if self.n_real is None else int(self.n_real.shape[0])

    # -- lcpass ------------------------------------------------------------------------------------
    def is_plain(self) -> bool:
        """True while the layer is one group of every KV head in order holding every slot (no eviction due):
        k, v are then the complete cache, exactly as in DynamicCache."""
        if self.groups is None or len(self.groups) != 1:
            return False
        g = self.groups[0]
        if g.heads != list(range(len(g.heads))) or g.selector is not None or g.comp_k is not None:
            return False
        if g.length != self.seen:
            return False
        return not g.needs_eviction()

    def bind(self, binding: LayerBinding, head_specs: Sequence[Any], kv_keep: Optional[Tensor]) -> None:
        """Create the groups from the site's head specs and store the pending prompt, then evict.

        kv_keep: [B, S] bool (True = real token) from the prompt's attention mask, or None (no padding).
        """
        k, v = self.pending
        B, hkv, S, _ = k.shape
        policies = (kv_head_policies(list(head_specs), binding.n_heads, hkv, binding.kv_len)
                    if head_specs else [KVPolicy.all()] * hkv)
        policies = [within_window(p, binding.window) for p in policies]
        selectors = _head_selectors(head_specs, binding.n_heads, hkv) if head_specs else [None] * hkv
        default = self.cache.select
        keyed: dict[Any, list[int]] = {}
        for j, (pol, sel) in enumerate(zip(policies, selectors)):
            if sel is None and default is not None and pol.kind == "all" and head_specs:
                sel = default
            keyed.setdefault((pol, sel), []).append(j)
        if kv_keep is None:
            pos = torch.arange(S, device=k.device, dtype=torch.int32)[None].expand(B, S)
            self.n_real = torch.full((B,), S, dtype=torch.long, device=k.device)
        else:
            kv_keep = kv_keep.to(k.device)
            pos = torch.where(kv_keep, kv_keep.long().cumsum(1) - 1, -1).to(torch.int32)
            self.n_real = kv_keep.sum(1).long()
        self.groups = []
        for (pol, sel), heads in keyed.items():
            g = KVGroup(heads, pol, sel)
            if len(heads) == hkv:
                g.append(k, v, pos.contiguous())
            else:
                idx = torch.tensor(heads, device=k.device)
                g.append(k.index_select(1, idx), v.index_select(1, idx), pos.contiguous())
            self.groups.append(g)
        self.binding = binding
        self.pending = None
        self.evict()

    def evict(self) -> None:
        for g in self.groups or ():
            g.evict()

    def tensors(self) -> list[Tensor]:
        out: list[Tensor] = []
        for g in self.groups or ():
            out.extend(g.tensors())
        if self.pending is not None:
            out.extend(self.pending)
        if self.n_real is not None:
            out.append(self.n_real)
        return out

    def nbytes(self) -> int:
        return tensor_bytes(self.tensors())

    def kv_nbytes(self) -> int:
        """Bytes of the attention KV this layer holds (slots, positions, compensation, selector state), without
        the recurrent / convolution state a hybrid layer also carries."""
        return tensor_bytes(CompressedLayer.tensors(self))

    def dense_nbytes(self) -> int:
        """Bytes a DynamicCache would hold for this layer: K and V of every KV head and slot."""
        if self.pending is not None:
            k, v = self.pending
            return k.numel() * k.element_size() + v.numel() * v.element_size()
        if not self.groups:
            return 0
        hkv = sum(len(g.heads) for g in self.groups)
        g = self.groups[0]
        B, dk, dv = g.keys.shape[0], g.keys.shape[-1], g.values.shape[-1]
        return B * hkv * self.seen * (dk + dv) * g.keys.element_size()

    def breakdown(self) -> dict[str, Any]:
        groups = []
        for g in self.groups or ():
            groups.append({"kv_heads": list(g.heads), "policy": g.policy.to_dict(),
                           "selector": None if g.selector is None else g.selector.name,
                           "slots": g.length, "bytes": tensor_bytes(g.tensors())})
        return {"layer": self.layer_idx, "site": None if self.binding is None else self.binding.site,
                "tokens": self.seen, "bytes": self.nbytes(), "dense_bytes": self.dense_nbytes(), "groups": groups}


class CompressedHybridLayer(LinearAttentionLayer, CompressedLayer):
    """A layer holding both a recurrent / convolution state (transformers' own, unchanged) and attention KV
    compressed as the plan says: what transformers' ``LinearAttentionAndFullAttentionLayer`` is with
    :class:`CompressedLayer` in place of ``DynamicLayer``."""

    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "CompressedCache", layer_idx: int, number_of_states: int = 1):
        CompressedLayer.__init__(self, cache, layer_idx)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def lazy_initialization(self, *args: Any, **kwargs: Any) -> None:
        if len(args) == 2 and all(isinstance(a, Tensor) for a in args):  # key_states, value_states
            CompressedLayer.lazy_initialization(self, *args)
        else:
            LinearAttentionLayer.lazy_initialization(self, *args, **kwargs)

    def reset(self) -> None:
        CompressedLayer.reset(self)
        LinearAttentionLayer.reset(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        CompressedLayer.reorder_cache(self, beam_idx)
        LinearAttentionLayer.reorder_cache(self, beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        CompressedLayer.crop(self, tokens_to_remove)

    def get_max_length(self) -> int:
        return -1

    def _linear_tensors(self) -> list[Tensor]:
        return [t for d in (self.conv_states, self.recurrent_states) for t in d.values() if isinstance(t, Tensor)]

    def tensors(self) -> list[Tensor]:
        return CompressedLayer.tensors(self) + self._linear_tensors()

    def dense_nbytes(self) -> int:
        return CompressedLayer.dense_nbytes(self) + tensor_bytes(self._linear_tensors())


def within_window(policy: KVPolicy, window: int) -> KVPolicy:
    """A KV policy on a site with a native sliding window of ``window`` keys: nothing older than the window
    is ever attended again, so keeping everything (or more recent tokens than the window) keeps the window.

    >>> within_window(KVPolicy.all(), 8).recent
    8
    """
    if window < 0:
        return policy
    if policy.kind == "all":
        return KVPolicy.sinks_recent(0, window)
    if policy.kind == "sinks+recent" and policy.sink + policy.recent > window:
        return KVPolicy.sinks_recent(0, window)
    return policy


def _head_selectors(head_specs: Sequence[Any], n_heads: int, n_kv_heads: int) -> list[Optional[Selector]]:
    """The decode selector of each KV head from the plan's head specs (dynamic methods), None if none."""
    specs = list(head_specs) * (n_heads if len(head_specs) == 1 else 1)
    group = n_heads // n_kv_heads
    out = []
    for j in range(n_kv_heads):
        sels = {selector_from_spec(s) for s in specs[j * group:(j + 1) * group]}
        out.append(sels.pop() if len(sels) == 1 else None)
    return out


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
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    if isinstance(cache, CompressedCache):
        return cache
    if isinstance(cache, EncoderDecoderCache):
        return EncoderDecoderCache(compress_cache(cache.self_attention_cache, select=select,
                                                  plain_layers=plain_layers), cache.cross_attention_cache)
    if type(cache) is DynamicCache:
        return CompressedCache(select=select, layers=list(cache.layers), plain_layers=plain_layers)
    return cache


def heads_key(head_specs: Sequence[Any]) -> str:
    """Normalised per-head specs (method + resolved params) as a string, for plan comparison."""
    from lcpass.methods import get_method, resolve_params

    out = []
    for s in head_specs:
        name, params = spec_parts(s)
        try:
            params = resolve_params(get_method(name), params)
        except ValueError:
            params = dict(params)
        out.append([name, dict(sorted(params.items()))])
    if out and all(x == out[0] for x in out):
        out = [out[0]]
    return json.dumps(out, sort_keys=True)


def lower_site_mask(spec: str, n_heads: int, q_len: int, kv_len: int, is_causal: bool, window: int):
    """The planned op's site mask (:func:`lcpass.lower.site_mask`)."""
    from lcpass.lower import site_mask

    return site_mask(spec, n_heads, q_len, kv_len, is_causal, window)


def parse_spec(spec: str) -> list[tuple[str, dict]]:
    """The (method, params) of each head of a planned op's spec string (:func:`lcpass.lower.parse_spec`)."""
    from lcpass.lower import parse_spec as _parse_spec

    return [(m, p) for m, p in _parse_spec(spec)]


def razor_bias(n: Tensor) -> Tensor:
    """log |D| of the compensation token (-inf where nothing was dropped). n: [B] -> [B]."""
    return torch.where(n > 0, torch.log(n.clamp(min=1.0)), torch.full_like(n, -math.inf))
