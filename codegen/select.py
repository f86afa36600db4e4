"""Dynamic selection kernels: score key blocks against (pooled) queries, keep the top k, emit the
padded-CSR layout the attention kernels read.

Two generated kernels (template ``block_scores.jinja``): ``key_stats`` reduces every key block to its
element-wise min, max and mean key; ``block_scores`` pools each query block by its mean and scores
every key block, either with Quest's bound ``sum_d max(q_d kmin_d, q_d kmax_d)`` (``kind="quest"``)
or the mean-pooled dot product ``q . kmean`` (``kind="mean"``). ``torch.topk`` then keeps the best
``k_blocks`` per (batch, head, query block) among the blocks ``mask_mod`` touches
(:func:`lcpass.layout.layout_from_topk`).

>>> lay = select_layout(q, k, k_blocks=8, mask_mod=causal_mask(), block_size=64)   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lcpass.codegen import launch
from lcpass.codegen.api import _backend_ok, _dtype_name
from lcpass.codegen.cache import load_kernel
from lcpass.codegen.spec import KernelSpec
from lcpass.layout import DEFAULT_BLOCK_SIZE, BlockLayout, layout_from_topk
from lcpass.masks import MaskMod, causal_mask

__all__ = ["SCORE_KINDS", "block_scores", "select_layout", "reference_block_scores"]

SCORE_KINDS = ("quest", "mean")


def _bs(block_size: int | tuple[int, int]) -> tuple[int, int]:
    return (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)  # type: ignore


def block_scores(q: Tensor, k: Tensor, *, block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
                 kind: Literal["quest", "mean"] = "quest", scale: float | None = None) -> Tensor:
    """Scores ``[B, Hq, Mq, Mk]`` (fp32) of every key block for every query block, generated kernels.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``; ``block_size`` = (query, key) selection block.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"block_scores: kind={kind!r}; use one of {SCORE_KINDS}")
    _backend_ok(q.device)
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"block_scores: q {tuple(q.shape)} and k {tuple(k.shape)} disagree "
                         f"(batch, head_dim, or Hkv not dividing Hq)")
    bq, bk = _bs(block_size)
    spec = KernelSpec("block_scores", D, 16, 16, bq, bk, group=Hq // Hkv, dtype=_dtype_name(q.dtype),
                      options=(("score_kind", kind),))
    mod = load_kernel(spec)
    stats = launch.key_stats(mod, k, bk)
    return launch.block_scores(mod, q, stats, Hkv, D ** -0.5 if scale is None else scale)


def reference_block_scores(q: Tensor, k: Tensor, *, block_size: int | tuple[int, int],
                           kind: str = "quest", scale: float | None = None) -> Tensor:
    """The same scores in plain PyTorch (the test oracle)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    bq, bk = _bs(block_size)
    mq, mk = -(-Sq // bq), -(-Sk // bk)
    scale = D ** -0.5 if scale is None else scale
    qp = torch.nn.functional.pad(q.float(), (0, 0, 0, mq * bq - Sq))
    cnt = torch.clamp(Sq - torch.arange(mq) * bq, max=bq).to(q.device).view(1, 1, mq, 1)
    qbar = qp.view(B, Hq, mq, bq, D).sum(3) / cnt * scale  # [B, Hq, Mq, D]
    kf = k.float()
    pad = mk * bk - Sk
    pad_k = torch.nn.functional.pad
    kmin = pad_k(kf, (0, 0, 0, pad), value=float("inf")).view(B, Hkv, mk, bk, D).amin(3)
    kmax = pad_k(kf, (0, 0, 0, pad), value=float("-inf")).view(B, Hkv, mk, bk, D).amax(3)
    kcnt = torch.clamp(Sk - torch.arange(mk) * bk, max=bk).to(k.device).view(1, 1, mk, 1)
    kmean = torch.nn.functional.pad(kf, (0, 0, 0, pad)).view(B, Hkv, mk, bk, D).sum(3) / kcnt
    G = Hq // Hkv
    kmin, kmax, kmean = (t.repeat_interleave(G, 1) for t in (kmin, kmax, kmean))
    if kind == "quest":
        qe = qbar[:, :, :, None, :]
        return torch.maximum(qe * kmin[:, :, None], qe * kmax[:, :, None]).sum(-1)
    return qbar @ kmean.transpose(-1, -2)


def select_layout(q: Tensor, k: Tensor, *, k_blocks: int, mask_mod: MaskMod | None = None,
                  block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
                  kind: Literal["quest", "mean"] = "quest", scale: float | None = None) -> BlockLayout:
    """Top-``k_blocks`` key blocks per (batch, head, query block) by generated block scores, as a
    :class:`~lcpass.layout.BlockLayout` restricted to what ``mask_mod`` (default causal) touches."""
    mm = mask_mod if mask_mod is not None else causal_mask()
    scores = block_scores(q, k, block_size=block_size, kind=kind, scale=scale)
    # on the scores' device: no transfer, no host sync
    return layout_from_topk(scores, k_blocks, q_len=q.shape[2], kv_len=k.shape[2], mask_mod=mm,
                            block_size=_bs(block_size))
