"""Shared pieces of the dynamic methods: the token-level selection, its executor, pooling, LSE merge.

Notation: ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]``, ``G = Hq // Hkv``; queries sit at absolute
positions ``Sk - Sq + i`` (see :mod:`lcpass.masks`); query blocks of ``bq`` queries are cut from the first
query, ``Mq = ceil(Sq / bq)``; key blocks of ``bk`` keys, ``Mk = ceil(Sk / bk)``.

A :class:`TokenSelection` is the token-granular counterpart of :class:`lcpass.layout.BlockLayout`: per
(batch, KV head, query block) a list of ``K`` key positions strictly before the block (``-1`` = unused
slot), plus the block's own keys (its causal "local block"), which are always attended. It runs by
gathering the selected keys into one compact block per query block (no mask unless a row has unused
slots) and a causal call on the local block, merged by log-sum-exp:

    >>> import torch
    >>> q = torch.randn(1, 4, 8, 16); k = v = torch.randn(1, 2, 8, 16)
    >>> idx = torch.tensor([0, 1]).view(1, 1, 1, 2).expand(1, 2, 2, 2)   # blocks of 4 queries
    >>> sel = TokenSelection(idx.clone(), block_q=4, q_len=8, kv_len=8)
    >>> out = token_attention(q, k, v, sel, scale=0.25)                  # [1, 4, 8, 16]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lcpass.engine import dense_attention, sparse_attention
from lcpass.engine.reference import ScoreMod, check_qkv
from lcpass.layout import BlockLayout
from lcpass.masks import MaskMod, causal_mask
from lcpass.methods.base import Method

__all__ = [
    "FORCE",
    "DecodeSelector",
    "DynamicMethod",
    "OnnxBlockTopK",
    "OnnxLowering",
    "Selection",
    "TokenSelection",
    "attend_lse",
    "block_mean",
    "block_pool",
    "block_query_scores",
    "causal_envelope",
    "attend_by",
    "check_causal",
    "local_block_ids",
    "merge_lse",
    "run_selection",
    "selection_mask",
    "token_attention",
]

FORCE = 1e30  # score of blocks/tokens a method always keeps (finite: layout_from_topk drops +-inf)
_GATHER_BYTES = 64 << 20
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _math_lse(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
              scale: float) -> tuple[Tensor, Tensor]:
    """fp32 math twin of the flash-for-CPU op on any device: q [R, H, M, D], k/v [R, H, N, D] ->
    (out [R, H, M, D] fp32, lse [R, H, M] fp32); ``attn_mask`` additive, ``is_causal`` top-left
    (row i sees keys <= i). Rows without a finite score give out 0 and lse -inf."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # [R, H, M, N]
    if attn_mask is not None:
        s = s + attn_mask
    if is_causal:
        M, N = s.shape[-2:]
        s = s.masked_fill(torch.ones(M, N, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # -inf rows: exp(-inf) = 0
    return p @ v.float(), lse


def _flash(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
           scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) of softmax attention: the flash-for-CPU kernel on CPU, :func:`_math_lse` on other
    devices (CUDA runs selections through the Triton backend; this is the portable fallback)."""
    if q.device.type == "cpu":
        return _flash_cpu(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return _math_lse(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def _no_refusal(state: Mapping[str, Any]) -> str | None:
    return None


@dataclass(frozen=True)
class OnnxBlockTopK:
    """The shape of a block top-k selection an ONNX graph computes (:mod:`lcpass.onnx.dynamic`): blocks of
    ``block`` queries / keys cut from position 0; ``topk`` blocks kept per query block (None: every block
    with a finite score, e.g. above a threshold); the first ``sink`` blocks and the ``local`` blocks ending
    at the query block's own always kept; with ``share_kv_heads`` the G query heads of a KV head share one
    score row, reduced by ``share`` (``"max"`` or ``"mean"``)."""

    block: int
    topk: int | None
    sink: int
    local: int = 1
    share_kv_heads: bool = False
    share: str = "max"


@dataclass(frozen=True)
class OnnxLowering:
    """A dynamic method's ONNX lowering, held by its record (``DynamicMethod.onnx``).

    ``layout(params) -> OnnxBlockTopK``; ``scores(g, params) -> str``: the name of the block scores
    ``[B, Hkv, G, Mq, Mk]`` (fp32, larger = more relevant) built with the graph builder ``g`` the exporter
    passes (``g.op``, ``g.const``, ``g.f32``, ``g.q``/``g.k`` as fp32, ``g.pooled``, ``g.block_max``,
    ``g.transpose_last``, ``g.touched``; see :class:`lcpass.onnx.dynamic.BlockGraph`); ``refuse(state) ->
    reason | None``: a site state the graph does not reproduce (a learned gate) is refused with it.
    """

    layout: Callable[[Mapping[str, Any]], OnnxBlockTopK]
    scores: Callable[[Any, Mapping[str, Any]], str]
    refuse: Callable[[Mapping[str, Any]], str | None] = _no_refusal


def _no_slots(params: Mapping[str, Any]) -> int:
    return 0


@dataclass(frozen=True)
class DecodeSelector:
    """A dynamic method's decode-time KV selector, held by its record (``DynamicMethod.decode``) and run by
    :class:`lcpass.kv.Selector` on each cache group at each generated token.

    ``params``: the method parameters it reads (their defaults and ranges are the record's);
    ``attend(q, group, params, scale, *, layer_idx, n_layers, shared) -> [B, h, G, Dv]``: one decode step
    of one group (``q [B, h, G, D]``; see :mod:`lcpass.methods.dynamic.decode` for the group and the
    primitives); ``budget(params)``: tokens one step attends; ``working_slots(params)``: KV slots per KV
    head it keeps beside the cache (counted in the cache's bytes).
    """

    params: tuple[str, ...]
    attend: Callable[..., Tensor]
    budget: Callable[[Mapping[str, Any]], int]
    working_slots: Callable[[Mapping[str, Any]], int] = _no_slots


@dataclass(frozen=True, eq=False)
class TokenSelection:
    """Token-granular selection: ``indices [B, Hkv, Mq, K]`` absolute key positions < block start.

    Entries are distinct per row; ``-1`` marks an unused slot. Query block ``i`` covers queries
    ``[i * block_q, min((i + 1) * block_q, q_len))`` and additionally attends its own keys causally.
    """

    indices: Tensor
    block_q: int
    q_len: int
    kv_len: int
    info: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        mq = -(-self.q_len // self.block_q)
        if self.indices.dim() != 4 or self.indices.shape[2] != mq:
            raise ValueError(f"TokenSelection.indices has shape {tuple(self.indices.shape)}; expected "
                             f"[B, Hkv, {mq}, K] for q_len={self.q_len}, block_q={self.block_q}")
        if not 1 <= self.q_len <= self.kv_len:
            raise ValueError(f"TokenSelection: q_len={self.q_len}, kv_len={self.kv_len}; need "
                             f"1 <= q_len <= kv_len")

    @property
    def q_offset(self) -> int:
        return self.kv_len - self.q_len

    def block_starts(self) -> Tensor:
        """Absolute position of the first query of each query block: int64 [Mq]."""
        mq = self.indices.shape[2]
        return torch.arange(mq, device=self.indices.device) * self.block_q + self.q_offset

    def to_dense(self, n_heads: int) -> Tensor:
        """Element mask ``Bool[B, Hq, Sq, Sk]`` (selected keys | causal local block). Small sizes."""
        B, Hkv, mq, _ = self.indices.shape
        dev = self.indices.device
        sel = torch.zeros(B, Hkv, mq, self.kv_len + 1, dtype=torch.bool, device=dev)
        idx = torch.where(self.indices < 0, self.kv_len, self.indices)
        sel.scatter_(-1, idx, True)
        sel = sel[..., : self.kv_len].repeat_interleave(n_heads // Hkv, 1)
        sel = sel.repeat_interleave(self.block_q, 2)[:, :, : self.q_len]
        qpos = torch.arange(self.q_len, device=dev) + self.q_offset
        start = (torch.arange(self.q_len, device=dev) // self.block_q) * self.block_q + self.q_offset
        kv = torch.arange(self.kv_len, device=dev)
        local = (kv[None] >= start[:, None]) & (kv[None] <= qpos[:, None])
        return sel | local


Selection = Union[BlockLayout, TokenSelection]


@dataclass(frozen=True)
class DynamicMethod(Method):
    """A registered dynamic method: a :class:`~lcpass.methods.base.Method` plus its selector.

    ``select(q, k, *, params, state, mask_mod) -> Selection`` (None for methods whose computation is
    not a pure selection, e.g. HyperAttention's sampled columns) and
    ``attend(q, k, v, *, params, state, mask_mod, scale) -> Tensor``; ``granularity`` is
    ``"block"``, ``"token"``, ``"cluster"`` or ``"score"``.
    """

    select: Callable[..., Any] | None = None
    attend: Callable[..., Tensor] | None = None
    granularity: str = "block"
    # its decode-time KV selector (``lcpass.kv.Selector``); None: the method has none
    decode: DecodeSelector | None = None
    # its ONNX lowering (None: ``lcpass.export(format="onnx")`` refuses it by name)
    onnx: OnnxLowering | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        names = {p.name for p in self.params}
        bad = [n for n in self.decode_params if n not in names]
        if bad:
            raise ValueError(f"method {self.name!r}: decode selector params {bad} are not among its parameters "
                             f"{sorted(names)}")

    @property
    def decode_params(self) -> tuple[str, ...]:
        """The parameters its decode selector reads (empty: no decode selector)."""
        return self.decode.params if self.decode is not None else ()


def causal_envelope(params: Any, *, head: int, n_heads: int, q_len: int, kv_len: int) -> MaskMod:
    """The mask every dynamic method stays inside (the registry's static view): causal."""
    return causal_mask()


# ----------------------------------------------------------------------------------------------
# pooling and scoring helpers


def _blocks(x: Tensor, block: int) -> tuple[Tensor, int]:
    """``x [B, H, S, D]`` as float ``[B, H, M, block, D]`` (a view when S is a multiple of block;
    zero-padded otherwise) and the padding."""
    B, H, S, D = x.shape
    m = -(-S // block)
    pad = m * block - S
    xf = x.float()
    return (F.pad(xf, (0, 0, 0, pad)) if pad else xf).view(B, H, m, block, D), pad


def block_mean(x: Tensor, block: int) -> Tensor:
    """Per block of ``block`` positions, the mean of ``x [B, H, S, D]`` -> [B, H, M, D] (the short last
    block averages its real positions only). One pass over x, no copy when S % block == 0."""
    xs, pad = _blocks(x, block)
    m = xs.shape[2]
    cnt = torch.full((m,), float(block), device=x.device)
    cnt[-1] = block - pad
    return xs.sum(3) / cnt.view(1, 1, m, 1)


def block_pool(x: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per block of ``block`` positions: (mean, max, min) of ``x [B, H, S, D]`` -> each [B, H, M, D].

    The last block may be short; padding never enters the statistics. Only the mean is needed?
    :func:`block_mean` (a third of the passes).
    """
    xs, pad = _blocks(x, block)
    mean = block_mean(x, block)
    if pad:
        valid = (torch.arange(xs.shape[2] * block, device=x.device) < x.shape[2]).view(1, 1, -1, block, 1)
        mx = xs.masked_fill(~valid, float("-inf")).amax(3)
        mn = xs.masked_fill(~valid, float("inf")).amin(3)
    else:
        mx, mn = xs.amax(3), xs.amin(3)
    return mean, mx, mn


def block_query_scores(q: Tensor, reps: Tensor, block_q: int, how: str = "max") -> Tensor:
    """Scores of key representatives per query block, shared by the G heads of a KV group.

    q [B, Hq, Sq, D], reps [B, Hkv, M, D] -> [B, Hkv, G, Mq, M]: ``q . rep`` reduced over the block's
    queries by ``how`` ("max" = the best query; "mean" = the pooled query).
    """
    B, Hq, Sq, D = q.shape
    Hkv = reps.shape[1]
    G = Hq // Hkv
    mq = -(-Sq // block_q)
    if how == "mean":
        qm = block_mean(q, block_q).view(B, Hkv, G, mq, D)
        return qm @ reps.float()[:, :, None].transpose(-1, -2)
    s = q.float().view(B, Hkv, G, Sq, D) @ reps.float()[:, :, None].transpose(-1, -2)  # [B,Hkv,G,Sq,M]
    pad = mq * block_q - Sq
    if pad:
        s = F.pad(s, (0, 0, 0, pad), value=float("-inf"))
    return s.view(B, Hkv, G, mq, block_q, -1).amax(4)


def local_block_ids(q_len: int, kv_len: int, block_q: int, block_k: int, *,
                    device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """KV blocks holding the first and last query of each query block: two int64 [Mq] on ``device``
    (pass the inputs' device; None = the default device)."""
    mq = -(-q_len // block_q)
    first = torch.arange(mq, device=device) * block_q + (kv_len - q_len)
    last = torch.clamp(first + block_q - 1, max=kv_len - 1)
    return first // block_k, last // block_k


# ----------------------------------------------------------------------------------------------
# execution


def merge_lse(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial softmax results: o [..., D], l [...] (rows without keys: 0 / -inf)."""
    m = torch.maximum(l1, l2)
    m = m.masked_fill(torch.isinf(m), 0.0)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    s = w1 + w2
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    out = o1 * (w1 * inv)[..., None] + o2 * (w2 * inv)[..., None]
    return out, m + torch.log(s)


def attend_lse(q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Tensor | None = None,
               is_causal: bool = False) -> tuple[Tensor, Tensor]:
    """Flash-for-CPU attention returning (out fp32, lse); ``mask`` Bool broadcastable, True = attend.

    q [R, H, M, D], k/v [R, H, N, D]. Rows that see no key give zeros and lse = -inf.
    """
    add = None
    if mask is not None:
        add = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    out, lse = _flash(q, k, v, attn_mask=add, is_causal=is_causal, scale=scale)
    out = out.float()
    if mask is not None:
        seen = mask.any(-1).expand(lse.shape)
        lse = lse.masked_fill(~seen, float("-inf"))
        out = out.masked_fill(~seen[..., None], 0.0)
    return out, lse


def token_attention(q: Tensor, k: Tensor, v: Tensor, sel: TokenSelection, *, scale: float) -> Tensor:
    """Run a :class:`TokenSelection`: gathered selected keys + the causal local block, LSE-merged.

    Two flash-for-CPU calls (unmasked on the gathered keys unless a row has unused slots, ``is_causal``
    on the local block) beat one call with a shared additive mask on this CPU (measured ~1.5x).

    q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> [B, Hq, Sq, D]. Cost ~ Sq * (K + block_q) per head.
    """
    check_qkv(q, k, v, None, "token_attention")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if (sel.q_len, sel.kv_len) != (Sq, Sk) or tuple(sel.indices.shape[:2]) != (B, Hkv):
        raise ValueError(f"token_attention: selection is for B, Hkv, q_len, kv_len = "
                         f"{tuple(sel.indices.shape[:2])}, {sel.q_len}, {sel.kv_len} but q/k give "
                         f"{(B, Hkv)}, {Sq}, {Sk}; select on the same q and k")
    G = Hq // Hkv
    bq = sel.block_q
    mq = sel.indices.shape[2]
    K = sel.indices.shape[3]
    pad = mq * bq - Sq
    off = Sk - Sq
    R, M = B * Hkv * mq, G * bq
    qp = F.pad(q, (0, 0, 0, pad)).view(B, Hkv, G, mq, bq, D).transpose(2, 3).reshape(R, M, D)
    # local causal block: q [R, G, bq, D], k/v [R, G (stride 0), bq, D] (only the last Sq keys copied)
    kl = F.pad(k[:, :, off:], (0, 0, 0, pad)).reshape(R, 1, bq, D).expand(R, G, bq, D)
    vl = F.pad(v[:, :, off:], (0, 0, 0, pad)).reshape(R, 1, bq, D).expand(R, G, bq, D)
    out, lse = _flash(qp.view(R, G, bq, D), kl, vl, is_causal=True, scale=scale)
    out, lse = out.float().reshape(R, M, D), lse.reshape(R, M)
    if K:
        idx = sel.indices.reshape(R, K)
        base = (torch.arange(B * Hkv, device=q.device) * Sk).repeat_interleave(mq)[:, None]
        flat = idx.clamp(min=0) + base  # [R, K]
        kf, vf = k.reshape(-1, D), v.reshape(-1, D)
        step = max(1, _GATHER_BYTES // (2 * K * D * k.element_size()))
        for s in range(0, R, step):
            e = min(R, s + step)
            f = flat[s:e]
            valid = idx[s:e] >= 0
            kg, vg = kf[f].unsqueeze(1), vf[f].unsqueeze(1)  # [r, 1, K, D]
            # host sync on CPU only: an all-valid chunk takes the faster unmasked kernel there; other
            # devices always pass the (cheap) mask instead of waiting for the answer
            dense = q.device.type == "cpu" and bool(valid.all())
            mask = None if dense else valid[:, None, None, :]
            o2, l2 = attend_lse(qp[s:e].unsqueeze(1), kg, vg, scale=scale, mask=mask)
            o, l = merge_lse(out[s:e], lse[s:e], o2.reshape(e - s, M, D), l2.reshape(e - s, M))
            out[s:e], lse[s:e] = o, l
    res = out.view(B, Hkv, mq, G, bq, D).transpose(2, 3).reshape(B, Hq, mq * bq, D)
    return res[:, :, :Sq].to(q.dtype)


def selection_mask(sel: Selection, n_heads: int) -> Tensor:
    """Dense element mask ``Bool[B|1, Hq, Sq, Sk]`` of a selection (the test oracle)."""
    if isinstance(sel, BlockLayout):
        return sel.to_dense()
    return sel.to_dense(n_heads)


def run_selection(q: Tensor, k: Tensor, v: Tensor, sel: Selection, *, scale: float,
                  score_mod: ScoreMod | None = None, dense_below: int | None = None) -> Tensor:
    """Attention restricted to ``sel``: the block engine for layouts, :func:`token_attention` for
    token selections. ``dense_below`` is passed to :func:`lcpass.engine.sparse_attention` (None =
    its default). With ``score_mod`` a token selection runs the dense math path (exact, slow)."""
    if isinstance(sel, BlockLayout):
        kw = {} if dense_below is None else {"dense_below": dense_below}
        return sparse_attention(q, k, v, sel, scale=scale, score_mod=score_mod, **kw)
    if score_mod is not None:
        return dense_attention(q, k, v, scale=scale, attn_mask=sel.to_dense(q.shape[1]),
                               score_mod=score_mod)
    return token_attention(q, k, v, sel, scale=scale)


def check_causal(mask_mod: MaskMod | None, owner: str) -> MaskMod:
    """Dynamic selectors work inside the causal envelope; refuse other masks by name."""
    if mask_mod is None:
        return causal_mask()
    if mask_mod != causal_mask():
        raise ValueError(f"{owner}: mask_mod={mask_mod!r} is not supported; dynamic methods select "
                         f"inside the causal mask (pass causal_mask() or None)")
    return mask_mod


def attend_by(select: Callable[..., Selection]) -> Callable[..., Tensor]:
    """The ``attend`` of a pure selection method: ``run_selection(select(...))``."""
    def attend(q: Tensor, k: Tensor, v: Tensor, *, params: dict, state: dict | None,
               mask_mod: MaskMod | None, scale: float) -> Tensor:
        sel = select(q, k, params=params, state=state, mask_mod=mask_mod)
        return run_selection(q, k, v, sel, scale=scale)
    attend.__name__ = f"attend_{select.__name__}"
    attend.__doc__ = f"Attention restricted to the selection of :func:`{select.__name__}`."
    return attend
