"""The layers of a :class:`~lcpass.kv.cache.CompressedCache` and how they meet the attention function.

:class:`CompressedLayer` stands in for transformers' ``DynamicLayer``: it stores its KV heads in
:class:`~lcpass.kv.group.KVGroup` s (one per policy and decode selector, from the site's head specs) plus
the per-row position bookkeeping; :class:`CompressedHybridLayer` is the same next to a hybrid layer's
recurrent / convolution state.

How a layer meets the model: ``update`` returns the tensors the attention function needs, tagged with the
layer (a :class:`KVHandle` on ``key._lcpass_kv``, read back by :func:`handle_of`). The lcpass attention
function (:mod:`lcpass.hf`) binds the layer to the site's plan on the first call (a :class:`LayerBinding`;
prefill: full attention on the prompt, then eviction), and afterwards attends each group's kept keys
(:mod:`lcpass.kv.attend`). While a layer holds every token of a single group (nothing evicted yet, or a
dense plan) it behaves exactly like ``DynamicCache``. Also here: the plan's head specs as a layer reads
them (:func:`parse_spec`, :func:`heads_key`, :func:`within_window`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin, LinearAttentionLayer

from lcpass.kv.group import KVGroup, tensor_bytes
from lcpass.kv.select import Selector, selector_from_spec
from lcpass.lower import parse_spec as lower_parse_spec
from lcpass.methods import KVPolicy, get_method, kv_head_policies, resolve_params, spec_parts

if TYPE_CHECKING:
    from lcpass.kv.cache import CompressedCache

__all__ = ["CompressedHybridLayer", "CompressedLayer", "KVHandle", "LayerBinding", "handle_of", "heads_key",
           "parse_spec", "within_window"]


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


def heads_key(head_specs: Sequence[Any]) -> str:
    """Normalised per-head specs (method + resolved params) as a string, for plan comparison."""
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


def parse_spec(spec: str) -> list[tuple[str, dict]]:
    """The (method, params) of each head of a planned op's spec string (:func:`lcpass.lower.parse_spec`)."""
    return [(m, p) for m, p in lower_parse_spec(spec)]
