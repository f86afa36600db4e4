"""Clustering and hashing methods: Squeezed Attention, Routing Transformer, HyperAttention.

Squeezed Attention is a pure selection (clusters -> a :class:`TokenSelection`). Routing Transformer
and HyperAttention select per *query* (a cluster or a hash bucket), not per query block, so they run
their own gathered computation (flash-for-CPU calls merged by log-sum-exp) behind the common
``attend`` signature; their selections are exposed for testing (:func:`routing_assign`,
:func:`hyper_attention` with ``sample_size=0``).

>>> import torch
>>> q = torch.randn(1, 4, 256, 32); k = v = torch.randn(1, 2, 256, 32)
>>> out = hyper_attention(q, k, v, scale=32 ** -0.5, block_size=64, sample_size=32, min_seq_len=64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lcpass.masks import MaskMod
from lcpass.methods.base import KVPolicy, Param
from lcpass.methods.dynamic.common import (DynamicMethod, TokenSelection, attend_by, attend_lse,
                                           block_mean, causal_envelope, check_causal, merge_lse)

__all__ = ["SQUEEZED", "ROUTING", "HYPER", "SqueezedIndex", "build_squeezed_index", "kmeans",
           "squeezed_select", "routing_assign", "routing_attend", "hyper_attention", "hyper_attend"]


def kmeans(x: Tensor, n_clusters: int, iters: int = 10) -> tuple[Tensor, Tensor]:
    """Batched k-means (Lloyd), deterministic init at evenly spaced points.

    x [N, S, D] -> (centroids [N, C, D], labels int64 [N, S]); C = min(n_clusters, S).
    """
    N, S, D = x.shape
    C = min(n_clusters, S)
    x = x.float()
    dev = x.device
    c = x[:, torch.linspace(0, S - 1, C, device=dev).long()].clone()
    for _ in range(iters + 1):
        lab = (2 * x @ c.transpose(1, 2) - (c * c).sum(-1)[:, None]).argmax(-1)  # [N, S]
        if _ == iters:
            break
        s = torch.zeros(N, C, D, device=dev).scatter_add_(1, lab[..., None].expand(N, S, D), x)
        n = torch.zeros(N, C, device=dev).scatter_add_(1, lab, torch.ones(N, S, device=dev))
        c = torch.where(n[..., None] > 0, s / n.clamp(min=1)[..., None], c)
    return c, lab


# ----------------------------------------------------------------------------------------------
# Squeezed Attention


@dataclass(frozen=True)
class SqueezedIndex:
    """Offline two-level key clustering of a fixed context, per (batch, KV head).

    ``centroids [B, Hkv, C, D]``, ``labels [B, Hkv, S]`` (fine cluster of each context key),
    ``coarse [B, Hkv, Cc, D]``, ``parent [B, Hkv, C]`` (coarse cluster of each fine centroid).
    """

    centroids: Tensor
    labels: Tensor
    coarse: Tensor
    parent: Tensor

    @property
    def context_len(self) -> int:
        return self.labels.shape[-1]


def build_squeezed_index(k: Tensor, *, n_clusters: int, n_coarse: int, iters: int = 10) -> SqueezedIndex:
    """Cluster the fixed context's keys ``k [B, Hkv, S, D]`` offline (k-means per head, two levels)."""
    B, H, S, D = k.shape
    c, lab = kmeans(k.reshape(B * H, S, D), n_clusters, iters)
    cc, par = kmeans(c, n_coarse, iters)
    C, Cc = c.shape[1], cc.shape[1]
    return SqueezedIndex(c.view(B, H, C, D), lab.view(B, H, S), cc.view(B, H, Cc, D), par.view(B, H, C))


def _ranked_keep(score: Tensor, size: Tensor, budget: Tensor) -> Tensor:
    """Keep clusters best-first until their total size reaches ``budget`` (the best always kept).
    score, size [..., C]; budget broadcastable to [...] -> Bool [..., C]."""
    order = score.argsort(-1, descending=True)
    cum = size.gather(-1, order).cumsum(-1)
    keep_sorted = (cum - size.gather(-1, order) < budget[..., None]) & torch.isfinite(score.gather(-1, order))
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def squeezed_select(q: Tensor, k: Tensor, *, params: dict, state: dict | None,
                    mask_mod: MaskMod | None) -> TokenSelection:
    """Squeezed Attention (Hooper et al., 2024): the fixed context's keys are clustered offline
    (``state["squeezed_index"]`` from :func:`build_squeezed_index`, built on the first call and kept in
    ``state`` otherwise); a query block's mean query scores the coarse centroids, keeps the best coarse
    clusters covering ``2 * budget`` of the context, then scores their fine centroids and keeps clusters
    covering ``budget`` of the context; attention is exact over the keys of the kept clusters. Keys
    after the indexed context (generated tokens) are always kept.
    """
    check_causal(mask_mod, "squeezed")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bq = params["block_size"]
    index = (state or {}).get("squeezed_index")
    if index is None:
        index = build_squeezed_index(k, n_clusters=params["n_clusters"], n_coarse=params["n_coarse"])
        if state is not None:
            state["squeezed_index"] = index
    S = index.context_len
    if S > Sk or index.labels.shape[:2] != (B, Hkv):
        raise ValueError(f"squeezed: the index covers {S} keys of {tuple(index.labels.shape[:2])} "
                         f"(B, Hkv) but k is {tuple(k.shape)}; rebuild it with build_squeezed_index(k)")
    qb = block_mean(q, bq).view(B, Hkv, G, -1, D)  # [B, Hkv, G, Mq, D]
    mq = qb.shape[3]
    C = index.centroids.shape[2]
    dev = q.device
    size = torch.zeros(B, Hkv, C, device=dev).scatter_add_(-1, index.labels,
                                                           torch.ones(index.labels.shape, device=dev))
    csize = torch.zeros(B, Hkv, index.coarse.shape[2], device=dev).scatter_add_(-1, index.parent, size)
    budget = torch.tensor(params["budget"] * S, device=dev)
    sc = (qb @ index.coarse[:, :, None].transpose(-1, -2)).mean(2)  # [B, Hkv, Mq, Cc]
    keep_c = _ranked_keep(sc, csize[:, :, None].expand_as(sc), torch.clamp(2 * budget, max=S))
    sf = (qb @ index.centroids[:, :, None].transpose(-1, -2)).mean(2)  # [B, Hkv, Mq, C]
    sf = sf.masked_fill(~keep_c.gather(-1, index.parent[:, :, None].expand(-1, -1, mq, -1)), float("-inf"))
    keep_f = _ranked_keep(sf, size[:, :, None].expand_as(sf), budget)
    tok = keep_f.gather(-1, index.labels[:, :, None].expand(-1, -1, mq, -1))  # [B, Hkv, Mq, S]
    tok = torch.cat([tok, torch.ones(B, Hkv, mq, Sk - S, dtype=torch.bool, device=dev)], -1)
    starts = torch.arange(mq, device=dev) * bq + (Sk - Sq)
    tok = tok & (torch.arange(Sk, device=dev)[None] < starts[:, None])
    K = max(1, int(tok.sum(-1).max()))  # host sync: the selection's width K is data-dependent
    score = torch.where(tok, 1.0, float("-inf"))
    top = score.topk(min(K, Sk), dim=-1)
    return TokenSelection(torch.where(torch.isfinite(top.values), top.indices, -1), bq, Sq, Sk)


SQUEEZED = DynamicMethod(
    name="squeezed",
    paper="Squeezed Attention: Accelerating Long Context Length LLM Inference (Hooper et al., 2024)",
    summary="Offline k-means of a fixed context's keys; two-level centroid lookup; exact attention on "
            "the kept clusters.",
    params=(
        Param("n_clusters", "int", 256, 1, None, "fine key clusters per head"),
        Param("n_coarse", "int", 16, 1, None, "coarse clusters (level 1) per head"),
        Param("budget", "float", 0.1, 0.0, 1.0, "fraction of the context's keys attended"),
        Param("block_size", "int", 128, 1, 4096, "queries sharing one lookup (mean query)"),
    ),
    kind="dynamic", phases=frozenset({"prefill", "decode"}), needs_calibration=True, crossover=4096,
    crossover_why="the offline index pays off for long fixed contexts queried repeatedly",
    mask_mod=causal_envelope, kv_policy=lambda p, *, kv_len: KVPolicy.all(),
    select=squeezed_select, attend=attend_by(squeezed_select), granularity="token",
)


# ----------------------------------------------------------------------------------------------
# Routing Transformer


def routing_assign(q: Tensor, k: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid (cosine) of each query and key: centroids [Hq, C, D] ->
    (cq [B, Hq, Sq], ck [B, Hq, Sk]); keys of KV head ``h // G`` are routed per query head."""
    G = q.shape[1] // k.shape[1]
    c = F.normalize(centroids.float(), dim=-1)
    cq = (F.normalize(q.float(), dim=-1) @ c.transpose(-1, -2)).argmax(-1)
    kk = F.normalize(k.float(), dim=-1).repeat_interleave(G, 1)
    return cq, (kk @ c.transpose(-1, -2)).argmax(-1)


def _local_lse(q: Tensor, k: Tensor, v: Tensor, w: int, scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention within chunks of ``w`` queries (cut from the first query, as query blocks):
    query ``i`` sees keys ``[start(i // w), pos(i)]``. Returns (out [B, Hq, Sq, D] fp32, lse [B, Hq, Sq])."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    w = min(w, Sq)
    mq = -(-Sq // w)
    pad = mq * w - Sq
    off = Sk - Sq
    R = B * Hkv * mq
    qp = F.pad(q, (0, 0, 0, pad)).view(B, Hkv, G, mq, w, D).transpose(2, 3).reshape(R, G, w, D)
    kl = F.pad(k[:, :, off:], (0, 0, 0, pad)).reshape(R, 1, w, D).expand(R, G, w, D)
    vl = F.pad(v[:, :, off:], (0, 0, 0, pad)).reshape(R, 1, w, D).expand(R, G, w, D)
    out, lse = attend_lse(qp, kl, vl, scale=scale, is_causal=True)
    out = out.view(B, Hkv, mq, G, w, D).transpose(2, 3).reshape(B, Hq, mq * w, D)[:, :, :Sq]
    lse = lse.reshape(B, Hkv, mq, G, w).transpose(2, 3).reshape(B, Hq, mq * w)[:, :, :Sq]
    return out.contiguous(), lse.contiguous()


def _cluster_slots(lab: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Indices of each cluster's members, padded: lab [S] -> (idx [n, L] (-1 pad), valid [n, L])."""
    S = lab.shape[0]
    dev = lab.device
    order = torch.argsort(lab * S + torch.arange(S, device=dev))  # by cluster, then position
    cnt = torch.bincount(lab, minlength=n)
    start = cnt.cumsum(0) - cnt
    slot = torch.arange(S, device=dev) - start[lab[order]]
    L = max(1, int(cnt.max()))  # host sync: the padded width is the largest cluster (data-dependent)
    idx = torch.full((n, L), -1, dtype=torch.long, device=dev)
    idx[lab[order], slot] = order
    return idx, idx >= 0


def routing_attend(q: Tensor, k: Tensor, v: Tensor, *, params: dict, state: dict | None,
                   mask_mod: MaskMod | None, scale: float) -> Tensor:
    """Routing Transformer (Roy et al., TACL 2021): queries and keys are routed to the nearest of
    ``n_clusters`` centroids (cosine, per head: ``state["routing_centroids"] [Hq, C, D]``, initialised
    from evenly spaced keys); a query attends the keys of its cluster before its local chunk plus its
    local chunk (chunks of ``window`` queries cut from the first query, causal), one softmax.
    ``update=True`` moves the centroids towards the mean of
    their assigned (normalised) queries and keys by an exponential moving average with ``decay``.
    """
    check_causal(mask_mod, "routing")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    st = state if state is not None else {}
    C, w = params["n_clusters"], params["window"]
    cent = st.get("routing_centroids")
    if cent is None:
        pick = torch.linspace(0, Sk - 1, min(C, Sk), device=k.device).long()
        cent = F.normalize(k[0, :, pick].float(), dim=-1).repeat_interleave(G, 0)  # [Hq, C, D]
    cq, ck = routing_assign(q, k, cent)
    out, lse = _local_lse(q, k, v, w, scale)
    # cluster part: per (b, head), queries and keys gathered by cluster into padded [C, L] slots
    wq = min(w, Sq)
    chunk0 = (torch.arange(Sq, device=q.device) // wq) * wq + (Sk - Sq)  # first key of each query's local chunk
    ncl = cent.shape[1]
    for bh in range(B * Hq):  # bounded memory: one head's [C, Lq, Lk] mask at a time
        b, h = divmod(bh, Hq)
        qi, qv = _cluster_slots(cq[b, h], ncl)  # [C, Lq] query index (-1 pad)
        ki, kv_ = _cluster_slots(ck[b, h], ncl)  # [C, Lk] key position
        before = ki.clamp(min=0)[:, None, :] < chunk0[qi.clamp(min=0)][:, :, None]
        mask = qv[:, :, None] & kv_[:, None, :] & before  # [C, Lq, Lk]
        if not bool(mask.any()):  # host sync: skip heads whose clusters see nothing before the chunk
            continue
        qq = q[b, h][qi.clamp(min=0)]  # [C, Lq, D]
        kk, vv = k[b, h // G][ki.clamp(min=0)], v[b, h // G][ki.clamp(min=0)]
        o2, l2 = attend_lse(qq[:, None], kk[:, None], vv[:, None], scale=scale, mask=mask[:, None])
        rows = qi[qv]
        o, l = merge_lse(out[b, h, rows], lse[b, h, rows], o2[:, 0][qv], l2[:, 0][qv])
        out[b, h, rows], lse[b, h, rows] = o, l
    if params["update"]:
        c = F.normalize(cent.float(), dim=-1)
        qn = F.normalize(q.float(), dim=-1).transpose(0, 1).reshape(Hq, -1, D)
        kn = F.normalize(k.float(), dim=-1).repeat_interleave(G, 1).transpose(0, 1).reshape(Hq, -1, D)
        x = torch.cat([qn, kn], 1)  # [Hq, B * (Sq + Sk), D]
        lab = torch.cat([cq.transpose(0, 1).reshape(Hq, -1), ck.transpose(0, 1).reshape(Hq, -1)], 1)
        s = torch.zeros_like(c).scatter_add_(1, lab[..., None].expand(-1, -1, D), x)
        ones = torch.ones(lab.shape, device=c.device)
        n = torch.zeros(c.shape[:2], device=c.device).scatter_add_(1, lab, ones)
        mean = torch.where(n[..., None] > 0, s / n.clamp(min=1)[..., None], c)
        st["routing_centroids"] = params["decay"] * c + (1 - params["decay"]) * mean
    elif state is not None and "routing_centroids" not in state:
        state["routing_centroids"] = cent
    return out.to(q.dtype)


ROUTING = DynamicMethod(
    name="routing",
    paper="Efficient Content-Based Sparse Attention with Routing Transformers (Roy et al., TACL 2021)",
    summary="Online k-means routing of q and k to C centroids; attention within cluster plus local chunk.",
    params=(
        Param("n_clusters", "int", 16, 1, None, "centroids per head (C)"),
        Param("window", "int", 256, 1, None, "local chunk each query also attends (causal)"),
        Param("decay", "float", 0.999, 0.0, 1.0, "EMA decay of the centroid update"),
        Param("update", "bool", False, None, None, "update the centroids by EMA on this call"),
    ),
    kind="dynamic", phases=frozenset({"prefill"}), needs_calibration=False, crossover=4096,
    crossover_why="routing and per-cluster gathers cost more than dense below ~4k tokens",
    mask_mod=causal_envelope, kv_policy=lambda p, *, kv_len: KVPolicy.all(),
    select=None, attend=routing_attend, granularity="cluster",
)


# ----------------------------------------------------------------------------------------------
# HyperAttention


def _rng_device(gen: torch.Generator | None, device: torch.device) -> torch.device:
    """Where random draws happen: on the generator's device (hyper_attention's seeded CPU generator, so
    a seed gives the same hash and sample on every device; the draw is then copied host -> device,
    no sync back), else on ``device`` with its global generator."""
    return device if gen is None else gen.device


def _gray_rank(bits: Tensor) -> Tensor:
    """Position of each Gray-code word in the Gray sequence (adjacent ranks differ in one bit):
    bits Bool[..., r] -> int64 [...]. Sorting by it puts Hamming-close hashes next to each other."""
    b = bits.long()
    out = torch.zeros(b.shape[:-1], dtype=torch.long, device=b.device)
    acc = torch.zeros_like(out)
    for i in range(b.shape[-1]):  # binary_i = binary_{i-1} xor gray_i (r is small)
        acc = acc ^ b[..., i]
        out = out * 2 + acc
    return out


def _sortlsh(q: Tensor, k: Tensor, v: Tensor, proj: Tensor, block: int, m: int, scale: float,
             gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Non-causal HyperAttention on q [N, nq, D], k/v [N, nk, D]: block-diagonal attention after sorting
    queries and keys by their LSH bucket, plus ``m`` uniformly sampled columns (weighted to stand for
    the keys outside the query's block). Returns (out fp32 [N, nq, D], lse [N, nq])."""
    N, nq, D = q.shape
    nk = k.shape[1]
    nb = -(-nq // block)
    if nb <= 1:
        o, l = attend_lse(q[:, None], k[:, None], v[:, None], scale=scale)
        return o[:, 0], l[:, 0]
    bkk = -(-nk // nb)  # key block size so both sides have nb blocks
    oq = _gray_rank(q.float() @ proj > 0).argsort(dim=-1, stable=True)  # [N, nq]
    ok = _gray_rank(k.float() @ proj > 0).argsort(dim=-1, stable=True)
    qs = F.pad(q.gather(1, oq[..., None].expand(-1, -1, D)), (0, 0, 0, nb * block - nq))
    ks = F.pad(k.gather(1, ok[..., None].expand(-1, -1, D)), (0, 0, 0, nb * bkk - nk))
    vs = F.pad(v.gather(1, ok[..., None].expand(-1, -1, D)), (0, 0, 0, nb * bkk - nk))
    kvalid = (torch.arange(nb * bkk, device=k.device) < nk).view(1, nb, 1, bkk)
    o, l = attend_lse(qs.view(N, nb, block, D), ks.view(N, nb, bkk, D), vs.view(N, nb, bkk, D),
                      scale=scale, mask=None if nb * bkk == nk else kvalid)
    o, l = o.reshape(N, -1, D)[:, :nq], l.reshape(N, -1)[:, :nq]
    out = torch.empty_like(o).scatter_(1, oq[..., None].expand(-1, -1, D), o)
    lse = torch.empty_like(l).scatter_(1, oq, l)
    if m > 0 and nk > bkk:
        dev = k.device
        idx = torch.randint(0, nk, (N, m), generator=gen, device=_rng_device(gen, dev)).to(dev)
        kb = torch.empty_like(ok).scatter_(1, ok, torch.arange(nk, device=dev).expand(N, nk) // bkk)  # key->block
        qb = torch.empty_like(oq).scatter_(1, oq, torch.arange(nq, device=dev).expand(N, nq) // block)
        mask = kb.gather(1, idx)[:, None, :] != qb[:, :, None]  # [N, nq, m]: outside own block
        o2, l2 = attend_lse(q[:, None], k.gather(1, idx[..., None].expand(-1, -1, D))[:, None],
                            v.gather(1, idx[..., None].expand(-1, -1, D))[:, None], scale=scale,
                            mask=mask[:, None])
        out, lse = merge_lse(out, lse, o2[:, 0], l2[:, 0] + math.log((nk - bkk) / m))
    return out, lse


def _hyper_causal(q: Tensor, k: Tensor, v: Tensor, proj: Tensor, block: int, m: int, min_len: int,
                  scale: float, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
    # q, k, v [N, n, D], equal lengths; the paper's recursion: two causal halves + one unmasked block
    n = q.shape[1]
    if n <= min_len:
        o, l = attend_lse(q[:, None], k[:, None], v[:, None], scale=scale, is_causal=True)
        return o[:, 0], l[:, 0]
    h = n // 2
    o1, l1 = _hyper_causal(q[:, :h], k[:, :h], v[:, :h], proj, block, m, min_len, scale, gen)
    o2, l2 = _hyper_causal(q[:, h:], k[:, h:], v[:, h:], proj, block, m, min_len, scale, gen)
    o3, l3 = _sortlsh(q[:, h:], k[:, :h], v[:, :h], proj, block, m, scale, gen)
    o2, l2 = merge_lse(o2, l2, o3, l3)
    return torch.cat([o1, o2], 1), torch.cat([l1, l2], 1)


def hyper_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = True,
                    lsh_num_projs: int = 7, block_size: int = 256, sample_size: int = 256,
                    min_seq_len: int = 4096, proj: Tensor | None = None, seed: int = 0) -> Tensor:
    """HyperAttention (Han et al., ICLR 2024). q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> [B, Hq, Sq, D].

    sortLSH: queries and keys are hashed by ``lsh_num_projs`` random hyperplanes (``proj [D, r]`` to fix
    them), sorted by Gray-code rank, and attend block-diagonally in ``block_size`` chunks; ``sample_size``
    uniformly sampled key columns estimate the rest. Causal attention recurses as in the paper: two
    causal halves (exact below ``min_seq_len``) and the unmasked lower-left block by sortLSH.
    ``sample_size=0`` leaves only the block-diagonal selection.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    gen = torch.Generator().manual_seed(seed)  # CPU: the same hash and sample for a seed on every device
    if proj is None:
        proj = torch.randn(D, lsh_num_projs, generator=gen, device=gen.device)
    proj = proj.to(q.device)  # host -> device copy of the seeded hyperplanes (no-op on CPU)
    qf = q.reshape(B * Hq, Sq, D)
    kf = k.repeat_interleave(G, 1).reshape(B * Hq, Sk, D)
    vf = v.repeat_interleave(G, 1).reshape(B * Hq, Sk, D)
    if not causal:
        o, _ = _sortlsh(qf, kf, vf, proj.float(), block_size, sample_size, scale, gen)
        return o.view(B, Hq, Sq, D).to(q.dtype)
    off = Sk - Sq
    o, l = _hyper_causal(qf, kf[:, off:], vf[:, off:], proj.float(), block_size, sample_size,
                         min_seq_len, scale, gen)
    if off:
        o2, l2 = _sortlsh(qf, kf[:, :off], vf[:, :off], proj.float(), block_size, sample_size, scale, gen)
        o, l = merge_lse(o, l, o2, l2)
    return o.view(B, Hq, Sq, D).to(q.dtype)


def hyper_attend(q: Tensor, k: Tensor, v: Tensor, *, params: dict, state: dict | None,
                 mask_mod: MaskMod | None, scale: float) -> Tensor:
    """Registry entry of :func:`hyper_attention` (causal); ``state["lsh_proj"] [D, r]`` fixes the hash."""
    check_causal(mask_mod, "hyper")
    return hyper_attention(q, k, v, scale=scale, causal=True, lsh_num_projs=params["lsh_num_projs"],
                           block_size=params["block_size"], sample_size=params["sample_size"],
                           min_seq_len=params["min_seq_len"], proj=(state or {}).get("lsh_proj"),
                           seed=params["seed"])


HYPER = DynamicMethod(
    name="hyper",
    paper="HyperAttention: Long-context Attention in Near-Linear Time (Han et al., ICLR 2024)",
    summary="sortLSH block-diagonal attention on hash-sorted q/k plus sampled columns; causal by recursion.",
    params=(
        Param("lsh_num_projs", "int", 7, 1, 30, "random hyperplanes of the angular LSH"),
        Param("block_size", "int", 256, 1, None, "block-diagonal chunk after sorting"),
        Param("sample_size", "int", 256, 0, None, "uniformly sampled key columns"),
        Param("min_seq_len", "int", 4096, 1, None, "causal recursion is exact at or below this length"),
        Param("seed", "int", 0, 0, None, "seed of the hyperplanes and the column sample"),
    ),
    kind="dynamic", phases=frozenset({"prefill"}), needs_calibration=False, crossover=4096,
    crossover_why="exact below min_seq_len (4096) by construction",
    mask_mod=causal_envelope, kv_policy=lambda p, *, kv_len: KVPolicy.all(),
    select=None, attend=hyper_attend, granularity="cluster",
)
