"""Host-side launchers: argument marshalling and grids for the generated kernels.

Plain functions on tensors (no autograd, no op registration: :mod:`lcpass.codegen.ops` wraps them).
Conventions: ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]``; padded-CSR layout tensors as in
:class:`lcpass.layout.BlockLayout` (``[B|1, Hq, Mq]`` counts, ``[B|1, Hq, Mq, Mk]`` indices; a
shared batch entry is read with batch stride 0). Every launcher takes the kernel module already
loaded for its :class:`~lcpass.codegen.spec.KernelSpec` and the per-head tables of the printed mods.
"""

from __future__ import annotations

from types import ModuleType
from typing import Sequence

import torch

from torch import Tensor

from lcpass.layout import csr_to_map, map_to_csr

__all__ = ["fwd", "decode", "bwd", "key_stats", "block_scores", "token_scores", "csr_transpose",
           "decode_lists", "decode_splits", "bstride"]


def bstride(t: Tensor) -> int:
    """Batch stride of a layout tensor: 0 when one entry is shared by every batch element."""
    return 0 if t.shape[0] == 1 else t.stride(0)


def _keep_args(kv_keep: Tensor | None, like: Tensor) -> tuple[Tensor, int, bool]:
    """(KEEP pointer, batch stride, HAS_KEEP) for an optional Bool[B, Sk] key-padding mask."""
    if kv_keep is None or kv_keep.numel() == 0:  # empty tensor: no padding (the ops' convention)
        return like, 0, False
    keep = kv_keep.to(torch.uint8) if kv_keep.dtype == torch.bool else kv_keep
    return keep, keep.stride(0), True


def _sink_args(sinks: Tensor | None, like: Tensor) -> tuple[Tensor, bool]:
    """(SINK pointer, HAS_SINK) for optional per-row sink logits Float[B, Hq, Sq] (contiguous fp32)."""
    if sinks is None or sinks.numel() == 0:  # empty tensor: no sinks (the ops' convention)
        return like, False
    B, Hq, Sq = like.shape[:3]
    if tuple(sinks.shape) != (B, Hq, Sq):
        raise ValueError(f"sinks has shape {tuple(sinks.shape)}; the kernels take one logit per "
                         f"(batch, head, query), [{B}, {Hq}, {Sq}]")
    return sinks.float().contiguous(), True


def _wrap(kernel, wrap: bool):
    if wrap:
        from torch.library import wrap_triton
        return wrap_triton(kernel)
    return kernel


def fwd(mod: ModuleType, q: Tensor, k: Tensor, v: Tensor, kv_num: Tensor, kv_idx: Tensor,
        full_num: Tensor, full_idx: Tensor, tables: Sequence[Tensor], scale: float, *,
        store_lse: bool, wrap: bool = False, kv_keep: Tensor | None = None,
        sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Block-sparse forward. Returns ``(out [B, Hq, Sq, D], lse [B, Hq, Sq] fp32, log2 units)``.
    ``kv_keep: Bool[B, Sk]`` masks padded keys on every tile; ``sinks: Float[B, Hq, Sq]`` adds one
    logit per row that attends nothing (learned sinks; the lse counts it)."""
    spec = mod.SPEC
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Sq) if store_lse else (1,), device=q.device, dtype=torch.float32)
    keep = _keep_args(kv_keep, q)
    sink, has_sink = _sink_args(sinks, q)
    grid = (triton_cdiv(Sq, spec.block_m), B * Hq)
    _wrap(mod.attn_fwd, wrap)[grid](
        q, k, v, out, lse, kv_num, kv_idx, full_num, full_idx, *tables, float(scale),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        bstride(kv_num), kv_num.stride(1), kv_num.stride(2),
        bstride(kv_idx), kv_idx.stride(1), kv_idx.stride(2),
        Hq, Sq, Sk, *keep[:2], sink, EVEN_N=Sk % spec.sparse_kv == 0, HAS_KEEP=keep[2],
        STORE_LSE=store_lse, HAS_SINK=has_sink, **_launch_opts(spec))
    return out, lse


def _launch_opts(spec) -> dict:
    """num_warps / num_stages for a spec (ignored by the interpreter)."""
    if spec.template == "attn_decode":
        return {"num_warps": 4, "num_stages": 2}
    big = spec.block_m * spec.block_d >= 128 * 128
    return {"num_warps": 8 if big else 4, "num_stages": 3 if spec.dtype != "float32" else 2}


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------------
# layout conversions (torch ops only: no host synchronisation, fixed shapes)




def csr_transpose(kv_num: Tensor, kv_idx: Tensor, full_num: Tensor, full_idx: Tensor,
                  num_q_blocks: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per key block, the query blocks that read it: ``(q_num, q_idx, full_q_num, full_q_idx)``
    with shapes ``[B|1, Hq, Mk]`` and ``[B|1, Hq, Mk, Mq]`` (the backward's dK/dV loop)."""
    part = csr_to_map(kv_num, kv_idx)[..., :num_q_blocks, :].transpose(-1, -2)
    full = csr_to_map(full_num, full_idx)[..., :num_q_blocks, :].transpose(-1, -2)
    qn, qi = map_to_csr(part.contiguous())
    fqn, fqi = map_to_csr(full.contiguous())
    return qn, qi, fqn, fqi


def decode_lists(kv_num: Tensor, kv_idx: Tensor, full_num: Tensor, full_idx: Tensor, n_kv_heads: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Merge the per-q-head lists of one query block into per-KV-head lists for split-KV decode.

    Returns ``(full_num [B|1, Hkv], full_idx [B|1, Hkv, Mk], part_num, part_idx, part_member,
    part_fullbits)``: a block is FULL when every q head of the group has it full; otherwise it is
    on the partial list with ``member`` bits (which of the G heads list it) and ``fullbits`` (which
    list it as full) so the kernel reproduces each head's layout exactly.
    """
    part = csr_to_map(kv_num, kv_idx)[:, :, 0]  # [Bl, Hq, Mk] (decode: one query block)
    full = csr_to_map(full_num, full_idx)[:, :, 0]
    Bl, Hq, Mk = part.shape
    G = Hq // n_kv_heads
    if G > 31:
        raise ValueError(f"decode_lists: GQA group {G} > 31 does not fit the int32 member bits")
    part = part.view(Bl, n_kv_heads, G, Mk)
    full = full.view(Bl, n_kv_heads, G, Mk)
    all_full = full.all(2)
    member = part | full
    weights = (1 << torch.arange(G, device=part.device, dtype=torch.int32)).view(1, 1, G, 1)
    mbits = (member.to(torch.int32) * weights).sum(2)  # [Bl, Hkv, Mk]
    fbits = (full.to(torch.int32) * weights).sum(2)
    pmap = member.any(2) & ~all_full
    fn_, fi = map_to_csr(all_full)
    pn, pi = map_to_csr(pmap)
    pm = torch.gather(mbits, -1, pi.long()).to(torch.int32).contiguous()
    pf = torch.gather(fbits, -1, pi.long()).to(torch.int32).contiguous()
    return fn_, fi, pn, pi, pm, pf


def decode_splits(B: int, n_kv_heads: int, n_blocks: int, n_sm: int = 132) -> int:
    """Programs per (batch, kv head): B * Hkv * splits >= ~2x the SM count, at most one block each."""
    want = max(1, -(-2 * n_sm // max(1, B * n_kv_heads)))
    return int(max(1, min(want, n_blocks, 64)))


# ------------------------------------------------------------------------------------------------


def decode(mod: ModuleType, q: Tensor, k: Tensor, v: Tensor, lists: Sequence[Tensor],
           tables: Sequence[Tensor], scale: float, n_splits: int, *, wrap: bool = False,
           kv_keep: Tensor | None = None, sinks: Tensor | None = None) -> Tensor:
    """Split-KV decode: grid ``(B, Hkv, n_splits)`` writes partial ``(acc, m, l)``, then the merge
    kernel combines the splits by log-sum-exp (starting from ``sinks: Float[B, Hq, Sq]`` when given).
    ``lists`` from :func:`decode_lists`."""
    spec = mod.SPEC
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    fnum, fidx, pnum, pidx, pmem, pfull = lists
    BM, BD = spec.block_m, spec.block_d
    pacc = torch.empty((B, Hkv, n_splits, BM, BD), device=q.device, dtype=torch.float32)
    pm = torch.empty((B, Hkv, n_splits, BM), device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    out = torch.empty_like(q)
    keep = _keep_args(kv_keep, q)
    _wrap(mod.attn_decode, wrap)[(B, Hkv, n_splits)](
        q, k, v, pacc, pm, pl, fnum, fidx, pnum, pidx, pmem, pfull, *tables, float(scale),
        *q.stride(), *k.stride(), *v.stride(),
        bstride(fnum), fnum.stride(1), bstride(fidx), fidx.stride(1),
        Hkv, Sq, Sk, n_splits, *keep[:2], EVEN_N=Sk % spec.sparse_kv == 0, HAS_KEEP=keep[2],
        **_launch_opts(spec))
    sink, has_sink = _sink_args(sinks, q)
    _wrap(mod.attn_decode_merge, wrap)[(B, Hkv)](
        pacc, pm, pl, out, sink, *out.stride(), Hkv, Sq, n_splits, HAS_SINK=has_sink, num_warps=4)
    return out


def bwd(mod: ModuleType, q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
        fwd_lists: Sequence[Tensor], bwd_lists: Sequence[Tensor], tables: Sequence[Tensor],
        scale: float, *, wrap: bool = False, kv_keep: Tensor | None = None
        ) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of block-sparse attention. ``lse`` from the forward (log2 units); ``fwd_lists``
    the layout's ``(kv_num, kv_idx, full_num, full_idx)``; ``bwd_lists`` from :func:`csr_transpose`."""
    spec = mod.SPEC
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dout = dout.contiguous()
    delta = (out.float() * dout.float()).sum(-1).contiguous()  # [B, Hq, Sq]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    kn, ki, fn_, fi = fwd_lists
    qn, qi, fqn, fqi = bwd_lists
    keep = _keep_args(kv_keep, q)
    even = dict(EVEN_N=Sk % spec.sparse_kv == 0, HAS_KEEP=keep[2], **_launch_opts(spec))
    _wrap(mod.attn_bwd_dq, wrap)[(triton_cdiv(Sq, spec.block_m), B * Hq)](
        q, k, v, dout, dq, lse, delta, kn, ki, fn_, fi, *tables, float(scale),
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        bstride(kn), kn.stride(1), kn.stride(2), bstride(ki), ki.stride(1), ki.stride(2),
        Hq, Sq, Sk, *keep[:2], **even)
    _wrap(mod.attn_bwd_dkdv, wrap)[(triton_cdiv(Sk, spec.block_n), B * Hkv)](
        q, k, v, dout, dk, dv, lse, delta, qn, qi, fqn, fqi, *tables, float(scale),
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        bstride(qn), qn.stride(1), qn.stride(2), bstride(qi), qi.stride(1), qi.stride(2),
        Hq, Hkv, Sq, Sk, *keep[:2], **even)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------


def key_stats(mod: ModuleType, k: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per key block: element-wise min, max and mean keys ``[B, Hkv, Mk, D]`` fp32."""
    B, Hkv, Sk, D = k.shape
    mk = triton_cdiv(Sk, block)
    kmin = torch.empty((B, Hkv, mk, D), device=k.device, dtype=torch.float32)
    kmax = torch.empty_like(kmin)
    kmean = torch.empty_like(kmin)
    mod.key_stats[(mk, B * Hkv)](k, kmin, kmax, kmean, *k.stride(), Hkv, Sk, mk, num_warps=4)
    return kmin, kmax, kmean


def block_scores(mod: ModuleType, q: Tensor, stats: tuple[Tensor, Tensor, Tensor], n_kv_heads: int,
                 scale: float) -> Tensor:
    """Scores ``[B, Hq, Mq, Mk]`` fp32 of every key block for every (pooled) query block."""
    spec = mod.SPEC
    B, Hq, Sq, D = q.shape
    kmin, kmax, kmean = stats
    mq, mk = triton_cdiv(Sq, spec.sparse_q), kmin.shape[2]
    out = torch.empty((B, Hq, mq, mk), device=q.device, dtype=torch.float32)
    mod.block_scores[(mq, B * Hq)](q, kmin, kmax, kmean, out, *q.stride(), Hq, Sq, mk,
                                   float(scale), num_warps=4)
    return out


def token_scores(mod: ModuleType, q: Tensor, k: Tensor, scale: float, n_splits: int, *,
                 kv_keep: Tensor | None = None) -> Tensor:
    """TokenSelect's soft vote ``[B, Hkv, Sk]`` fp32: per KV head, the softmax over keys of every
    query row of its group, summed over the rows. Pass 1 (grid ``(B, Hkv, n_splits)``) reduces the
    row max / sum-exp split-KV; pass 2 (grid ``(B, Hkv, cdiv(Sk, BLOCK_N))``) writes the votes."""
    spec = mod.SPEC
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    pm = torch.empty((B, Hkv, n_splits, spec.block_m), device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    vote = torch.empty((B, Hkv, Sk), device=q.device, dtype=torch.float32)
    keep = _keep_args(kv_keep, q)
    args = (*q.stride(), *k.stride(), Hkv, Sq, Sk, n_splits, *keep[:2])
    mod.token_stats[(B, Hkv, n_splits)](q, k, pm, pl, float(scale), *args, HAS_KEEP=keep[2],
                                        num_warps=4)
    mod.token_votes[(B, Hkv, triton_cdiv(Sk, spec.block_n))](q, k, pm, pl, vote, float(scale), *args,
                                                             HAS_KEEP=keep[2], num_warps=4)
    return vote
