"""Token-granular attention with generated kernels: gather the selected keys inside the kernel.

Block layouts (:mod:`lcpass.codegen.api`) cannot express TokenSelection-style selections (K tokens per
KV head, anywhere in the past). The same two templates run them with ``layout="token"``, and a
two-pass scoring template (``token_scores.jinja``) computes TokenSelect's soft vote:

* prefill (``attn_fwd.jinja``): per (batch, query head, query tile) the program reads the token list
  of its (batch, KV head, query block) - ``num [B, Hkv, Mq]`` used slots, ``idx [B, Hkv, Mq, K]``
  absolute key positions (-1 = unused) - gathers BLOCK_N keys and values per step by index, then (with
  ``local=True``) the query block's own keys as contiguous causal tiles; one online softmax over both.
* decode (``attn_decode.jinja``): split-KV over one list per (batch, KV head), the G query heads of
  the group (x Sq queries) packed into the rows of one tile, splits merged by log-sum-exp.

Entry points (q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D]``, queries at absolute ``Sk - Sq + i``)::

    token_attention(q, k, v, indices, *, block_q, scale, local=True) -> Tensor      # prefill
    token_decode_attention(q, k, v, indices, *, scale, n_splits=None) -> Tensor     # decode
    gather_decode(q, k, v, pos, idx, scale) -> Tensor   # drop-in for lcpass.kv.select.gather_attend
    token_scores(q, k, *, scale, kv_keep=None) -> Tensor  # TokenSelect's soft vote [B, Hkv, Sk]
    selection_attention(q, k, v, sel, *, scale) -> Tensor  # TokenSelection | BlockLayout, fallback

>>> from lcpass.methods.dynamic import tokenselect_select                       # doctest: +SKIP
>>> sel = tokenselect_select(q, k, params=p, state=None, mask_mod=None)         # doctest: +SKIP
>>> out = token_attention(q, k, v, sel.indices, block_q=sel.block_q, scale=D ** -0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from lcpass.codegen import launch
from lcpass.codegen.api import (PreparedAttention, ScoreMod, _all_tables, _backend_ok, _check_inputs,
                                _check_keep, _dtype_name, _spec, attention_or_fallback, choose_tiles)
from lcpass.codegen.cache import load_kernel
from lcpass.codegen.headdim import common_head_dim
from lcpass.codegen.printer import UnsupportedSpec
from lcpass.codegen.spec import KernelSpec
from lcpass.layout import BlockLayout
from lcpass.masks import MaskMod, causal_mask

__all__ = ["token_lists", "token_attention", "token_decode_attention", "gather_decode",
           "token_scores", "selection_attention", "prepare_token_attention", "prepare_token_decode"]

_I32_MAX = torch.iinfo(torch.int32).max
_KEYS: dict[tuple, str] = {}


def token_lists(indices: Tensor) -> tuple[Tensor, Tensor]:
    """``(num int32 [...], idx int32 [..., K])`` from a padded index list ``[..., K]`` (-1 = unused):
    used slots first in ascending position order (gathers walk memory forward), -1 after them,
    duplicates dropped (a selection is a set of keys); ``num`` counts the used slots. Torch ops
    only (no host sync), on the indices' device.

    >>> token_lists(torch.tensor([[5, -1, 2, 9, 5]]))
    (tensor([3], dtype=torch.int32), tensor([[ 2,  5,  9, -1, -1]], dtype=torch.int32))
    """
    if indices.shape[-1] == 0:  # keep one (unused) slot: kernels take no empty pointers
        indices = indices.new_full((*indices.shape[:-1], 1), -1)
    idx = indices.to(torch.int32)
    srt = torch.sort(torch.where(idx < 0, _I32_MAX, idx), dim=-1).values
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[..., 1:] = srt[..., 1:] == srt[..., :-1]
    srt = torch.sort(srt.masked_fill(dup, _I32_MAX), dim=-1).values
    used = srt != _I32_MAX
    return used.sum(-1).to(torch.int32).contiguous(), torch.where(used, srt, -1).contiguous()


def _key(template: str, head_dim: int, group: int, dtype: torch.dtype, sparse: tuple[int, int],
         mask_mod: Any, score_mod: Any, tiles: tuple[int, int], options: tuple) -> str:
    memo = (template, head_dim, group, dtype, sparse, mask_mod, score_mod, tiles, options)
    key = _KEYS.get(memo)
    if key is None:
        spec = _spec(template, head_dim, group, dtype, sparse, mask_mod, score_mod, layout="token",
                     tiles=tiles, options=options)
        key = _KEYS[memo] = load_kernel(spec).SPEC_KEY
    return key


def _dummies(device: torch.device, dims: tuple[int, ...]) -> tuple[Tensor, ...]:
    return tuple(torch.zeros((1,) * d, dtype=torch.int32, device=device) for d in dims)


# ------------------------------------------------------------------------------------------------
# prefill


def prepare_token_attention(indices: Tensor, *, block_q: int, head_dim: int, n_heads: int,
                            n_kv_heads: int, dtype: torch.dtype, device: torch.device | str,
                            scale: float, local: bool = True, mask_mod: MaskMod | None = None,
                            score_mod: ScoreMod | None = None,
                            tiles: tuple[int, int] | None = None) -> PreparedAttention:
    """Resolve the token-gather prefill kernel for ``indices [B, Hkv, Mq, K]`` (query blocks of
    ``block_q``); the result is called as ``prep(q, k, v, kv_keep=None)``.

    ``local=True``: each query block also attends its own keys causally, and the listed keys lie
    before the block (TokenSelection's contract), so gathered tiles need no mask predicate when
    ``mask_mod`` is causal (the default). ``local=False``: only the listed keys, the mask predicate
    (causal by default: keys after the query are dropped) on every gathered tile."""
    device = torch.device(device)
    _backend_ok(device)
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"prepare_token_attention: n_kv_heads={n_kv_heads} must divide "
                         f"n_heads={n_heads}")
    if block_q % 16:
        raise UnsupportedSpec(f"token prefill: block_q={block_q} has no power-of-two query tile >= 16 "
                              f"dividing it; select with a block size that is a multiple of 16 "
                              f"(e.g. 64 or 128)")
    mm = causal_mask() if mask_mod is None else mask_mod
    mask_tokens = not (local and mm == causal_mask())
    bm, bn = tiles or choose_tiles(head_dim, dtype, block_q, 128)
    key = _key("attn_fwd", head_dim, n_heads // n_kv_heads, dtype, (block_q, bn), mm, score_mod,
               (bm, bn), (("local", bool(local)), ("mask_tokens", mask_tokens)))
    num, idx = token_lists(indices.to(device))
    lists = (num, idx, *_dummies(device, (3, 4)))
    return PreparedAttention(key, "", lists, tuple(_all_tables(mm, score_mod, device)), float(scale))


@common_head_dim
def token_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, block_q: int, scale: float,
                    local: bool = True, mask_mod: MaskMod | None = None,
                    score_mod: ScoreMod | None = None, kv_keep: Tensor | None = None,
                    tiles: tuple[int, int] | None = None) -> Tensor:
    """Prefill attention over per-(batch, KV head, query block) token lists, generated kernel.

    ``indices: int[B, Hkv, ceil(Sq / block_q), K]`` absolute key positions (-1 = unused, any order);
    ``block_q`` a power-of-two multiple of 16 (the kernel's query tile divides it); see
    :func:`prepare_token_attention` for ``local`` and ``mask_mod``. ``kv_keep: Bool[B, Sk]`` masks
    padded keys. Rows that see no key return zeros. Not differentiable (UnsupportedSpec).

    >>> out = token_attention(q, k, v, sel.indices, block_q=128, scale=0.088)   # doctest: +SKIP
    """
    _check_inputs(q, k, v, "codegen.token_attention")
    _check_keep(kv_keep, q, k, "codegen.token_attention")
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    mq = -(-Sq // block_q)
    if indices.dim() != 4 or tuple(indices.shape[:3]) not in ((B, Hkv, mq), (1, Hkv, mq)):
        raise ValueError(f"codegen.token_attention: indices has shape {tuple(indices.shape)}; "
                         f"expected [B={B}|1, Hkv={Hkv}, Mq={mq}, K] for Sq={Sq}, block_q={block_q}")
    prep = prepare_token_attention(indices, block_q=block_q, head_dim=D, n_heads=Hq, n_kv_heads=Hkv,
                                   dtype=q.dtype, device=q.device, scale=scale, local=local,
                                   mask_mod=mask_mod, score_mod=score_mod, tiles=tiles)
    return prep(q, k, v, kv_keep)


# ------------------------------------------------------------------------------------------------
# decode


def prepare_token_decode(indices: Tensor, *, q_len: int, head_dim: int, n_heads: int,
                         n_kv_heads: int, dtype: torch.dtype, device: torch.device | str,
                         scale: float, mask_mod: MaskMod | None = None,
                         score_mod: ScoreMod | None = None, n_splits: int | None = None,
                         block_n: int | None = None) -> PreparedAttention:
    """Resolve the split-KV token-gather decode kernel for ``indices [B, Hkv, K]`` and ``q_len``
    queries per head (``G * q_len <= 128`` rows in one tile). The mask predicate (causal by
    default) runs on gathered tiles unless every listed key is visible (causal with ``q_len == 1``)."""
    device = torch.device(device)
    _backend_ok(device)
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"prepare_token_decode: n_kv_heads={n_kv_heads} must divide "
                         f"n_heads={n_heads}")
    G = n_heads // n_kv_heads
    rows = G * q_len
    if rows > 128:
        raise UnsupportedSpec(f"token decode: G * Sq = {G} * {q_len} = {rows} query rows exceed one "
                              f"128-row tile; use codegen.token_attention for this many queries")
    mm = causal_mask() if mask_mod is None else mask_mod
    mask_tokens = not (q_len == 1 and mm == causal_mask())
    bm = max(16, 1 << (rows - 1).bit_length())
    bn = block_n or choose_tiles(head_dim, dtype, bm, 128, kind="decode")[1]
    key = _key("attn_decode", head_dim, G, dtype, (bm, bn), mm, score_mod, (bm, bn),
               (("mask_tokens", mask_tokens),))
    if indices.dim() == 4:
        indices = indices[:, :, 0]
    num, idx = token_lists(indices.to(device))
    lists = (num, idx, *_dummies(device, (2, 3, 3, 3)))
    splits = n_splits or launch.decode_splits(idx.shape[0], n_kv_heads, -(-idx.shape[-1] // bn))
    return PreparedAttention(key, "", lists, tuple(_all_tables(mm, score_mod, device)), float(scale),
                             decode=True, n_splits=int(splits))


@common_head_dim
def token_decode_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, scale: float,
                           mask_mod: MaskMod | None = None, score_mod: ScoreMod | None = None,
                           n_splits: int | None = None, block_n: int | None = None,
                           kv_keep: Tensor | None = None) -> Tensor:
    """Split-KV decode over per-(batch, KV head) token lists, generated kernel: grid
    ``(B, Hkv, n_splits)``, the group's ``G * Sq`` query rows packed into one tile, BLOCK_N gathered
    keys per step, splits merged by log-sum-exp.

    ``indices: int[B, Hkv, K]`` (or ``[B, Hkv, 1, K]``) absolute key positions, -1 = unused; only
    they are attended (append the newest positions yourself). ``kv_keep: Bool[B, Sk]`` masks empty
    slots. Rows that see no key return zeros.

    >>> out = token_decode_attention(q[:, :, -1:], k, v, idx, scale=0.088)   # doctest: +SKIP
    """
    _check_inputs(q, k, v, "codegen.token_decode_attention")
    _check_keep(kv_keep, q, k, "codegen.token_decode_attention")
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    lead = tuple(indices.shape[:2])
    if indices.dim() not in (3, 4) or lead not in ((B, Hkv), (1, Hkv)) or (
            indices.dim() == 4 and indices.shape[2] != 1):
        raise ValueError(f"codegen.token_decode_attention: indices has shape "
                         f"{tuple(indices.shape)}; expected [B={B}|1, Hkv={Hkv}, K]")
    prep = prepare_token_decode(indices, q_len=Sq, head_dim=D, n_heads=Hq, n_kv_heads=Hkv,
                                dtype=q.dtype, device=q.device, scale=scale, mask_mod=mask_mod,
                                score_mod=score_mod, n_splits=n_splits, block_n=block_n)
    return prep(q, k, v, kv_keep)


@common_head_dim
def gather_decode(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, idx: Tensor, scale: float, *,
                  n_splits: int | None = None, block_n: int | None = None) -> Tensor:
    """Drop-in for :func:`lcpass.kv.select.gather_attend` on the generated decode kernel.

    q ``[B, h, G, D]`` (the G query heads of each of the group's h KV heads), k/v ``[B, h, L, D]``
    cache slots, pos ``[B, L]`` (-1 = empty slot), idx ``[B, h, K]`` slot indices (-1 = unused).
    Attends the listed, non-empty slots only; returns ``[B, h, G, D]`` (zeros for rows without a
    slot). The kernel gathers the slots itself: nothing is copied, no host sync.

    >>> out = gather_decode(q, group.keys, group.values, group.pos, idx, scale)   # doctest: +SKIP
    """
    B, h, G, D = q.shape
    qq = q.reshape(B, h * G, 1, D)  # query head hkv * G + g: the layout the kernels index
    out = token_decode_attention(qq, k, v, idx, scale=scale, n_splits=n_splits, block_n=block_n,
                                 kv_keep=pos >= 0)
    return out.view(B, h, G, D)


# ------------------------------------------------------------------------------------------------
# scoring


def token_scores(q: Tensor, k: Tensor, *, scale: float, kv_keep: Tensor | None = None,
                 n_splits: int | None = None, block_n: int | None = None) -> Tensor:
    """TokenSelect's soft vote with a generated two-pass kernel: ``[B, Hkv, Sk]`` fp32, for each KV
    head the per-row softmax over all keys of ``scale * q . k`` summed over the group's ``G * Sq``
    query rows (``<= 128``). ``kv_keep: Bool[B, Sk]`` gives empty slots probability 0; rows without
    a key contribute nothing. Feed it to ``torch.topk`` (with sinks / recent forced) for the list.

    For the KV cache (q ``[B, h, G, D]``, slots ``pos [B, L]``)::

        token_scores(q.reshape(B, h * G, 1, D), keys, scale=s, kv_keep=pos >= 0)
        # == lcpass.kv.select._head_probs(q, keys, (pos >= 0)[:, None, None, :], s)
    """
    _check_keep(kv_keep, q, k, "codegen.token_scores")
    _backend_ok(q.device)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or Hkv < 1 or Hq % Hkv or q.dtype != k.dtype:
        raise ValueError(f"codegen.token_scores: q {tuple(q.shape)} {q.dtype} and k "
                         f"{tuple(k.shape)} {k.dtype} disagree (batch, head_dim, dtype, or Hkv "
                         f"not dividing Hq)")
    rows = (Hq // Hkv) * Sq
    if rows > 128:
        raise UnsupportedSpec(f"token_scores: G * Sq = {rows} query rows exceed one 128-row tile")
    bm = max(16, 1 << (rows - 1).bit_length())
    bn = block_n or 64
    spec = KernelSpec("token_scores", D, bm, bn, bm, bn, group=Hq // Hkv, dtype=_dtype_name(q.dtype))
    mod = load_kernel(spec)
    splits = n_splits or launch.decode_splits(B, Hkv, -(-Sk // bn))
    return launch.token_scores(mod, q, k, scale, int(splits), kv_keep=kv_keep)


# ------------------------------------------------------------------------------------------------
# selections (the lowering's entry point)


def selection_attention(q: Tensor, k: Tensor, v: Tensor, sel: Any, *, scale: float,
                        score_mod: ScoreMod | None = None) -> Tensor:
    """Attention restricted to a dynamic method's selection on the generated kernels.

    ``sel``: a :class:`~lcpass.layout.BlockLayout` (block-sparse kernels) or a
    :class:`~lcpass.methods.dynamic.TokenSelection` (token kernels: a one-query-block selection with
    ``G * Sq <= 128`` rows runs split-KV decode over the listed keys plus the block's own, else the
    prefill kernel). On :class:`UnsupportedSpec` (head_dim, block_q not a power-of-two multiple of
    16, inputs requiring grad) warns and returns the CPU path's result
    (:func:`lcpass.methods.dynamic.run_selection`)."""
    if isinstance(sel, BlockLayout):
        return attention_or_fallback(q, k, v, sel, scale=scale, mask_mod=sel.mask_mod,
                                     score_mod=score_mod)
    try:
        B, Hq, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if grad:
            raise UnsupportedSpec("the token kernels have no backward; inputs require grad")
        ind = sel.indices.to(q.device)
        if ind.shape[2] == 1 and Sq < Sk and (Hq // Hkv) * Sq <= 128:
            # decode: the listed keys and the block's own keys (causal) in one list
            loc = torch.arange(Sk - Sq, Sk, device=q.device).expand(ind.shape[0], Hkv, Sq)
            return token_decode_attention(q, k, v, torch.cat([ind[:, :, 0], loc], -1), scale=scale,
                                          score_mod=score_mod)
        return token_attention(q, k, v, ind, block_q=sel.block_q, scale=scale, score_mod=score_mod)
    except UnsupportedSpec as exc:
        warnings.warn(f"lcpass.codegen: falling back to the CPU token path: {exc}", stacklevel=2)
        from lcpass.methods.dynamic import run_selection  # lazy: lcpass.methods.dynamic.decode imports this module

        return run_selection(q, k, v, sel, scale=scale, score_mod=score_mod)
