"""Execution plan of the CPU block-sparse engine: a layout turned into a few batched SDPA calls.

Notation (used in shape comments throughout the engine):
    B, Hq, Hkv, G = Hq // Hkv   batch, query heads, kv heads, GQA group size
    Ge                          q heads packed per row: G when the G heads of a group share the block
                                map (their queries then share one gathered KV), else 1
    RG = B * Hq / Ge            row groups; row group rg reads kv head kvh(rg)
    bq, bk                      query / key tile; bq = Sq when the layout has one query block (decode)
    Mq, Mk                      query / key blocks;  M = Ge * bq packed query rows per row
    row r = rg * Mq + mq        one (row group, query block): queries Qp[r] : [M, D]
    kv block f = kvh * Mk + mk  a key tile Kp[f * bk : (f + 1) * bk] : [bk, D]

Each row's work is split into at most three tasks of different kinds:
    "full"   its FULL blocks, no mask          (one SDPA call per bucket of equal block counts)
    "causal" one partial block whose pattern is the top-left causal triangle (SDPA is_causal)
    "masked" its other partial blocks, with an additive mask from a bank of deduplicated patterns
Tasks of one kind with equal block counts form a bucket. A bucket whose rows and (contiguous) key runs
advance by constant strides is cut into arithmetic *segments* and read through ``as_strided`` views
(no gather); otherwise K/V blocks are gathered. Partial results are merged by log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lcpass.layout import BlockLayout
from lcpass.masks import MaskMod

__all__ = ["Bucket", "EnginePlan", "build_plan"]

_PATTERN_CHUNK = 1 << 23  # pattern elements evaluated at once
_MAX_SEGMENTS = 8  # more arithmetic segments than this (and than R/4) -> gather the bucket


@dataclass
class Bucket:
    """Tasks of one kind with ``n`` blocks each."""

    kind: str  # "full" | "causal" | "masked"
    n: int
    rows: Tensor  # [R] int64 row ids, ascending
    blocks: Tensor  # [R, n] int64 flat kv block ids
    segments: list[tuple[int, int, int, int, int]] | None = None  # (r0, dr, f0, df, count)
    patterns: Tensor | None = None  # masked: [R, n] pattern ids into the plan's bank
    shared_pattern: bool = False  # masked: every row uses patterns[0]

    @property
    def num_tasks(self) -> int:
        return int(self.rows.shape[0])


@dataclass
class EnginePlan:
    B: int
    Hq: int
    Hkv: int
    Ge: int
    Mq: int
    Mk: int
    bq: int
    bk: int
    q_len: int
    kv_len: int
    buckets: list[Bucket]
    bank: Tensor  # Bool[Npat, M, bk] element patterns of partial blocks (True = attend)
    dense: str | None = None  # "causal" / "full": the layout is dense; run SDPA directly
    computed_blocks: int = 0  # (row, kv block) tiles computed (packed rows count once)
    _float_bank: dict = field(default_factory=dict, repr=False)

    @property
    def RG(self) -> int:
        return self.B * self.Hq // self.Ge

    @property
    def M(self) -> int:
        return self.Ge * self.bq

    def kv_head(self, rg: Tensor) -> Tensor:
        """Flat kv head (b * Hkv + h) read by row groups ``rg``."""
        per_b = self.Hq // self.Ge
        b, j = rg // per_b, rg % per_b
        return b * self.Hkv + (j * self.Ge) // (self.Hq // self.Hkv)

    def first_head(self, rg: Tensor) -> Tensor:
        """(b, first q head) of row groups ``rg``."""
        per_b = self.Hq // self.Ge
        return rg // per_b, (rg % per_b) * self.Ge

    def additive_bank(self, dtype: torch.dtype) -> Tensor:
        """The pattern bank as an additive mask (0 / -inf) in ``dtype``: [Npat, M, bk]."""
        if dtype not in self._float_bank:
            z = torch.zeros(self.bank.shape, dtype=dtype)
            self._float_bank[dtype] = z.masked_fill(~self.bank, float("-inf"))
        return self._float_bank[dtype]


def _maps_for_call(layout: BlockLayout, B: int, kv_keep: Tensor | None) -> tuple[Tensor, Tensor]:
    # -> (partial, full) Bool[Bx, H, Mq, Mk]; padded keys and kv_keep never fall in a full block
    part, full = layout.block_maps()
    bk = layout.block_size[1]
    Mk = layout.num_kv_blocks
    if layout.kv_len % bk:
        edge = torch.zeros(Mk, dtype=torch.bool)
        edge[-1] = True
        part = part | (full & edge)
        full = full & ~edge
    if kv_keep is not None:
        kp = torch.zeros(B, Mk * bk, dtype=torch.bool)
        kp[:, : layout.kv_len] = kv_keep.cpu()
        valid = torch.zeros(Mk * bk, dtype=torch.bool)
        valid[: layout.kv_len] = True
        kp = kp.view(B, Mk, bk)
        any_k = kp.any(-1)[:, None, None, :]  # [B, 1, 1, Mk]
        all_k = (kp | ~valid.view(Mk, bk)).all(-1)[:, None, None, :]
        part = (part | (full & ~all_k)) & any_k
        full = full & all_k
    return part, full


def _segments(rows: Tensor, starts: Tensor) -> list[tuple[int, int, int, int, int]]:
    """Cut (rows, starts) into maximal runs where both advance by constant steps."""
    r = rows.tolist()
    f = starts.tolist()
    out = []
    i = 0
    n = len(r)
    while i < n:
        if i + 1 == n:
            out.append((r[i], 1, f[i], 1, 1))
            break
        dr, df = r[i + 1] - r[i], f[i + 1] - f[i]
        j = i + 1
        while j + 1 < n and r[j + 1] - r[j] == dr and f[j + 1] - f[j] == df:
            j += 1
        out.append((r[i], dr, f[i], df, j - i + 1))
        i = j + 1
    return out


def _maybe_segments(rows: Tensor, blocks: Tensor) -> list[tuple[int, int, int, int, int]] | None:
    # blocks: [R, n]; view mode needs contiguous runs per row and few arithmetic segments
    n = blocks.shape[1]
    if n > 1 and not bool((blocks[:, 1:] - blocks[:, :-1] == 1).all()):
        return None
    segs = _segments(rows, blocks[:, 0])
    if len(segs) > max(_MAX_SEGMENTS, rows.shape[0] // 4):
        return None
    return segs


def _patterns(plan_geo: dict, mask_mod: MaskMod, kv_keep: Tensor | None, idx: Tensor) -> Tensor:
    """Element patterns Bool[P, M, bk] of partial blocks idx [P, 3] = (rg, mq, mk)."""
    g = plan_geo
    Ge, bq, bk, q_off, Sq, Sk = g["Ge"], g["bq"], g["bk"], g["q_off"], g["Sq"], g["Sk"]
    M = Ge * bq
    ar_m = torch.arange(M)
    head_in = ar_m // bq  # [M]
    q_in = ar_m % bq
    ar_k = torch.arange(bk)
    out = torch.empty(idx.shape[0], M, bk, dtype=torch.bool)
    step = max(1, _PATTERN_CHUNK // (M * bk))
    for s in range(0, idx.shape[0], step):
        rg, mq, mk = idx[s: s + step].unbind(1)
        b, h0 = g["first_head"](rg)
        qrel = mq[:, None] * bq + q_in  # [P, M]
        qpos = qrel + q_off
        kpos = mk[:, None] * bk + ar_k  # [P, bk]
        h = h0[:, None] + head_in  # [P, M]
        e = mask_mod(b[:, None, None], h[:, :, None], qpos[:, :, None], kpos[:, None, :])
        e = e & (qrel < Sq)[:, :, None] & (kpos < Sk)[:, None, :]
        if kv_keep is not None:
            e = e & g["keep"][b[:, None], kpos][:, None, :]
        out[s: s + step] = e.expand(-1, M, bk)
    return out


def _dedup(pat: Tensor) -> tuple[Tensor, Tensor]:
    """Unique patterns: (bank [Npat, M, bk], inverse ids [P])."""
    if pat.shape[0] == 0:
        return pat, torch.zeros(0, dtype=torch.long)
    flat = pat.flatten(1)
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-(1 << 62), 1 << 62, (flat.shape[1],), generator=gen, dtype=torch.long)
    key = (flat.long() * w).sum(1)  # wrapping 64-bit hash
    uniq, inv = torch.unique(key, return_inverse=True)
    first = torch.full((uniq.shape[0],), flat.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inv, torch.arange(flat.shape[0]), reduce="amin")
    bank = pat[first]
    if not torch.equal(bank[inv], pat):  # hash collision: fall back to exact unique
        bank, inv = torch.unique(flat, dim=0, return_inverse=True)
        bank = bank.view(-1, *pat.shape[1:])
    return bank, inv


def build_plan(layout: BlockLayout, B: int, Hq: int, Hkv: int, *, mask_mod: MaskMod | None = None,
               kv_keep: Tensor | None = None, allow_causal: bool = True) -> EnginePlan:
    """Plan the engine's calls for ``layout`` and q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D].

    >>> from lcpass.layout import build_layout
    >>> from lcpass.masks import causal_mask
    >>> lay = build_layout(causal_mask(), 8, 1024, 1024)
    >>> plan = build_plan(lay, 1, 8, 2)
    >>> plan.dense, plan.Ge, [b.kind for b in plan.buckets][-1]
    ('causal', 4, 'causal')
    """
    mm = mask_mod if mask_mod is not None else layout.mask_mod
    Sq, Sk = layout.q_len, layout.kv_len
    bq, bk = layout.block_size
    Mq, Mk = layout.num_q_blocks, layout.num_kv_blocks
    if Mq == 1:
        bq = Sq
    G = Hq // Hkv
    part, full = _maps_for_call(layout, B, kv_keep)
    Bx = part.shape[0]
    # can the G heads of each kv group share rows?  (identical block maps)
    pg = part.view(Bx, Hkv, G, Mq, Mk)
    fg = full.view(Bx, Hkv, G, Mq, Mk)
    packed = bool((pg == pg[:, :, :1]).all() and (fg == fg[:, :, :1]).all())
    Ge = G if packed else 1
    if packed:
        part, full = pg[:, :, 0], fg[:, :, 0]  # [Bx, Hkv, Mq, Mk]
    RGb = Hq // Ge  # row groups per batch entry
    part = part.expand(B, RGb, Mq, Mk).reshape(B * RGb, Mq, Mk)
    full = full.expand(B, RGb, Mq, Mk).reshape(B * RGb, Mq, Mk)
    plan = EnginePlan(B, Hq, Hkv, Ge, Mq, Mk, bq, bk, Sq, Sk, [], torch.zeros(0, Ge * bq, bk,
                                                                               dtype=torch.bool))
    plan.computed_blocks = int(part.sum() + full.sum())
    geo = dict(Ge=Ge, bq=bq, bk=bk, q_off=Sk - Sq, Sq=Sq, Sk=Sk, first_head=plan.first_head)
    if kv_keep is not None:
        keep = torch.zeros(B, Mk * bk, dtype=torch.bool)
        keep[:, :Sk] = kv_keep.cpu()
        geo["keep"] = keep
    rg_all = torch.arange(B * RGb)
    kvh = plan.kv_head(rg_all)  # [RG]

    # ---- full blocks: one task per row, bucketed by count
    nf = full.sum(-1).flatten()  # [RG * Mq]
    order = torch.sort((~full).to(torch.uint8), dim=-1, stable=True).indices.flatten(0, 1)  # [RG*Mq, Mk]
    for n in torch.unique(nf).tolist():
        if n == 0:
            continue
        rows = (nf == n).nonzero().flatten()
        blocks = order[rows, :n] + (kvh[rows // Mq] * Mk)[:, None]
        plan.buckets.append(Bucket("full", n, rows, blocks, _maybe_segments(rows, blocks)))

    # ---- partial blocks: element patterns, deduplicated
    idx = part.nonzero()  # [P, 3] (rg, mq, mk), sorted
    if idx.shape[0]:
        pat = _patterns(geo, mm, kv_keep, idx)
        bank, pid = _dedup(pat)
        plan.bank = bank
        row = idx[:, 0] * Mq + idx[:, 1]
        flat = kvh[idx[:, 0]] * Mk + idx[:, 2]
        is_causal = torch.zeros(idx.shape[0], dtype=torch.bool)
        if allow_causal:
            tri = torch.ones(bq, bk, dtype=torch.bool).tril()
            qvalid = (torch.arange(bq)[:, None] + idx[:, 1, None, None] * bq) < Sq  # [P, bq, 1]
            bank_tri = (bank.view(-1, Ge, bq, bk) == tri).all(-1)  # [Npat, Ge, bq] rows equal
            ok = (bank_tri[pid] | ~qvalid.squeeze(-1)[:, None, :]).flatten(1).all(1)
            # at most one causal task per row: the first qualifying block
            cand = ok.nonzero().flatten()
            if cand.numel():
                first = torch.ones(cand.numel(), dtype=torch.bool)
                first[1:] = row[cand][1:] != row[cand][:-1]
                is_causal[cand[first]] = True
        if is_causal.any():
            sel = is_causal.nonzero().flatten()
            rows, blocks = row[sel], flat[sel, None]
            plan.buckets.append(Bucket("causal", 1, rows, blocks, _maybe_segments(rows, blocks)))
        rest = (~is_causal).nonzero().flatten()
        if rest.numel():
            r_rows, r_flat, r_pid = row[rest], flat[rest], pid[rest]
            uniq_rows, counts = torch.unique_consecutive(r_rows, return_counts=True)
            starts = torch.cumsum(counts, 0) - counts
            for n in torch.unique(counts).tolist():
                which = (counts == n).nonzero().flatten()
                take = starts[which, None] + torch.arange(n)  # [R, n]
                pids = r_pid[take]
                shared = bool((pids == pids[:1]).all())
                plan.buckets.append(Bucket("masked", n, uniq_rows[which], r_flat[take],
                                           None, pids, shared))
    if kv_keep is None and mask_mod is None:
        plan.dense = _dense_kind(plan, *layout.block_maps())
    return plan


def _dense_kind(plan: EnginePlan, part: Tensor, full: Tensor) -> str | None:
    """'full' when every block is full, 'causal' when the plan is exactly causal with aligned tiles."""
    # part, full: the layout's own maps [B|1, H, Mq, Mk] (before padding adjustments)
    if bool(full.all()):
        return "full"
    if plan.q_len != plan.kv_len or plan.bq != plan.bk or plan.Mq != plan.Mk:
        return None
    lower = torch.ones(plan.Mq, plan.Mk, dtype=torch.bool).tril(-1)
    diag = torch.eye(plan.Mq, dtype=torch.bool)
    kinds = {b.kind for b in plan.buckets}
    if bool((full == lower).all()) and bool((part == diag).all()) and "masked" not in kinds:
        return "causal"
    return None
