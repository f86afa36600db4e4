"""Decode-time KV selection, the algorithms: each generated token reads only the slots its method selects.

The method records hold these (``DynamicMethod.decode``, a
:class:`~lcpass.methods.dynamic.common.DecodeSelector`); :mod:`lcpass.kv.select` runs the selector of
a :class:`~lcpass.kv.Selector` on a cache group. A new selector builds on the primitives here:
:func:`dense_group_attend` (G query rows over all given slots), :func:`gather_attend` (over chosen slot
indices only; the generated split-KV kernel on CUDA), :func:`head_probs` (softmax of q.k summed over a
group's query heads), :func:`topk_slots`, :func:`valid_slots`, :func:`tail_indices`, and
:func:`indices_decode` (a selector from a slot chooser).

A cache group is duck-typed: ``group.keys``/``group.values`` ``[B, h, L, D]``, ``group.pos [B, L]`` (-1 =
empty slot), ``group.length``, ``group.state`` (a dict the selector may keep its caches in). Shapes::

    q    : [B, h, G, D]   the G query heads of each of the group's h KV heads, as G query rows
    idx  : [B, h, K] slot indices (-1 = unused)  ->  attention over K gathered slots only
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lcpass.codegen.api import AttentionSpec, available
from lcpass.codegen.token import gather_decode, token_scores

__all__ = ["dense_group_attend", "decode_kernels", "gather_attend", "scratch", "valid_slots", "tail_indices",
           "topk_slots", "head_probs", "quest_pages", "page_attend", "quest_indices", "tokenselect_indices",
           "tokenselect_attend", "recycled_indices", "tidal_indices", "indices_decode", "quest_decode",
           "tokenselect_decode", "recycled_decode", "tidal_decode"]


# ----------------------------------------------------------------------------------------------
# execution


def dense_group_attend(q: Tensor, k: Tensor, v: Tensor, valid: Optional[Tensor], scale: float,
                       bias: Optional[Tensor] = None) -> Tensor:
    """Decode attention of G query rows per KV head over all given slots.

    q [B, h, G, D]; k, v [B, h, L, D]; valid [B, 1|h, 1|G, L] bool or None; bias: additive float mask of
    the same shape (razor's compensation). Returns [B, h, G, D].
    """
    mask = None
    if bias is not None:
        mask = bias.to(q.dtype)
        if valid is not None:
            mask = mask.masked_fill(~valid, float("-inf"))
    elif valid is not None and not bool(valid.all()):
        mask = valid
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if valid is not None:
        seen = valid.any(-1, keepdim=True)
        if not bool(seen.all()):
            out = out.masked_fill(~seen, 0.0)
    return out


_KERNEL_OK: dict[tuple, tuple[bool, str]] = {}


def decode_kernels(q: Tensor, k: Tensor) -> bool:
    """Whether the generated decode kernels run this group (CUDA tensors the templates can tile); the
    first refusal per shape warns once with the reason, and the PyTorch path runs instead."""
    if not q.is_cuda:
        return False
    key = (q.shape[-1], q.shape[2], q.dtype, str(q.device))
    if key not in _KERNEL_OK:
        try:
            _KERNEL_OK[key] = available(AttentionSpec(head_dim=q.shape[-1], dtype=q.dtype, n_heads=q.shape[2],
                                                      n_kv_heads=1, kind="decode", device=str(q.device)))
        except ImportError as exc:  # a kernel dependency that will not import
            _KERNEL_OK[key] = (False, str(exc))
        if not _KERNEL_OK[key][0]:
            warnings.warn(f"lcpass.kv decode selection: generated kernels refused ({_KERNEL_OK[key][1]}); "
                          "running the PyTorch path", RuntimeWarning, stacklevel=3)
    return _KERNEL_OK[key][0]


def gather_attend(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, idx: Tensor, scale: float) -> Tensor:
    """Attention over the slots ``idx`` only: q [B, h, G, D], k/v [B, h, L, D], pos [B, L],
    idx [B, h, K] (-1 = unused). Reads K slots per KV head (one ``index_select`` of rows: advanced
    indexing is ~100x slower on CPU). Returns [B, h, G, D]. On CUDA the generated split-KV decode kernel
    gathers the slots itself (``lcpass.codegen.gather_decode``)."""
    if decode_kernels(q, k):
        return gather_decode(q, k, v, pos, idx, scale)
    B, h, L, D = k.shape
    K = idx.shape[-1]
    safe = idx.clamp(min=0)
    flat = (safe + torch.arange(B * h, device=k.device).view(B, h, 1) * L).reshape(-1)  # [B*h*K]
    kg = torch.index_select(k.reshape(B * h * L, D), 0, flat, out=scratch("k", (B * h * K, D), k))
    vg = torch.index_select(v.reshape(B * h * L, v.shape[-1]), 0, flat,
                            out=scratch("v", (B * h * K, v.shape[-1]), v))
    kg, vg = kg.view(B, h, K, D), vg.view(B, h, K, v.shape[-1])
    valid = (idx >= 0) & (pos.gather(1, safe.view(B, h * K)).view(B, h, K) >= 0)
    return dense_group_attend(q, kg, vg, valid[:, :, None, :], scale)


_SCRATCH: dict[tuple, Tensor] = {}


def scratch(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A reusable gather buffer (working memory shared by every layer, not part of any cache).

    Fresh multi-MB outputs each step cost page faults that dominate a gather on a busy CPU.
    """
    key = (name, shape, like.dtype, like.device)
    buf = _SCRATCH.get(key)
    if buf is None:
        if len(_SCRATCH) > 16:
            _SCRATCH.clear()
        buf = _SCRATCH[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


def valid_slots(pos: Tensor) -> Tensor:
    return (pos >= 0)[:, None, None, :]  # [B, 1, 1, L]


def tail_indices(start: int, end: int, B: int, h: int, device) -> Tensor:
    return torch.arange(start, end, device=device).view(1, 1, -1).expand(B, h, -1)


def topk_slots(score: Tensor, k: int) -> Tensor:
    """Indices of the k best finite scores along the last dim (-1 where fewer are finite)."""
    k = min(k, score.shape[-1])
    top = score.topk(k, dim=-1)
    return torch.where(torch.isfinite(top.values), top.indices, -1)


def _quest_pages(group, page: int) -> tuple[Tensor, Tensor, int]:
    """Per full page of slots: (kmax, kmin) [B, h, P, D], updated incrementally in ``group.state``."""
    k, pos = group.keys, group.pos
    B, h, L, D = k.shape
    n_full = L // page
    st = group.state.get("quest")
    if st is None or st[2] > n_full or st[0].shape[0] != B:
        st = (k.new_empty(B, h, 0, D), k.new_empty(B, h, 0, D), 0)
    kmax, kmin, done = st
    if done < n_full:
        blk = k[:, :, done * page:n_full * page].reshape(B, h, n_full - done, page, D)
        ok = (pos[:, done * page:n_full * page] >= 0).view(B, 1, n_full - done, page, 1)
        if bool(ok.all()):
            mx, mn = blk.amax(3), blk.amin(3)
        else:
            mx = blk.masked_fill(~ok, float("-inf")).amax(3)
            mn = blk.masked_fill(~ok, float("inf")).amin(3)
        kmax, kmin = torch.cat([kmax, mx], 2), torch.cat([kmin, mn], 2)
        group.state["quest"] = (kmax, kmin, n_full)
    return kmax, kmin, n_full


def quest_pages(q: Tensor, group, p: Mapping[str, Any]) -> Optional[Tensor]:
    """Quest's chosen full pages [B, h, n_pages] (sorted) for decode queries q [B, h, G, D]; None = all."""
    page = p["page_size"]
    n_pages = max(1, -(-p["token_budget"] // page))
    kmax, kmin, n_full = _quest_pages(group, page)
    if n_full <= n_pages:
        return None
    qf = q.float()
    s = (qf.clamp(min=0) @ kmax.float().transpose(-1, -2) + qf.clamp(max=0) @ kmin.float().transpose(-1, -2))
    s = s.amax(2)  # [B, h, P]: bound of the best query head of each KV head
    if p["sink_pages"]:
        s[..., :p["sink_pages"]] = math.inf
    return torch.sort(s.topk(n_pages, dim=-1).indices, dim=-1).values


def page_attend(q: Tensor, group, pages: Tensor, page: int, scale: float) -> Tensor:
    """Attention over the chosen pages plus the unfinished tail, one KV head at a time: its pages are copied
    by one ``index_select`` of whole pages (rows of page x D values; per-token rows cost ~1 us each on CPU)
    into a small buffer that is attended while still in cache. q [B, h, G, D] -> [B, h, G, D]."""
    k, v, pos = group.keys, group.values, group.pos
    B, h, L, D = k.shape
    dv = v.shape[-1]
    n_full = L // page
    n_sel = pages.shape[-1]
    tail = L - n_full * page
    n = n_sel * page + tail
    kb = scratch("pk", (n, D), k)
    vb = scratch("pv", (n, dv), v)
    out = q.new_empty(B, h, q.shape[2], dv)
    for b in range(B):
        valid = None
        if not bool((pos[b] >= 0).all()):  # padded row: which gathered slots are real
            pb = torch.cat([pos[b, :n_full * page].view(n_full, page).index_select(0, pages[b].reshape(-1))
                            .view(h, n_sel * page), pos[b, None, n_full * page:].expand(h, tail)], 1)  # [h, n]
            valid = pb >= 0
        for j in range(h):
            idx = pages[b, j]
            torch.index_select(k[b, j, :n_full * page].view(n_full, page * D), 0, idx,
                               out=kb[:n_sel * page].view(n_sel, page * D))
            torch.index_select(v[b, j, :n_full * page].view(n_full, page * dv), 0, idx,
                               out=vb[:n_sel * page].view(n_sel, page * dv))
            if tail:
                kb[n_sel * page:] = k[b, j, n_full * page:]
                vb[n_sel * page:] = v[b, j, n_full * page:]
            if valid is None:
                out[b, j] = F.scaled_dot_product_attention(q[b, j][None, None], kb[None, None], vb[None, None],
                                                           scale=scale)[0, 0]
            else:
                out[b, j] = dense_group_attend(q[b, j][None, None], kb[None, None], vb[None, None],
                                               valid[j][None, None, None], scale)[0, 0]
    return out


def quest_indices(q: Tensor, group, p: Mapping[str, Any]) -> Optional[Tensor]:
    """Quest's slot indices [B, h, K] (chosen pages, then the unfinished tail); None = attend everything."""
    pages = quest_pages(q, group, p)
    return None if pages is None else _page_slots(pages, p["page_size"], group)


def _page_slots(pages: Tensor, page: int, group) -> Tensor:
    """Slot indices [B, h, n_pages * page + tail] of the chosen full pages, then the unfinished tail."""
    tok = (pages[..., None] * page + torch.arange(page, device=pages.device)).flatten(-2)
    B, h = pages.shape[:2]
    return torch.cat([tok, tail_indices(group.length // page * page, group.length, B, h, pages.device)], -1)


def head_probs(q: Tensor, k: Tensor, valid: Tensor, scale: float) -> Tensor:
    """Softmax of q.k per query head, summed over the G heads: q [B, h, G, D] -> [B, h, L] (fp32).
    ``valid`` [B, 1, 1, L]. On CUDA the generated two-pass scoring kernel computes it."""
    if decode_kernels(q, k) and valid.dim() == 4 and valid.shape[1] == 1 and valid.shape[2] == 1:
        B, h, G, D = q.shape
        return token_scores(q.reshape(B, h * G, 1, D), k, scale=scale, kv_keep=valid[:, 0, 0, :])
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, h, G, L]
    s = s.masked_fill(~valid, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0).sum(2)


def _tokenselect_state(q: Tensor, group, p: Mapping[str, Any], scale: float) -> Optional[dict]:
    """TokenSelect's selection cache for decode queries q [B, h, G, D], per KV head; None = attend everything.

    Each KV head keeps its own selection: the slot indices ``idx`` [B, h, K] it chose, the gathered keys
    and values of those slots ``kg``/``vg`` [B, h, K, D] (so a reuse reads only K rows, contiguously),
    the previous step's unit queries ``q`` [B, h, G, D] and the cache length ``len`` [B, h] when the
    selection was made. A head reuses its selection (plus every slot added since) while each of its G
    query heads has cosine similarity >= ``cache_threshold`` with its query of the previous step
    (consecutive queries, as in the paper); only the heads that drifted are
    re-selected (soft vote over their G heads, top ``k`` plus ``n_sink`` first and ``n_local`` last).
    ``state["hits"]``/``["misses"]`` count per-head reuses / re-selections.
    """
    k, v, pos = group.keys, group.values, group.pos
    B, h, L, D = k.shape
    K = p["k"] + p["n_sink"] + p["n_local"] + 1
    if L <= K:
        return None
    qn = F.normalize(q.float(), dim=-1)
    st = group.state.get("tokenselect")
    if st is None or st["q"].shape != qn.shape or int(st["len"].max()) > L or st["kg"].dtype != k.dtype:
        st = {"q": qn.clone(), "idx": torch.full((B, h, K), -1, dtype=torch.long, device=k.device),
              "kg": k.new_zeros(B, h, K, D), "vg": v.new_zeros(B, h, K, v.shape[-1]),
              "len": torch.zeros(B, h, dtype=torch.long, device=k.device)}
        group.state["tokenselect"] = st
        miss = torch.ones(B, h, dtype=torch.bool, device=k.device)
    else:
        miss = (qn * st["q"]).sum(-1).amin(-1) < p["cache_threshold"]  # [B, h]
        st["q"].copy_(qn)  # the paper compares consecutive queries: the next step compares with this one
    pairs = miss.nonzero().tolist()
    group.state["hits"] = group.state.get("hits", 0) + B * h - len(pairs)
    group.state["misses"] = group.state.get("misses", 0) + len(pairs)
    if pairs:
        forced = torch.zeros(L, dtype=torch.bool, device=k.device)
        forced[:p["n_sink"]] = True
        forced[L - p["n_local"] - 1:] = True
        if len(pairs) == B * h:  # every head re-selects: batched over heads, on views (no key copies)
            score = head_probs(q, k, (pos >= 0)[:, None, None, :], scale).masked_fill_(forced, math.inf)
            idx = topk_slots(score.masked_fill_((pos < 0)[:, None, :], -math.inf), K)  # [B, h, K]
            st["idx"].copy_(idx)
            safe = idx.clamp(min=0)
            flat = (safe + torch.arange(B * h, device=k.device).view(B, h, 1) * L).reshape(-1)
            torch.index_select(k.reshape(B * h * L, D), 0, flat, out=st["kg"].view(B * h * K, D))
            torch.index_select(v.reshape(B * h * L, v.shape[-1]), 0, flat, out=st["vg"].view(B * h * K, -1))
            st["len"].fill_(L)
            return st
        all_valid = bool((pos >= 0).all())
        for b, j in pairs:  # only the heads that drifted
            s = (q[b, j].float() * scale) @ k[b, j].float().transpose(0, 1)  # [G, L]
            if not all_valid:
                s = s.masked_fill(pos[b] < 0, -math.inf)
            score = torch.softmax(s, -1).nan_to_num_(0.0).sum(0).masked_fill_(forced, math.inf)  # soft vote
            if not all_valid:
                score = score.masked_fill_(pos[b] < 0, -math.inf)
            idx = topk_slots(score, K)
            st["idx"][b, j] = idx
            safe = idx.clamp(min=0)
            torch.index_select(k[b, j], 0, safe, out=st["kg"][b, j])
            torch.index_select(v[b, j], 0, safe, out=st["vg"][b, j])
            st["len"][b, j] = L
    return st


def _tokenselect_tail(st: dict, L: int) -> tuple[int, Tensor]:
    """Slots added since the oldest selection: (first slot, validity [B, h, T] per head)."""
    lo = int(st["len"].min())
    ar = torch.arange(lo, L, device=st["len"].device)
    return lo, ar[None, None] >= st["len"][..., None]


def tokenselect_indices(q: Tensor, group, p: Mapping[str, Any], scale: float) -> Optional[Tensor]:
    """TokenSelect's slot indices [B, h, K + T] (each head's selection, then the slots added since it;
    -1 = unused); None = attend everything. Updates the selection cache as :func:`tokenselect_attend`."""
    st = _tokenselect_state(q, group, p, scale)
    if st is None:
        return None
    L = group.length
    lo, ok = _tokenselect_tail(st, L)
    tail = torch.arange(lo, L, device=q.device).expand_as(ok).masked_fill(~ok, -1)
    return torch.cat([st["idx"], tail], -1)


def tokenselect_attend(q: Tensor, group, p: Mapping[str, Any], scale: float) -> Optional[Tensor]:
    """Decode attention over each head's TokenSelect selection + the slots added since (q [B, h, G, D] ->
    [B, h, G, Dv]); None = the context fits the budget (attend everything). Reads the K gathered rows of
    each head's selection cache and the new tail only: the two parts share one softmax."""
    st = _tokenselect_state(q, group, p, scale)
    if st is None:
        return None
    k, v, pos = group.keys, group.values, group.pos
    L = group.length
    lo, ok = _tokenselect_tail(st, L)
    ok = ok & (pos[:, None, lo:] >= 0)
    qs = q.float() * scale
    s1 = qs @ st["kg"].float().transpose(-1, -2)  # [B, h, G, K]
    s2 = qs @ k[:, :, lo:].float().transpose(-1, -2)  # [B, h, G, T]
    valid = torch.cat([st["idx"] >= 0, ok], -1)[:, :, None]
    pr = torch.softmax(torch.cat([s1, s2], -1).masked_fill(~valid, -math.inf), -1).nan_to_num_(0.0)
    K = s1.shape[-1]
    out = pr[..., :K].to(v.dtype) @ st["vg"] + pr[..., K:].to(v.dtype) @ v[:, :, lo:]
    group.state["last_selected"] = int(valid.sum(-1).max())
    return out.to(q.dtype)


def recycled_indices(q: Tensor, group, p: Mapping[str, Any], scale: float) -> Optional[Tensor]:
    """Recycled Attention: None on full steps (recording the top-K), else recycled + newer slots."""
    k, pos = group.keys, group.pos
    B, h, L, D = k.shape
    st = group.state.get("recycled")
    if st is None or st[2] + 1 >= p["S"] or st[1] > L or L <= p["K"]:
        valid = (pos >= 0)[:, None, None, :]
        group.state["recycled"] = (topk_slots(head_probs(q, k, valid, scale).masked_fill(~(pos >= 0)[:, None, :],
                                                                                     -math.inf), p["K"]), L, 0)
        return None
    top, full_len, since = st
    group.state["recycled"] = (top, full_len, since + 1)
    return torch.cat([top, tail_indices(full_len, L, B, h, q.device)], -1)


def tidal_indices(q: Tensor, group, p: Mapping[str, Any], scale: float, layer_idx: int, n_layers: int,
                  shared: dict) -> Optional[Tensor]:
    """TidalDecode: None at full layers (selection layers record positions in ``shared``)."""
    k, pos = group.keys, group.pos
    B, h, L, D = k.shape
    re = p["reselection_layer"] if p["reselection_layer"] >= 0 else n_layers // 2
    if layer_idx in (p["selection_layer"], re):
        if L > p["k"]:
            valid = (pos >= 0)[:, None, None, :]
            votes = head_probs(q, k, valid, scale).sum(1).masked_fill(~(pos >= 0), -math.inf)  # [B, L]
            shared["tidal"] = (topk_slots(votes, p["k"]), L)
        else:
            shared.pop("tidal", None)
        return None
    st = shared.get("tidal")
    if layer_idx < p["selection_layer"] or st is None or st[1] != L:
        return None
    sel = st[0][:, None, :].expand(B, h, -1)
    return torch.cat([sel, tail_indices(L - 1, L, B, h, q.device)], -1)


# ----------------------------------------------------------------------------------------------
# the decode selectors the records hold (``DynamicMethod.decode``): one step of one KV group


def quest_decode(q: Tensor, group, p: Mapping[str, Any], scale: float, *, layer_idx: int, n_layers: int,
                 shared: dict) -> Tensor:
    """Quest at decode: the chosen pages (plus the unfinished tail) only; everything while it fits."""
    pages = quest_pages(q, group, p)
    if pages is None:
        return dense_group_attend(q, group.keys, group.values, valid_slots(group.pos), scale)
    group.state["last_selected"] = pages.shape[-1] * p["page_size"] + group.length % p["page_size"]
    if decode_kernels(q, group.keys):  # the kernel gathers the chosen pages' slots itself
        return gather_attend(q, group.keys, group.values, group.pos, _page_slots(pages, p["page_size"], group),
                             scale)
    return page_attend(q, group, pages, p["page_size"], scale)


def tokenselect_decode(q: Tensor, group, p: Mapping[str, Any], scale: float, *, layer_idx: int, n_layers: int,
                       shared: dict) -> Tensor:
    """TokenSelect at decode: each KV head's cached selection plus the slots added since."""
    o = tokenselect_attend(q, group, p, scale)
    return dense_group_attend(q, group.keys, group.values, valid_slots(group.pos), scale) if o is None else o


def indices_decode(indices) -> Any:
    """A decode selector from a slot chooser ``indices(q, group, p, scale, layer_idx, n_layers, shared) ->
    idx [B, h, K] | None`` (None: attend every slot): the chosen slots gathered and attended."""

    def decode(q: Tensor, group, p: Mapping[str, Any], scale: float, *, layer_idx: int, n_layers: int,
               shared: dict) -> Tensor:
        idx = indices(q, group, p, scale, layer_idx, n_layers, shared)
        if idx is None:
            return dense_group_attend(q, group.keys, group.values, valid_slots(group.pos), scale)
        group.state["last_selected"] = idx.shape[-1]
        return gather_attend(q, group.keys, group.values, group.pos, idx, scale)

    return decode


recycled_decode = indices_decode(lambda q, group, p, scale, layer_idx, n_layers, shared:
                                 recycled_indices(q, group, p, scale))
tidal_decode = indices_decode(tidal_indices)
