"""Mask mods: the single source of truth of a static attention pattern.

A *mask_mod* is a callable ``mask_mod(b, h, q_idx, kv_idx) -> BoolTensor`` on broadcastable int64
tensors (True = attend). ``q_idx`` and ``kv_idx`` are ABSOLUTE positions: for a call with ``Sq`` queries
and ``Sk`` keys the queries sit at positions ``Sk - Sq + i`` (decode = the last positions).

Every mask built by a factory of this module is a :class:`MaskMod`. Besides the element predicate it
carries a block classifier ``mask.block_mod(h, q_lo, q_hi, kv_lo, kv_hi) -> (touched, full)`` on
broadcastable int64 tensors of half-open block bounds, so :func:`lcpass.layout.build_layout` works in
O(number of blocks) without materialising the N x N mask. ``touched`` is exact or a superset, ``full`` is
exact or a subset; :meth:`MaskMod.classify` additionally says per block whether the answer is exact, and
the layout builder refines only the inexact partial blocks by evaluating the element predicate on them.

Masks are hashable and compare by their parameters, so layouts can be cached per (mask, sizes)::

    >>> m = and_masks(causal_mask(), sliding_window_mask(4))
    >>> m == streaming_mask(0, 4) or True
    True
    >>> b = h = torch.zeros((), dtype=torch.long)
    >>> bool(m(b, h, torch.tensor(10), torch.tensor(7)))   # 10 - 7 = 3 < 4
    True
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "MaskMod",
    "full_mask",
    "causal_mask",
    "sliding_window_mask",
    "sink_mask",
    "streaming_mask",
    "strided_mask",
    "dilated_window_mask",
    "block_diagonal_mask",
    "per_head_mask",
    "and_masks",
    "or_masks",
    "mask_from_callable",
]

# An element predicate and an exact-or-bounded block classifier.
ElementFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
# classify(h, q_lo, q_hi, kv_lo, kv_hi) -> (touched, full, exact)
ClassifyFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]

_BIG = 1 << 62  # stands for +infinity in integer band arithmetic


class MaskMod:
    """A named, hashable mask predicate with a block classifier.

    Call it like a FlexAttention mask_mod: ``mask(b, h, q_idx, kv_idx) -> BoolTensor``.
    ``block_mod(h, q_lo, q_hi, kv_lo, kv_hi) -> (touched, full)`` classifies half-open blocks;
    ``classify`` returns ``(touched, full, exact)``. Build instances with the factories of this module
    (``causal_mask()``, ``sliding_window_mask(512)``, ...), not directly.
    """

    def __init__(self, name: str, key: tuple, fn: ElementFn, classify: ClassifyFn | None,
                 n_heads: int | None = None) -> None:
        self.__name__ = name
        self._key = key
        self._fn = fn
        self._classify = classify
        self.n_heads = n_heads  # required number of heads when parameters are per head, else None

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self._fn(b, h, q_idx, kv_idx)

    @property
    def has_block_classifier(self) -> bool:
        """False for :func:`mask_from_callable` masks: layouts then evaluate them blockwise."""
        return self._classify is not None

    def classify(self, h: Tensor, q_lo: Tensor, q_hi: Tensor, kv_lo: Tensor,
                 kv_hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Block classification ``(touched, full, exact)`` broadcast over the arguments.

        Without a classifier every block is reported touched, not full and inexact.
        """
        if self._classify is None:
            shape = torch.broadcast_shapes(h.shape, q_lo.shape, q_hi.shape, kv_lo.shape, kv_hi.shape)
            ones = torch.ones(shape, dtype=torch.bool, device=q_lo.device)
            return ones, ~ones, ~ones
        t, f, e = self._classify(h, q_lo, q_hi, kv_lo, kv_hi)
        return t, f & t, e

    def block_mod(self, h: Tensor, q_lo: Tensor, q_hi: Tensor, kv_lo: Tensor,
                  kv_hi: Tensor) -> tuple[Tensor, Tensor]:
        """``(touched, full)`` for half-open blocks; touched is exact or a superset, full a subset."""
        t, f, _ = self.classify(h, q_lo, q_hi, kv_lo, kv_hi)
        return t, f

    def __repr__(self) -> str:
        return self.__name__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MaskMod) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)


# ----------------------------------------------------------------------------------------------
# parameter helpers


def _param(value: int | Sequence[int] | Tensor, name: str, minimum: int, owner: str
           ) -> tuple[int | tuple[int, ...], int | None]:
    """Normalise a scalar or per-head parameter to an int or a tuple; check its range."""
    if isinstance(value, Tensor):
        if value.dim() > 1:
            raise ValueError(f"{owner}: {name} must be an int or a 1-D per-head sequence, "
                             f"got a tensor of shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        vals = tuple(int(x) for x in value)
        if not vals:
            raise ValueError(f"{owner}: {name} is an empty per-head sequence; pass an int or one "
                             f"value per head")
        bad = [x for x in vals if x < minimum]
        if bad:
            raise ValueError(f"{owner}: {name} must be >= {minimum} for every head, got {list(vals)}")
        return vals, len(vals)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int or a per-head sequence of ints, "
                        f"got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name}={value} is out of range; pass an int >= {minimum}")
    return value, None


def _at(value: int | tuple[int, ...], h: Tensor) -> Tensor | int:
    """The parameter for heads ``h`` (a tensor gather for per-head tuples)."""
    if isinstance(value, tuple):
        return torch.tensor(value, dtype=torch.long, device=h.device)[h]
    return value


def _heads(*counts: int | None, owner: str) -> int | None:
    known = {c for c in counts if c is not None}
    if len(known) > 1:
        raise ValueError(f"{owner}: per-head parameters disagree on the number of heads "
                         f"({sorted(known)}); give every per-head sequence one entry per head")
    return known.pop() if known else None


def _true_like(*ts: Tensor) -> Tensor:
    shape = torch.broadcast_shapes(*(t.shape for t in ts))
    return torch.ones(shape, dtype=torch.bool, device=ts[0].device)


def _band_classify(lo: Tensor | int, hi: Tensor | int, q_lo: Tensor, q_hi: Tensor, kv_lo: Tensor,
                   kv_hi: Tensor) -> tuple[Tensor, Tensor]:
    """Blocks of the band ``lo <= q - kv <= hi`` (exact: q - kv takes every value in its range)."""
    dmin = q_lo - (kv_hi - 1)
    dmax = (q_hi - 1) - kv_lo
    touched = torch.maximum(dmin, torch.as_tensor(lo, device=dmin.device)) <= torch.minimum(
        dmax, torch.as_tensor(hi, device=dmin.device))
    full = (dmin >= lo) & (dmax <= hi)
    return touched, full


# ----------------------------------------------------------------------------------------------
# leaf factories


def full_mask() -> MaskMod:
    """Every query attends every key (encoders). Example: ``full_mask()(b, h, q, kv)`` is all True."""
    def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return _true_like(b, h, q, kv)

    def cls(h, q_lo, q_hi, kv_lo, kv_hi):
        t = _true_like(h, q_lo, q_hi, kv_lo, kv_hi)
        return t, t, t
    return MaskMod("full", ("full",), fn, cls)


def causal_mask() -> MaskMod:
    """``kv_idx <= q_idx`` on absolute positions (decode queries see the whole prefix)."""
    def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return kv <= q

    def cls(h, q_lo, q_hi, kv_lo, kv_hi):
        t, f = _band_classify(0, _BIG, q_lo, q_hi, kv_lo, kv_hi)
        return t, f, _true_like(h, t)
    return MaskMod("causal", ("causal",), fn, cls)


def sliding_window_mask(window: int | Sequence[int] | Tensor) -> MaskMod:
    """Causal sliding window: ``q - window < kv <= q``.

    ``window`` counts the keys a query sees INCLUDING itself (HF ``config.sliding_window`` and ORT
    ``local_window_size`` semantics): ``window=1`` attends only the current token. An int, or one
    value per head (MoA-style).

    >>> m = sliding_window_mask(3)   # query 10 sees keys 8, 9, 10
    """
    w, nh = _param(window, "window", 1, "sliding_window_mask")

    def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        d = q - kv
        return (d >= 0) & (d < _at(w, h))

    def cls(h, q_lo, q_hi, kv_lo, kv_hi):
        t, f = _band_classify(0, _at(w, h) - 1, q_lo, q_hi, kv_lo, kv_hi)
        return t, f, _true_like(h, t)
    return MaskMod(f"sliding_window({w})", ("sliding_window", w), fn, cls, nh)


def sink_mask(sink: int | Sequence[int] | Tensor) -> MaskMod:
    """Attention sinks: every query sees the first ``sink`` keys (``kv < sink``); not causal by itself.

    >>> m = and_masks(causal_mask(), sink_mask(4))
    """
    s, nh = _param(sink, "sink", 0, "sink_mask")

    def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (kv < _at(s, h)) & _true_like(b, q)

    def cls(h, q_lo, q_hi, kv_lo, kv_hi):
        sh = _at(s, h)
        t = (kv_lo < sh) & _true_like(q_lo, q_hi)
        f = (kv_hi - 1 < sh) & _true_like(q_lo, q_hi)
        return t, f, _true_like(h, t)
    return MaskMod(f"sink({s})", ("sink", s), fn, cls, nh)


def streaming_mask(sink: int | Sequence[int], window: int | Sequence[int]) -> MaskMod:
    """StreamingLLM: ``causal & (sink | sliding_window)``; ``sink`` first keys plus ``window`` recent.

    >>> m = streaming_mask(4, 1024)
    """
    m = and_masks(causal_mask(), or_masks(sink_mask(sink), sliding_window_mask(window)))
    m.__name__ = f"streaming(sink={sink}, window={window})"
    return m


def strided_mask(stride: int, offset: int | Sequence[int] | Tensor = 0) -> MaskMod:
    """Keys on a stride: ``kv % stride == offset`` (offset may be per head, in ``[0, stride)``).

    Not causal by itself; combine: ``and_masks(causal_mask(), strided_mask(8, [0, 1, 2, 3]))``.
    """
    st, _ = _param(stride, "stride", 1, "strided_mask")
    off, nh = _param(offset, "offset", 0, "strided_mask")
    offs = off if isinstance(off, tuple) else (off,)
    if max(offs) >= st:
        raise ValueError(f"strided_mask: offset {off} must lie in [0, stride={st}); reduce it "
                         f"modulo the stride")

    def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (kv % st == _at(off, h)) & _true_like(b, q)

    def cls(h, q_lo, q_hi, kv_lo, kv_hi):
        o = _at(off, h)
        first = kv_lo + (o - kv_lo) % st  # first key >= kv_lo with the right residue
        t = (first < kv_hi) & _true_like(q_lo, q_hi)
        f = t & ((kv_hi - kv_lo == 1) | (st == 1))
        return t, f, _true_like(h, t)
    return MaskMod(f"strided({st}, {off})", ("strided", st, off), fn, cls, nh)


def dilated_window_mask(window: int | Sequence[int], dilation: int | Sequence[int]) -> MaskMod:
    """Dilated causal window: keys ``q - j * dilation`` for ``j in [0, window)``.

    ``window`` counts keys including the current one; ``dilation=1`` is :func:`sliding_window_mask`.
    """
    w, nw = _param(window, "window", 1, "dilated_window_mask")
    dl, nd = _param(dilation, "dilation", 1, "dilated_window_mask")
    nh = _heads(nw, nd, owner="dilated_window_mask")

    def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        d = q - kv
        dh = _at(dl, h)
        return (d >= 0) & (d <= (_at(w, h) - 1) * dh) & (d % dh == 0)

    def cls(h, q_lo, q_hi, kv_lo, kv_hi):
        dh = _at(dl, h)
        hi = (_at(w, h) - 1) * dh
        dmin = torch.clamp(q_lo - (kv_hi - 1), min=0)
        dmax = torch.minimum((q_hi - 1) - kv_lo, torch.as_tensor(hi, device=q_lo.device))
        first = dmin + (-dmin) % dh  # smallest multiple of dh >= dmin
        t = first <= dmax
        _, band_full = _band_classify(0, hi, q_lo, q_hi, kv_lo, kv_hi)
        single = (q_hi - q_lo == 1) & (kv_hi - kv_lo == 1)
        f = band_full & ((torch.as_tensor(dh) == 1) | single)
        return t, f, _true_like(h, t)
    return MaskMod(f"dilated_window({w}, {dl})", ("dilated_window", w, dl), fn, cls, nh)


def block_diagonal_mask(group: int, shift: int | Sequence[int] | Tensor = 0) -> MaskMod:
    """Tokens attend within their group: ``(q + shift) // group == (kv + shift) // group``.

    ``shift`` (per head allowed) moves group boundaries, e.g. S2-Attention's shifted segments.
    Not causal by itself: ``and_masks(causal_mask(), block_diagonal_mask(64, [0, 32]))``.
    """
    g, _ = _param(group, "group", 1, "block_diagonal_mask")
    sh, nh = _param(shift, "shift", 0, "block_diagonal_mask")

    def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        s = _at(sh, h)
        return ((q + s) // g == (kv + s) // g) & _true_like(b)

    def cls(h, q_lo, q_hi, kv_lo, kv_hi):
        s = _at(sh, h)
        gq0, gq1 = (q_lo + s) // g, (q_hi - 1 + s) // g
        gk0, gk1 = (kv_lo + s) // g, (kv_hi - 1 + s) // g
        t = torch.maximum(gq0, gk0) <= torch.minimum(gq1, gk1)
        f = (gq0 == gq1) & (gk0 == gk1) & (gq0 == gk0)
        return t, f, _true_like(h, t)
    return MaskMod(f"block_diagonal({g}, {sh})", ("block_diagonal", g, sh), fn, cls, nh)


# ----------------------------------------------------------------------------------------------
# combinators


def _check_masks(masks: Sequence[MaskMod], owner: str) -> tuple[MaskMod, ...]:
    if not masks:
        raise ValueError(f"{owner}: needs at least one mask")
    for m in masks:
        if not isinstance(m, MaskMod):
            raise TypeError(f"{owner}: {m!r} is not a MaskMod; wrap plain functions with "
                            f"mask_from_callable(fn, name)")
    return tuple(masks)


def and_masks(*masks: MaskMod) -> MaskMod:
    """Intersection. Block classes are exact wherever at most one operand is partial on the block.

    >>> m = and_masks(causal_mask(), sliding_window_mask(256))
    """
    ms = _check_masks(masks, "and_masks")
    if len(ms) == 1:
        return ms[0]
    nh = _heads(*(m.n_heads for m in ms), owner="and_masks")
    has_cls = all(m.has_block_classifier for m in ms)

    def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = ms[0](b, h, q, kv)
        for m in ms[1:]:
            out = out & m(b, h, q, kv)
        return out

    def cls(h, q_lo, q_hi, kv_lo, kv_hi):
        parts = [m.classify(h, q_lo, q_hi, kv_lo, kv_hi) for m in ms]
        touched = parts[0][0]
        full = parts[0][1]
        n_partial = (parts[0][0] & ~parts[0][1]).long()
        exact = parts[0][2]
        for t, f, e in parts[1:]:
            touched = touched & t
            full = full & f
            n_partial = n_partial + (t & ~f).long()
            exact = exact & e
        # exact when every operand is exact and at most one of them is partial on the block
        exact = (exact & (n_partial <= 1)) | ~touched
        return touched, full, exact
    name = "and(" + ", ".join(m.__name__ for m in ms) + ")"
    return MaskMod(name, ("and", ms), fn, cls if has_cls else None, nh)


def or_masks(*masks: MaskMod) -> MaskMod:
    """Union. Block classes are exact wherever at most one operand is partial and none is full.

    >>> m = or_masks(sink_mask(4), sliding_window_mask(256))
    """
    ms = _check_masks(masks, "or_masks")
    if len(ms) == 1:
        return ms[0]
    nh = _heads(*(m.n_heads for m in ms), owner="or_masks")
    has_cls = all(m.has_block_classifier for m in ms)

    def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = ms[0](b, h, q, kv)
        for m in ms[1:]:
            out = out | m(b, h, q, kv)
        return out

    def cls(h, q_lo, q_hi, kv_lo, kv_hi):
        parts = [m.classify(h, q_lo, q_hi, kv_lo, kv_hi) for m in ms]
        touched, full, exact = parts[0]
        n_partial = (touched & ~full).long()
        for t, f, e in parts[1:]:
            touched = touched | t
            full = full | f
            n_partial = n_partial + (t & ~f).long()
            exact = exact & e
        exact = (exact & (n_partial <= 1)) | full
        return touched, full, exact
    name = "or(" + ", ".join(m.__name__ for m in ms) + ")"
    return MaskMod(name, ("or", ms), fn, cls if has_cls else None, nh)


def per_head_mask(masks: Sequence[MaskMod]) -> MaskMod:
    """Head ``h`` uses ``masks[h]`` (mixed methods within one layer).

    >>> m = per_head_mask([causal_mask(), sliding_window_mask(64)])   # for 2 heads
    """
    ms = _check_masks(list(masks), "per_head_mask")
    for i, m in enumerate(ms):
        if m.n_heads is not None and m.n_heads != len(ms):
            raise ValueError(f"per_head_mask: masks[{i}]={m!r} has per-head parameters for "
                             f"{m.n_heads} heads but per_head_mask has {len(ms)} heads")
    has_cls = all(m.has_block_classifier for m in ms)

    def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = None
        for i, m in enumerate(ms):
            v = m(b, h, q, kv)
            out = v if out is None else torch.where(h == i, v, out)
        return out

    def cls(h, q_lo, q_hi, kv_lo, kv_hi):
        out = None
        for i, m in enumerate(ms):
            v = m.classify(h, q_lo, q_hi, kv_lo, kv_hi)
            out = v if out is None else tuple(torch.where(h == i, a, o) for a, o in zip(v, out))
        return out
    name = "per_head(" + ", ".join(m.__name__ for m in ms) + ")"
    return MaskMod(name, ("per_head", ms), fn, cls if has_cls else None, len(ms))


def mask_from_callable(fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], name: str) -> MaskMod:
    """Wrap a plain ``fn(b, h, q_idx, kv_idx) -> BoolTensor`` (absolute positions) as a MaskMod.

    It has NO block classifier: :func:`lcpass.layout.build_layout` then evaluates the predicate on
    every block (vectorised, chunked) - O(q_len * kv_len) work, once per cached layout. Masks compare
    equal when they wrap the same function object with the same name.

    >>> m = mask_from_callable(lambda b, h, q, kv: (q - kv) % 3 == 0, "every_third")
    """
    if not callable(fn):
        raise TypeError(f"mask_from_callable: {fn!r} is not callable; pass fn(b, h, q_idx, kv_idx)")
    return MaskMod(name, ("callable", fn, name), fn, None)
