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

Task kinds (one flash-for-cpu call per bucket of tasks with equal kind and block count):
    "full"   FULL blocks only, no mask
    "causal" a single partial block whose pattern is the top-left causal triangle (``is_causal``)
    "masked" blocks with an additive mask taken from a bank of deduplicated element patterns (a FULL
             block inside a masked task uses the all-True pattern)
A row becomes ONE task when it can: only full blocks -> "full"; only a causal diagonal -> "causal";
partial blocks and at most ``FUSE_MAX_FULL`` full blocks -> one "masked" task over all of them (the
mask costs ~12% on the full blocks, less than a merge on this CPU, where every extra pass over the
output is exposed to the shared cores). Rows with more full blocks are split into a "full" task and a
partial task whose result is merged by log-sum-exp (``Bucket.merge``). A bucket whose rows and
contiguous key runs advance by constant strides is cut into arithmetic *segments* read through
``as_strided`` views (no gather); otherwise K/V blocks are gathered.
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
_COALESCE_MAX_BUCKET = 64  # masked buckets with at most this many blocks may be coalesced ...
_COALESCE_MIN_BLOCKS = 32  # ... while padding adds at most max(this, 10% of the plan's blocks)
_COALESCE_MAX_MASK_BYTES = 32 << 20  # ... and their per-row masks stay cacheable
FUSE_MAX_FULL = 8  # rows with partial blocks and at most this many full blocks run as one masked call


@dataclass
class Bucket:
    """Tasks of one kind with ``n`` blocks each."""

    kind: str  # "full" | "causal" | "masked"
    n: int
    rows: Tensor  # [R] int64 row ids, ascending
    blocks: Tensor  # [R, n] int64 flat kv block ids
    merge: bool = False  # merge into rows already written (log-sum-exp) instead of writing
    segments: list[tuple[int, int, int, int, int]] | None = None  # (r0, dr, f0, df, count)
    patterns: Tensor | None = None  # masked: [R, n] pattern ids into the plan's bank
    shared_pattern: bool = False  # masked: every row uses patterns[0]
    _masks: dict = field(default_factory=dict, repr=False)  # dtype -> shared additive mask

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
    buckets: list[Bucket]  # writing buckets first, then merging ones
    bank: Tensor  # Bool[Npat, M, bk] element patterns (True = attend); then all-True, all-False
    uncovered: Tensor | None = None  # rows no bucket writes (their output is zero)
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
    """Cut (rows, starts) into maximal runs where both advance by constant non-negative steps
    (``as_strided`` takes no negative strides)."""
    r = rows.tolist()
    f = starts.tolist()
    out = []
    i = 0
    n = len(r)
    while i < n:
        if i + 1 == n or f[i + 1] - f[i] < 0:
            out.append((r[i], 1, f[i], 1, 1))
            i += 1
            continue
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
    """Element patterns Bool[P, Me, bk] of partial blocks idx [P, 3] = (rg, mq, mk).

    Masks from factories without per-head parameters do not depend on the head: they are evaluated
    once per block (Me = bq) and the caller repeats them over the Ge packed heads; else Me = Ge * bq.
    """
    g = plan_geo
    Ge, bq, bk, q_off, Sq, Sk = g["Ge"], g["bq"], g["bk"], g["q_off"], g["Sq"], g["Sk"]
    head_free = isinstance(mask_mod, MaskMod) and mask_mod.n_heads is None and mask_mod.has_block_classifier
    if head_free and kv_keep is None and idx.shape[0]:
        # factory masks ignore b and (here) h: a block's pattern depends on (mq, mk) only
        uniq, inv = torch.unique(idx[:, 1:], dim=0, return_inverse=True)
        if uniq.shape[0] < idx.shape[0]:
            one = torch.cat([torch.zeros(uniq.shape[0], 1, dtype=idx.dtype), uniq], 1)
            return _patterns(plan_geo, mask_mod, kv_keep, one)[inv]
    Me = bq if head_free else Ge * bq  # rows evaluated per block
    ar_m = torch.arange(Me)
    head_in = ar_m // bq  # [Me]
    q_in = ar_m % bq
    ar_k = torch.arange(bk)
    out = torch.empty(idx.shape[0], Me, bk, dtype=torch.bool)
    step = max(1, _PATTERN_CHUNK // (Me * bk))
    for s in range(0, idx.shape[0], step):
        rg, mq, mk = idx[s: s + step].unbind(1)
        b, h0 = g["first_head"](rg)
        qrel = mq[:, None] * bq + q_in  # [P, Me]
        qpos = qrel + q_off
        kpos = mk[:, None] * bk + ar_k  # [P, bk]
        h = h0[:, None] + head_in  # [P, Me]
        e = mask_mod(b[:, None, None], h[:, :, None], qpos[:, :, None], kpos[:, None, :])
        e = e & (qrel < Sq)[:, :, None] & (kpos < Sk)[:, None, :]
        if kv_keep is not None:
            e = e & g["keep"][b[:, None], kpos][:, None, :]
        out[s: s + step] = e.expand(-1, Me, bk)
    return out


def _dedup(pat: Tensor) -> tuple[Tensor, Tensor]:
    """Unique patterns: (bank [Npat, ...], inverse ids [P]) via a 64-bit hash, verified exactly."""
    if pat.shape[0] == 0:
        return pat, torch.zeros(0, dtype=torch.long)
    flat = pat.reshape(pat.shape[0], -1)
    if flat.shape[1] % 8:
        flat = torch.nn.functional.pad(flat, (0, 8 - flat.shape[1] % 8))
    words = flat.contiguous().view(torch.uint8).view(torch.int64)  # 8 booleans per word
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-(1 << 62), 1 << 62, (words.shape[1],), generator=gen, dtype=torch.long)
    key = (words * w).sum(1)  # wrapping 64-bit hash
    uniq, inv = torch.unique(key, return_inverse=True)
    first = torch.full((uniq.shape[0],), flat.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inv, torch.arange(flat.shape[0]), reduce="amin")
    bank = pat[first]
    if not torch.equal(bank[inv], pat):  # hash collision: exact unique
        bank, inv = torch.unique(pat.reshape(pat.shape[0], -1), dim=0, return_inverse=True)
        bank = bank.view(-1, *pat.shape[1:])
    return bank, inv


def build_plan(layout: BlockLayout, B: int, Hq: int, Hkv: int, *, mask_mod: MaskMod | None = None,
               kv_keep: Tensor | None = None, allow_causal: bool = True,
               fuse_max_full: int = FUSE_MAX_FULL) -> EnginePlan:
    """Plan the engine's calls for ``layout`` and q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D].

    >>> from lcpass.layout import build_layout
    >>> from lcpass.masks import causal_mask
    >>> lay = build_layout(causal_mask(), 8, 1024, 1024)
    >>> plan = build_plan(lay, 1, 8, 2)
    >>> plan.dense, plan.Ge, sorted({b.kind for b in plan.buckets})
    ('causal', 4, ['causal', 'masked'])
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
    RG = B * RGb
    part = part.expand(B, RGb, Mq, Mk).reshape(RG * Mq, Mk)  # [rows, Mk]
    full = full.expand(B, RGb, Mq, Mk).reshape(RG * Mq, Mk)
    M = Ge * bq
    plan = EnginePlan(B, Hq, Hkv, Ge, Mq, Mk, bq, bk, Sq, Sk, [], torch.ones(1, M, bk, dtype=torch.bool))
    plan.computed_blocks = int(part.sum() + full.sum())
    geo = dict(Ge=Ge, bq=bq, bk=bk, q_off=Sk - Sq, Sq=Sq, Sk=Sk, first_head=plan.first_head)
    if kv_keep is not None:
        keep = torch.zeros(B, Mk * bk, dtype=torch.bool)
        keep[:, :Sk] = kv_keep.cpu()
        geo["keep"] = keep
    row_kvh = plan.kv_head(torch.arange(RG)).repeat_interleave(Mq)  # [rows]

    # ---- element patterns of partial blocks, deduplicated; pattern id per block
    pid_map = torch.full((RG * Mq, Mk), -1, dtype=torch.long)
    idx = part.nonzero()  # [P, 2] (row, mk)
    if idx.shape[0]:
        rc = torch.stack([idx[:, 0] // Mq, idx[:, 0] % Mq, idx[:, 1]], 1)
        bank, pid = _dedup(_patterns(geo, mm, kv_keep, rc))
        if bank.shape[1] != M:  # head-free patterns: repeat over the packed heads
            bank = bank.repeat(1, Ge, 1)
        plan.bank = torch.cat([bank, plan.bank])  # all-True pattern after the partial ones
        pid_map[idx[:, 0], idx[:, 1]] = pid
    tri_ok = torch.zeros(plan.bank.shape[0], dtype=torch.bool)  # per pattern: the causal triangle
    tri_ok_last = tri_ok  # ... with the padded query rows of the last query block empty
    if idx.shape[0]:
        if allow_causal:
            tri = torch.ones(bq, bk, dtype=torch.bool).tril()
            rows_eq = (plan.bank.view(-1, Ge, bq, bk) == tri).all(-1)  # [Npat, Ge, bq]
            tri_ok = rows_eq.flatten(1).all(1)
            nvalid = Sq - (Mq - 1) * bq  # valid query rows of the last query block
            empty = ~plan.bank.view(-1, Ge, bq, bk).any(-1)
            tri_ok_last = (rows_eq[:, :, :nvalid].flatten(1).all(1)
                           & empty[:, :, nvalid:].flatten(1).all(1))
    full_id = plan.bank.shape[0] - 1
    pid_map[full] = full_id
    empty_id = plan.bank.shape[0]  # all-False pattern: pads coalesced buckets
    plan.bank = torch.cat([plan.bank, torch.zeros(1, M, bk, dtype=torch.bool)])

    n_part = part.sum(-1)
    n_full = full.sum(-1)
    one_pid = torch.where(n_part == 1, pid_map.masked_fill(~part, -1).amax(-1), 0).clamp(min=0)
    last_row = torch.arange(RG * Mq) % Mq == Mq - 1
    diag_only = (n_part == 1) & torch.where(last_row, tri_ok_last[one_pid], tri_ok[one_pid])
    has_p, has_f = n_part > 0, n_full > 0
    fused = has_p & has_f & (n_full <= fuse_max_full)
    split = has_p & has_f & ~fused

    def add(rows_sel: Tensor, sel_map: Tensor, kind: str, merge: bool) -> None:
        cnt = sel_map.sum(-1)
        for n in torch.unique(cnt[rows_sel]).tolist():
            if n == 0:
                continue
            rows = (rows_sel & (cnt == n)).nonzero().flatten()
            order = torch.sort((~sel_map[rows]).to(torch.uint8), dim=-1, stable=True).indices[:, :n]
            blocks = order + (row_kvh[rows] * Mk)[:, None]
            bucket = Bucket(kind, n, rows, blocks, merge)
            if kind == "masked":
                pats = pid_map[rows[:, None], order]
                bucket.patterns = pats
                bucket.shared_pattern = bool((pats == pats[:1]).all())
            else:
                bucket.segments = _maybe_segments(rows, blocks)
            plan.buckets.append(bucket)

    add(has_f & ~has_p, full, "full", False)
    add(split, full, "full", False)
    add(has_p & ~has_f & diag_only, part, "causal", False)
    add(has_p & ~has_f & ~diag_only, part, "masked", False)
    add(fused, part | full, "masked", False)
    add(split & diag_only, part, "causal", True)
    add(split & ~diag_only, part, "masked", True)
    _coalesce_small(plan, empty_id)
    covered = has_p | has_f
    if not bool(covered.all()):
        plan.uncovered = (~covered).nonzero().flatten()
    if kv_keep is None and mask_mod is None:
        diag_ok = bool(diag_only[has_p].all())
        plan.dense = _dense_kind(plan, *layout.block_maps(), diag_ok)
    return plan


def _coalesce_small(plan: EnginePlan, empty_id: int) -> None:
    """Merge small masked buckets (ramp-up rows of windows, ...) into one padded bucket per merge
    flag: fewer calls; padding blocks use the all-False pattern and cost little by construction."""
    total = sum(b.num_tasks * b.n for b in plan.buckets)
    budget = max(_COALESCE_MIN_BLOCKS, total // 10)
    for merge in (False, True):
        small = [b for b in plan.buckets if b.kind == "masked" and b.merge == merge
                 and b.num_tasks * b.n <= _COALESCE_MAX_BUCKET]
        if len(small) < 2:
            continue
        n = max(b.n for b in small)
        if sum(b.num_tasks * (n - b.n) for b in small) > budget:
            continue
        if sum(b.num_tasks for b in small) * plan.M * n * plan.bk * 4 > _COALESCE_MAX_MASK_BYTES:
            continue  # per-row masks of the merged bucket would be rebuilt every call
        rows, blocks, pats = [], [], []
        for b in small:
            pad = n - b.n
            rows.append(b.rows)
            blocks.append(torch.cat([b.blocks, b.blocks[:, :1].expand(-1, pad)], 1))
            pats.append(torch.cat([b.patterns, torch.full((b.num_tasks, pad), empty_id)], 1))
        pats_t = torch.cat(pats)
        merged = Bucket("masked", n, torch.cat(rows), torch.cat(blocks), merge, None, pats_t,
                        bool((pats_t == pats_t[:1]).all()))
        keep = [b for b in plan.buckets if not any(b is x for x in small)]
        # writing buckets stay before merging ones
        at = len([b for b in keep if not b.merge]) if not merge else len(keep)
        plan.buckets = keep[:at] + [merged] + keep[at:]


def _dense_kind(plan: EnginePlan, part: Tensor, full: Tensor, diag_ok: bool) -> str | None:
    """'full' when every block is full; 'causal' when full blocks are exactly the strict lower block
    triangle and every partial block is a diagonal block holding the causal triangle (``diag_ok``).
    part, full: the layout's own maps [B|1, H, Mq, Mk] (before padding adjustments)."""
    if bool(full.all()):
        return "full"
    if plan.q_len != plan.kv_len or plan.bq != plan.bk or plan.Mq != plan.Mk or not diag_ok:
        return None
    lower = torch.ones(plan.Mq, plan.Mk, dtype=torch.bool).tril(-1)
    diag = torch.eye(plan.Mq, dtype=torch.bool)
    if bool((full == lower).all()) and bool((part == diag).all()):
        return "causal"
    return None
