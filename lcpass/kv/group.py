"""``KVGroup``: the KV heads of one layer that share a KV policy, in compact storage of their own length.

A group holds one policy (from :func:`lcpass.methods.kv_head_policies`): ``all`` (retrieval / dense heads),
``sinks+recent`` (StreamingLLM, DuoAttention streaming heads, MoA) or ``compensated`` (RazorAttention: sinks
+ recent + one running-mean token of everything dropped), and optionally a decode selector. Evicted entries
are freed, not masked::

    group.keys, group.values : [B, h, L, D]     h = KV heads of the group, L = kept slots
    group.pos                : [B, L] int32     row-relative position of each slot (-1 = empty slot)
    group.comp_k/comp_v      : [B, h, 1, D] fp32 sums of the dropped keys / values (razor only)
    group.comp_n             : [B] fp32         how many tokens were folded into them

RoPE is applied before the cache sees the keys, so a kept key keeps the rotation of its original position;
``pos`` only serves the method's mask (sinks count from each row's first real token, as the row would run
alone) and left padding (empty slots). Also here: :func:`tensor_bytes`, the memory count every cache
report uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from lcpass.kv.select import Selector
from lcpass.methods import KVPolicy

__all__ = ["KVGroup", "tensor_bytes"]


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

