"""Block-sparse layouts: which (query block, key block) tiles an attention computes.

A :class:`BlockLayout` is a padded CSR per (batch, head, query block) in FlexAttention's
``BlockMask.from_kv_blocks`` convention: ``kv_num_blocks/kv_indices`` list the PARTIAL blocks (the mask
must be applied), ``full_kv_num_blocks/full_kv_indices`` the FULL blocks (every element attends, no mask).
Blocks in neither list are skipped.

Positions are absolute (see :mod:`lcpass.masks`): with ``q_len`` queries and ``kv_len`` keys, query
``i`` sits at ``kv_len - q_len + i``; query blocks are cut from the first query, so a decode call
(``q_len=1``) has a single query block.

>>> from lcpass.masks import causal_mask
>>> lay = build_layout(causal_mask(), n_heads=2, q_len=300, kv_len=300, block_size=128)
>>> lay.kv_num_blocks.tolist()          # one partial (diagonal) block per query block
[[[1, 1, 1], [1, 1, 1]]]
>>> lay.full_kv_num_blocks[0, 0].tolist()
[0, 1, 2]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lcpass.masks import MaskMod, causal_mask

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "BlockLayout",
    "build_layout",
    "layout_from_dense",
    "layout_from_selection",
    "layout_from_topk",
]

# 128 x 128 measured fastest on the 2-core CPU with the flash-for-cpu kernel (see engine docs):
# 64 loses ~10% throughput per block, 256 wastes more work on partial window edges.
DEFAULT_BLOCK_SIZE = 128
_REFINE_CHUNK = 1 << 22  # elements evaluated per refinement chunk


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Padded-CSR block layout (FlexAttention convention). All index tensors are int32.

    Shapes: ``kv_num_blocks [B|1, H, Mq]``, ``kv_indices [B|1, H, Mq, Mk]`` and the same for the
    ``full_`` pair, with ``Mq = ceil(q_len / block_size[0])`` and ``Mk = ceil(kv_len / block_size[1])``.
    ``mask_mod`` is applied inside partial blocks (absolute positions).
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor
    full_kv_indices: Tensor
    block_size: tuple[int, int]
    q_len: int
    kv_len: int
    mask_mod: MaskMod
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        bq, bk = self.block_size
        mq, mk = -(-self.q_len // bq), -(-self.kv_len // bk)
        for name in ("kv_num_blocks", "full_kv_num_blocks"):
            t = getattr(self, name)
            if t.dim() != 3 or t.shape[-1] != mq:
                raise ValueError(f"BlockLayout.{name} has shape {tuple(t.shape)}; expected "
                                 f"[B|1, H, {mq}] for q_len={self.q_len}, block {bq}")
        for name in ("kv_indices", "full_kv_indices"):
            t = getattr(self, name)
            if t.dim() != 4 or t.shape[-2] != mq or t.shape[-1] != mk:
                raise ValueError(f"BlockLayout.{name} has shape {tuple(t.shape)}; expected "
                                 f"[B|1, H, {mq}, {mk}] for kv_len={self.kv_len}, block {bk}")
        if self.q_len > self.kv_len:
            raise ValueError(f"BlockLayout: q_len={self.q_len} > kv_len={self.kv_len}; queries are "
                             f"the last q_len of kv_len positions")

    # -- sizes --------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        """1 when the layout is shared by every batch element."""
        return self.kv_num_blocks.shape[0]

    @property
    def n_heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_indices.shape[3]

    @property
    def q_offset(self) -> int:
        """Absolute position of query 0 (``kv_len - q_len``)."""
        return self.kv_len - self.q_len

    # -- block maps ---------------------------------------------------------------------------
    def block_maps(self) -> tuple[Tensor, Tensor]:
        """``(partial, full)`` boolean maps ``[B|1, H, Mq, Mk]`` (disjoint). Cached."""
        if "maps" not in self._cache:
            self._cache["maps"] = (csr_to_map(self.kv_num_blocks, self.kv_indices),
                                   csr_to_map(self.full_kv_num_blocks, self.full_kv_indices))
        return self._cache["maps"]

    def num_computed_blocks(self) -> int:
        """Partial + full blocks over all batch entries and heads."""
        return int(self.kv_num_blocks.sum() + self.full_kv_num_blocks.sum())

    def density(self, relative_to: Literal["total", "causal"] = "total") -> float:
        """Computed blocks / all ``Mq*Mk`` blocks (``"total"``) or / the blocks a causal mask touches
        at the same geometry (``"causal"``), over batch and heads.

        >>> build_layout(causal_mask(), 1, 256, 256, 128).density("causal")
        1.0
        """
        n = self.num_computed_blocks()
        per = self.batch * self.n_heads
        if relative_to == "total":
            return n / (per * self.num_q_blocks * self.num_kv_blocks)
        if relative_to == "causal":
            ref = build_layout(causal_mask(), 1, self.q_len, self.kv_len, self.block_size)
            return n / (per * ref.num_computed_blocks())
        raise ValueError(f"BlockLayout.density: relative_to={relative_to!r}; use 'total' or 'causal'")

    # -- conversions --------------------------------------------------------------------------
    def to_dense(self, mask_mod: MaskMod | None = None) -> Tensor:
        """Element mask ``[B|1, H, q_len, kv_len]`` (True = attend): full blocks, plus partial blocks
        where ``mask_mod`` (default: the layout's) holds. Materialises q_len x kv_len: small sizes."""
        bq, bk = self.block_size
        part, full = self.block_maps()
        pe = part.repeat_interleave(bq, 2)[:, :, : self.q_len].repeat_interleave(bk, 3)[..., : self.kv_len]
        fe = full.repeat_interleave(bq, 2)[:, :, : self.q_len].repeat_interleave(bk, 3)[..., : self.kv_len]
        dev = part.device  # a layout built on the scores' device stays there
        b = torch.arange(self.batch, device=dev).view(-1, 1, 1, 1)
        h = torch.arange(self.n_heads, device=dev).view(1, -1, 1, 1)
        q = torch.arange(self.q_len, device=dev).view(1, 1, -1, 1) + self.q_offset
        kv = torch.arange(self.kv_len, device=dev).view(1, 1, 1, -1)
        elem = (mask_mod if mask_mod is not None else self.mask_mod)(b, h, q, kv)
        return fe | (pe & elem.to(dev))

    def to_block_mask(self):
        """A ``torch.nn.attention.flex_attention.BlockMask`` over the same blocks and ``mask_mod``
        (queries re-based to flex's relative positions), e.g. for the compiled-flex baseline."""
        from torch.nn.attention.flex_attention import BlockMask

        off = self.q_offset
        mm = self.mask_mod
        if off:
            def mask_mod(b, h, q_idx, kv_idx):
                return mm(b, h, q_idx + off, kv_idx)
        else:
            mask_mod = mm
        return BlockMask.from_kv_blocks(
            self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
            BLOCK_SIZE=self.block_size, mask_mod=mask_mod, seq_lengths=(self.q_len, self.kv_len))


# ----------------------------------------------------------------------------------------------
# helpers


def csr_to_map(num: Tensor, idx: Tensor) -> Tensor:
    """Padded CSR -> block map. num: [B, H, Mq], idx: [B, H, Mq, Mk] -> Bool[B, H, Mq, Mk]."""
    mk = idx.shape[-1]
    valid = torch.arange(mk, device=idx.device) < num[..., None].long()
    out = torch.zeros(idx.shape, dtype=torch.int8, device=idx.device)
    out.scatter_add_(-1, idx.long().clamp(0, mk - 1), valid.to(torch.int8))
    return out > 0


def map_to_csr(m: Tensor) -> tuple[Tensor, Tensor]:
    """Block map -> padded CSR. m: Bool[B, H, Mq, Mk] -> (num [B, H, Mq], indices [B, H, Mq, Mk]), listed
    blocks first, ascending."""
    num = m.sum(-1).to(torch.int32)
    idx = torch.sort((~m).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return num.contiguous(), idx.contiguous()


def _from_maps(partial: Tensor, full: Tensor, block_size: tuple[int, int], q_len: int, kv_len: int,
               mask_mod: MaskMod) -> BlockLayout:
    full = full.contiguous()
    partial = (partial & ~full).contiguous()
    pn, pi = map_to_csr(partial)
    fn, fi = map_to_csr(full)
    return BlockLayout(pn, pi, fn, fi, block_size, q_len, kv_len, mask_mod)


def _block_size(block_size: int | tuple[int, int]) -> tuple[int, int]:
    bs = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(bs) != 2 or any((not isinstance(x, int)) or x < 1 for x in bs):
        raise ValueError(f"block_size={block_size!r}; pass a positive int or a (q, kv) pair of "
                         f"positive ints (default {DEFAULT_BLOCK_SIZE})")
    return bs  # type: ignore[return-value]


def _check_sizes(owner: str, q_len: int, kv_len: int) -> None:
    if q_len < 1 or kv_len < 1 or q_len > kv_len:
        raise ValueError(f"{owner}: q_len={q_len}, kv_len={kv_len}; need 1 <= q_len <= kv_len "
                         f"(queries are the last q_len positions)")


def _bounds(n_blocks: int, block: int, length: int, offset: int) -> tuple[Tensor, Tensor]:
    lo = torch.arange(n_blocks, dtype=torch.long) * block
    hi = torch.clamp(lo + block, max=length)
    return lo + offset, hi + offset


# ----------------------------------------------------------------------------------------------
# builders


def build_layout(mask_mod: MaskMod, n_heads: int, q_len: int, kv_len: int,
                 block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE, batch: int = 1) -> BlockLayout:
    """Layout of ``mask_mod`` for ``n_heads`` heads, ``q_len`` queries (the last ones) and ``kv_len`` keys.

    O(number of blocks) through the mask's block classifier; only blocks the classifier cannot decide
    exactly are refined by evaluating the element predicate on them (vectorised). Masks without a
    classifier (:func:`lcpass.masks.mask_from_callable`) are evaluated on every block, per batch entry
    when ``batch > 1``. Cached per ``(mask_mod, n_heads, q_len, kv_len, block_size, batch)``.

    >>> from lcpass.masks import streaming_mask
    >>> lay = build_layout(streaming_mask(4, 1024), n_heads=8, q_len=8192, kv_len=8192)
    >>> lay.kv_indices.shape                              # [1, H, Mq, Mk]
    torch.Size([1, 8, 64, 64])
    """
    if not isinstance(mask_mod, MaskMod):
        raise TypeError(f"build_layout: mask_mod={mask_mod!r} is not a MaskMod; wrap plain "
                        f"functions with lcpass.masks.mask_from_callable(fn, name)")
    bs = _block_size(block_size)
    _check_sizes("build_layout", q_len, kv_len)
    if n_heads < 1 or batch < 1:
        raise ValueError(f"build_layout: n_heads={n_heads}, batch={batch}; both must be >= 1")
    if mask_mod.n_heads is not None and mask_mod.n_heads != n_heads:
        raise ValueError(f"build_layout: {mask_mod!r} has per-head parameters for {mask_mod.n_heads} "
                         f"heads but n_heads={n_heads}; give one value per head")
    return _build_cached(mask_mod, n_heads, q_len, kv_len, bs, batch)


@functools.lru_cache(maxsize=16)  # a 128k x 32-head layout holds ~0.3 GB of indices
def _build_cached(mask: MaskMod, n_heads: int, q_len: int, kv_len: int, bs: tuple[int, int],
                  batch: int) -> BlockLayout:
    bq, bk = bs
    mq, mk = -(-q_len // bq), -(-kv_len // bk)
    q_lo, q_hi = _bounds(mq, bq, q_len, kv_len - q_len)
    kv_lo, kv_hi = _bounds(mk, bk, kv_len, 0)
    # factory masks without per-head parameters are the same for every head: classify one
    head_free = mask.has_block_classifier and mask.n_heads is None
    nh = 1 if head_free else n_heads
    h = torch.arange(nh).view(-1, 1, 1)
    touched, full, exact = mask.classify(h, q_lo.view(1, -1, 1), q_hi.view(1, -1, 1),
                                         kv_lo.view(1, 1, -1), kv_hi.view(1, 1, -1))
    nb = batch if not mask.has_block_classifier else 1
    shape = (nb, nh, mq, mk)
    touched = touched.expand(shape).clone()
    full = full.expand(shape).clone()
    exact = exact.expand(shape)
    todo = (touched & ~full & ~exact).nonzero()  # [P, 4]: b, h, mq, mk
    step = max(1, _REFINE_CHUNK // (bq * bk))
    ar_q, ar_k = torch.arange(bq), torch.arange(bk)
    for s in range(0, todo.shape[0], step):
        b_i, h_i, m_i, n_i = todo[s: s + step].unbind(1)
        qpos = q_lo[m_i, None] + ar_q  # [P, bq]
        kpos = kv_lo[n_i, None] + ar_k  # [P, bk]
        qv = qpos < q_hi[m_i, None]
        kvv = kpos < kv_hi[n_i, None]
        valid = qv[:, :, None] & kvv[:, None, :]
        e = mask(b_i.view(-1, 1, 1), h_i.view(-1, 1, 1), qpos[:, :, None], kpos[:, None, :]) & valid
        touched[b_i, h_i, m_i, n_i] = e.flatten(1).any(1)
        full[b_i, h_i, m_i, n_i] = (e | ~valid).flatten(1).all(1)
    shape = (nb, n_heads, mq, mk)
    return _from_maps((touched & ~full).expand(shape), (full & touched).expand(shape), bs, q_len,
                      kv_len, mask)


def _dense_mask_mod(mask: Tensor) -> MaskMod:
    # mask: Bool[B|1, H, Sq, Sk]; positions absolute, queries at Sk - Sq + i
    off = mask.shape[-1] - mask.shape[-2]
    nb = mask.shape[0]

    def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        bb = b if nb > 1 else torch.zeros_like(b)
        return mask[bb, h, q - off, kv]
    return MaskMod(f"dense{tuple(mask.shape)}", ("dense", id(mask)), fn, None)


def layout_from_dense(mask: Tensor, block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE) -> BlockLayout:
    """Layout of an element mask ``Bool[B|1, H, Sq, Sk]`` (the test oracle; O(Sq*Sk)).

    A block is listed when any element attends; full when every in-range element attends. The layout's
    ``mask_mod`` indexes ``mask`` (absolute positions, queries last).

    >>> lay = layout_from_dense(torch.ones(1, 1, 5, 5, dtype=torch.bool).tril(), 4)
    >>> lay.full_kv_num_blocks.tolist(), lay.kv_num_blocks.tolist()
    ([[[0, 2]]], [[[1, 0]]])
    """
    if mask.dim() != 4 or mask.dtype != torch.bool:
        raise ValueError(f"layout_from_dense: mask must be Bool[B|1, H, Sq, Sk], got "
                         f"{mask.dtype} of shape {tuple(mask.shape)}")
    bq, bk = _block_size(block_size)
    B, H, sq, sk = mask.shape
    _check_sizes("layout_from_dense", sq, sk)
    mq, mk = -(-sq // bq), -(-sk // bk)
    pad = torch.zeros(B, H, mq * bq, mk * bk, dtype=torch.bool, device=mask.device)
    valid = torch.zeros(1, 1, mq * bq, mk * bk, dtype=torch.bool, device=mask.device)
    pad[:, :, :sq, :sk] = mask
    valid[:, :, :sq, :sk] = True
    pad = pad.view(B, H, mq, bq, mk, bk)
    valid = valid.view(1, 1, mq, bq, mk, bk)
    touched = pad.any(5).any(3)
    full = (pad | ~valid).all(5).all(3)
    return _from_maps(touched & ~full, full, (bq, bk), sq, sk, _dense_mask_mod(mask))


def layout_from_selection(selected: Tensor, *, q_len: int, kv_len: int, mask_mod: MaskMod,
                          block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE) -> BlockLayout:
    """Layout from per-(batch, head, query block) lists of kv block indices (dynamic methods).

    ``selected: int[B|1, H, Mq, K]``; entries ``< 0`` are ignored, duplicates merged. The computed
    blocks are the selected ones that ``mask_mod`` touches; a selected block is full when ``mask_mod``
    covers it fully, partial (masked with ``mask_mod``) otherwise. Use ``full_mask()`` for none.

    >>> sel = torch.tensor([[[[0, -1], [0, 1]]]])          # B=1, H=1, Mq=2, K=2
    >>> lay = layout_from_selection(sel, q_len=256, kv_len=256, mask_mod=causal_mask(), block_size=128)
    >>> lay.full_kv_num_blocks.tolist(), lay.kv_num_blocks.tolist()
    ([[[0, 1]]], [[[1, 1]]])
    """
    bs = _block_size(block_size)
    _check_sizes("layout_from_selection", q_len, kv_len)
    mq, mk = -(-q_len // bs[0]), -(-kv_len // bs[1])
    if selected.dim() != 4 or selected.shape[2] != mq:
        raise ValueError(f"layout_from_selection: selected has shape {tuple(selected.shape)}; "
                         f"expected [B|1, H, {mq}, K] for q_len={q_len}, block {bs[0]}")
    if int(selected.max()) >= mk:
        raise ValueError(f"layout_from_selection: block index {int(selected.max())} >= Mk={mk} "
                         f"for kv_len={kv_len}, block {bs[1]}")
    return _layout_from_hits(selected, q_len, kv_len, mask_mod, bs)


def _maps_on(mask_mod: MaskMod, n_heads: int, q_len: int, kv_len: int, bs: tuple[int, int],
             device: torch.device) -> tuple[Tensor, Tensor]:
    """The (partial, full) block maps of ``mask_mod`` on ``device``: built once (CPU, cached) and
    uploaded once per device (cached on the layout), so per-call selection work stays on device."""
    base = build_layout(mask_mod, n_heads, q_len, kv_len, bs)
    if device.type == "cpu":
        return base.block_maps()
    key = ("maps", str(device))
    got = base._cache.get(key)
    if got is None:
        got = base._cache[key] = tuple(m.to(device) for m in base.block_maps())
    return got


def _layout_from_hits(selected: Tensor, q_len: int, kv_len: int, mask_mod: MaskMod,
                      bs: tuple[int, int]) -> BlockLayout:
    """Layout of block lists ``int[B|1, H, Mq, K]`` (-1 ignored, indices < Mk) on their device."""
    mq, mk = -(-q_len // bs[0]), -(-kv_len // bs[1])
    B, H = selected.shape[:2]
    sel = selected.long()
    hit = torch.zeros(B, H, mq, mk + 1, dtype=torch.int8, device=selected.device)
    hit.scatter_add_(-1, torch.where(sel < 0, mk, sel), torch.ones_like(sel, dtype=torch.int8))
    hit = hit[..., :mk] > 0
    part, full = _maps_on(mask_mod, H, q_len, kv_len, bs, selected.device)
    return _from_maps(hit & part, hit & full, bs, q_len, kv_len, mask_mod)


def layout_from_topk(block_scores: Tensor, k: int, *, q_len: int, kv_len: int, mask_mod: MaskMod,
                     block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE) -> BlockLayout:
    """Keep the ``k`` highest-scoring kv blocks per (batch, head, query block) among those
    ``mask_mod`` touches (fewer where fewer are touched).

    ``block_scores: float[B|1, H, Mq, Mk]`` (e.g. Quest bounds, pooled q.k). Everything runs on the
    scores' device with torch ops (no host transfer or sync; the mask's static block maps are
    uploaded once per device), so a CUDA selection feeds the kernels directly.

    >>> s = torch.randn(1, 2, 4, 4)
    >>> lay = layout_from_topk(s, 2, q_len=512, kv_len=512, mask_mod=causal_mask(), block_size=128)
    >>> int(lay.kv_num_blocks.sum() + lay.full_kv_num_blocks.sum())   # 1 + 2 + 2 + 2 per head
    14
    """
    bs = _block_size(block_size)
    _check_sizes("layout_from_topk", q_len, kv_len)
    mq, mk = -(-q_len // bs[0]), -(-kv_len // bs[1])
    if block_scores.dim() != 4 or tuple(block_scores.shape[2:]) != (mq, mk):
        raise ValueError(f"layout_from_topk: block_scores has shape {tuple(block_scores.shape)}; "
                         f"expected [B|1, H, {mq}, {mk}]")
    if k < 1:
        raise ValueError(f"layout_from_topk: k={k}; pass k >= 1 blocks per query block")
    H = block_scores.shape[1]
    part, full = _maps_on(mask_mod, H, q_len, kv_len, bs, block_scores.device)
    s = block_scores.float().masked_fill(~(part | full), float("-inf"))
    top = s.topk(min(k, mk), dim=-1)
    sel = torch.where(torch.isfinite(top.values), top.indices, -1)  # [B|1, H, Mq, k], < Mk
    return _layout_from_hits(sel, q_len, kv_len, mask_mod, bs)

