"""S2-Attention: heads share the context in strided shards, plus a dense local band.

Paper: Lin, Lin, Zhang, Sun, Zhang, Chen, Xu, Fan, Xiong, Peng, Jiang, Dong, "S2-Attention:
Hardware-Aware Context Sharding Among Attention Heads", arXiv 2024. Keys are grouped in blocks of
``block_size`` tokens. Head h sees (a) the ``local_blocks`` most recent key blocks and (b) every
``vert_stride``-th older block, at a head-dependent offset, so the union over heads covers every block
of the context (each head reads 1/vert_stride of the remote context, the heads together read it all):

    kb = kv // block_size, qb = q // block_size
    allowed(h, q, kv) = kv <= q  and  (qb - kb < local_blocks  or  (kb + h + 1) % vert_stride == 0)

This is the layout of the authors' DKernel (heterogeneous heads, head sliding step 1). Coverage needs
``n_heads >= vert_stride``; a site with fewer heads is refused.

Parameters (the implementation's names): ``block_size``, ``local_blocks``, ``vert_stride``.

Example:
    >>> from lcpass.methods import get_method
    >>> m = get_method("s2").mask_mod({"block_size": 4, "local_blocks": 1, "vert_stride": 2},
    ...                                head=1, n_heads=2, q_len=16, kv_len=16)
    >>> m.__name__
    's2_b4_l1_v2_o1'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lcpass import masks as M
from lcpass.methods.base import KVPolicy, Method, Param


def block_local_mask(block_size: int, local_blocks: int) -> M.MaskMod:
    """Key block within `local_blocks` of the query block: ``q // bs - kv // bs < local_blocks``.

    Not causal by itself. Carries an exact block classifier (block indices of a rectangle of
    positions take every value in their ranges independently).
    """

    def fn(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (q // block_size - kv // block_size < local_blocks) & _true_like(b, h)

    def classify(h, q_lo, q_hi, kv_lo, kv_hi):
        lo = q_lo // block_size - (kv_hi - 1) // block_size  # smallest qb - kb on the tile
        hi = (q_hi - 1) // block_size - kv_lo // block_size  # largest
        touched = (lo < local_blocks) & _true_like(h)
        return touched, hi < local_blocks, _true_like(h, touched)

    key = ("s2_block_local", block_size, local_blocks)
    return M.MaskMod(f"block_local({block_size}, {local_blocks})", key, fn, classify)


def block_strided_mask(block_size: int, vert_stride: int, offset: int) -> M.MaskMod:
    """Every `vert_stride`-th key block: ``(kv // bs + offset + 1) % vert_stride == 0`` (any query).

    Carries an exact block classifier.
    """
    target = (-(offset + 1)) % vert_stride  # key blocks kb with kb % vert_stride == target

    def fn(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (torch.remainder(kv // block_size, vert_stride) == target) & _true_like(b, h, q)

    def classify(h, q_lo, q_hi, kv_lo, kv_hi):
        kb0, kb1 = kv_lo // block_size, (kv_hi - 1) // block_size
        first = kb0 + torch.remainder(target - kb0, vert_stride)  # first wanted block >= kb0
        touched = (first <= kb1) & _true_like(h, q_lo, q_hi)
        full = touched & ((kb0 == kb1) | (vert_stride == 1))
        return touched, full, _true_like(touched)

    key = ("s2_block_strided", block_size, vert_stride, offset)
    return M.MaskMod(f"block_strided({block_size}, {vert_stride}, {offset})", key, fn, classify)


def _true_like(*ts: torch.Tensor) -> torch.Tensor:
    shape = torch.broadcast_shapes(*(t.shape for t in ts))
    return torch.ones(shape, dtype=torch.bool, device=ts[0].device)


def s2_shard_mask(block_size: int, local_blocks: int, vert_stride: int, offset: int) -> M.MaskMod:
    """The S2 mask of one head (`offset` = the head's shard offset, 0 <= offset < vert_stride):
    ``causal & (block_local | block_strided)``, with exact block classifiers so layouts cost
    O(blocks). Equal parameters give equal (hashable) masks, so layouts are cached.
    """
    m = M.and_masks(
        M.causal_mask(),
        M.or_masks(
            block_local_mask(block_size, local_blocks),
            block_strided_mask(block_size, vert_stride, offset),
        ),
    )
    m.__name__ = f"s2_b{block_size}_l{local_blocks}_v{vert_stride}_o{offset}"
    return m


def s2_mask_mod(params: Mapping[str, Any], *, head: int, n_heads: int, q_len: int, kv_len: int) -> Any:
    """Head `head`'s shard plus the local band; refuses sites with n_heads < vert_stride."""
    if n_heads < params["vert_stride"]:
        raise ValueError(
            f"s2: vert_stride={params['vert_stride']} exceeds the site's {n_heads} heads, so the heads' "
            f"shards cannot cover the context; use vert_stride <= {n_heads}"
        )
    stride = params["vert_stride"]
    return s2_shard_mask(params["block_size"], params["local_blocks"], stride, head % stride)


def s2_kv(params: Mapping[str, Any], *, kv_len: int) -> KVPolicy:
    """Every block is read by some head, so the cache keeps everything."""
    return KVPolicy.all()


S2 = Method(
    name="s2",
    paper="S2-Attention: Hardware-Aware Context Sharding Among Attention Heads (arXiv 2024)",
    summary="Per head: local band of blocks + every vert_stride-th block at a head offset; heads cover all.",
    params=(
        Param("block_size", "int", 64, 1, None, "tokens per sharding block"),
        Param("local_blocks", "int", 16, 1, None, "most recent key blocks every head sees"),
        Param("vert_stride", "int", 8, 1, None, "each head sees every vert_stride-th remote block"),
    ),
    kind="static",
    phases=frozenset({"prefill", "decode"}),
    needs_calibration=False,
    crossover=4096,
    crossover_why=(
        "the default 16-block (1024-token) local band plus 1/8 of the remote blocks skips under 30% "
        "of a causal prefill until ~4096 tokens"
    ),
    mask_mod=s2_mask_mod,
    kv_policy=s2_kv,
    per_head=True,
)
