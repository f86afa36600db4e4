"""Attention over a compressed layer: each KV group attends its own kept slots.

Called by the lcpass attention function when :meth:`CompressedLayer.update` returned a
``"compressed"`` handle (some head has evicted tokens, a group uses a decode selector, or RazorAttention's
compensation token exists). For each group of KV heads:

* one decode query per row (the generate loop): the G query heads of each KV head become G query rows
  over the group's slots (``q [B, h, G, D]``), the mask is only "slot not empty" — the kept slots are
  exactly what the method allows — and a decode selector, when set, first picks the slots to read;
* several queries (a prompt chunk after a cached prefix): the method's mask is evaluated on the slots'
  row-relative positions (``mask_mod(b, h, q_pos, slot_pos)``), so early queries of the chunk do not see
  tokens evicted only because of later ones (eviction runs after attention).

RazorAttention's compensation token is one extra slot holding the mean of the dropped keys / values with
an additive bias ``log |D|`` (as if the |D| dropped tokens were all equal to it).

Example::

    >>> out = attend_layer(layer, q, scale=0.125)     # q [B, Hq, Sq, D] -> [B, Hq, Sq, D]
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lcpass.kv.select import select_attend
from lcpass.lower import site_mask
from lcpass.methods.dynamic.decode import dense_group_attend

__all__ = ["attend_layer", "lower_site_mask"]


def lower_site_mask(spec: str, n_heads: int, q_len: int, kv_len: int, is_causal: bool, window: int):
    """The planned op's site mask (:func:`lcpass.lower.site_mask`)."""
    return site_mask(spec, n_heads, q_len, kv_len, is_causal, window)


def _q_heads(heads: list[int], group: int, device) -> Tensor:
    return torch.tensor([j * group + i for j in heads for i in range(group)], device=device)


def _comp_slot(g) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(k_hat [B, h, 1, D], v_hat, bias [B, 1, 1, 1]) of a compensated group, or Nones."""
    if g.comp_k is None:
        return None, None, None
    n = g.comp_n.clamp(min=1.0).view(-1, 1, 1, 1)
    bias = torch.where(g.comp_n.view(-1, 1, 1, 1) > 0, torch.log(n), torch.full_like(n, -math.inf))
    return (g.comp_k / n).to(g.keys.dtype), (g.comp_v / n).to(g.values.dtype), bias


def _attend_math(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, bias: Optional[Tensor], scale: float,
                 softcap: float) -> Tensor:
    """Explicit softmax attention (softcap): q [B, n, Sq, D], k/v [B, n, L, D], allowed [B, n|1, Sq, L]."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v.float()).to(q.dtype)


def attend_layer(layer, query: Tensor, scale: float, softcap: float = 0.0) -> Tensor:
    """Attention of ``query [B, Hq, Sq, D]`` over the kept slots of every group of ``layer``.

    Returns [B, Hq, Sq, Dv]. Rows that see no slot output zeros.
    """
    b = layer.binding
    B, Hq, Sq, D = query.shape
    Hkv = b.n_kv_heads
    G = Hq // Hkv
    dv = layer.groups[0].values.shape[-1]
    out = query.new_empty(B, Hq, Sq, dv)
    n_layers = len(layer.cache.layers)
    mask_mod = None
    if (Sq > 1 or b.window >= 0) and b.spec:
        # the method's mask on row-relative positions; kv_len = the length the policies were made for
        mask_mod = lower_site_mask(b.spec, Hq, 1, b.kv_len, b.is_causal, b.window)
    qpos = layer.n_real[:, None] - Sq + torch.arange(Sq, device=query.device)[None]  # [B, Sq]
    for g in layer.groups:
        qi = _q_heads(g.heads, G, query.device)
        natural = len(g.heads) == Hkv
        qg = query if natural else query.index_select(1, qi)  # [B, h*G, Sq, D]
        h = len(g.heads)
        kc, vc, bias = _comp_slot(g)
        if Sq == 1 and mask_mod is None and not softcap:
            q4 = qg.view(B, h, G, D)
            if g.selector is not None:
                o = select_attend(g.selector, q4, g, scale, layer_idx=layer.layer_idx, n_layers=n_layers,
                                  shared=layer.cache.shared)
            else:
                k, v = g.keys, g.values
                valid = (g.pos >= 0)[:, None, None, :]
                add = None
                if kc is not None:
                    k, v = torch.cat([k, kc], 2), torch.cat([v, vc], 2)
                    valid = torch.cat([valid, torch.ones_like(valid[..., :1])], -1)
                    add = torch.cat([torch.zeros(B, 1, 1, g.length, dtype=bias.dtype, device=bias.device), bias], -1)
                o = dense_group_attend(q4, k, v, valid, scale, add)
            o = o.reshape(B, h * G, 1, dv)
        else:
            kpos = g.pos.long()  # [B, L]
            allowed = kpos[:, None, None, :] >= 0
            if mask_mod is not None:
                bb = torch.arange(B, device=query.device).view(B, 1, 1, 1)
                allowed = allowed & mask_mod(bb, qi.view(1, -1, 1, 1), qpos.view(B, 1, Sq, 1),
                                             kpos[:, None, None, :])
            else:
                allowed = allowed & (kpos[:, None, None, :] <= qpos.view(B, 1, Sq, 1))
                if b.window >= 0:  # a dense site's own sliding window
                    allowed = allowed & (qpos.view(B, 1, Sq, 1) - kpos[:, None, None, :] < b.window)
            k, v = g.keys, g.values
            if G > 1:
                k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
            add = None
            if kc is not None:
                kx = kc.repeat_interleave(G, 1) if G > 1 else kc
                vx = vc.repeat_interleave(G, 1) if G > 1 else vc
                k, v = torch.cat([k, kx], 2), torch.cat([v, vx], 2)
                allowed = torch.cat([allowed.expand(B, h * G, Sq, g.length),
                                     torch.ones(B, h * G, Sq, 1, dtype=torch.bool, device=query.device)], -1)
                add = torch.cat([torch.zeros(B, 1, 1, g.length, device=query.device), bias.float()], -1)
            o = _attend_math(qg, k, v, allowed, add, scale, softcap)
        if natural:
            return o
        out[:, qi] = o
    return out
