"""LongLoRA's shifted sparse attention (S²-Attn), for long-context fine-tuning.

Paper: Chen, Qian, Tang, Lai, Liu, Han, Jia, "LongLoRA: Efficient Fine-tuning of Long-Context Large
Language Models", ICLR 2024. The sequence is split into groups of ``group_size`` (G) tokens and attention
runs inside each group; the second half of the heads is shifted by G/2 so information flows between
neighbouring groups. The paper's implementation: roll the shifted heads by -G/2, reshape into groups,
attend per group, roll back. Inference afterwards uses full attention.

One deliberate difference: the paper's roll puts the first G/2 tokens and the last G/2 tokens of a
shifted head into one (wrapped) group, which under a causal mask applied in rolled order lets the first
tokens see the last ones (a future leak). Here that wrapped group is split back into its two halves,
so the shifted heads' groups are exactly ``(pos - G/2) // G`` — the same partition
``block_diagonal_mask`` expresses — and the efficient path and the mask_mod agree, gradients included.
Lengths that are not a multiple of G are padded at the end (padded keys are never attended).

Parameters: ``group_size`` (G, the paper uses 1/4 of the training length), ``causal``.

Example:
    >>> import torch
    >>> q = k = v = torch.randn(1, 4, 10, 8)
    >>> shifted_sparse_attention(q, k, v, group_size=4, scale=8 ** -0.5).shape
    torch.Size([1, 4, 10, 8])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lcpass import masks as M
from lcpass.methods.base import KVPolicy, Method, Param


def shifted_heads_start(n_heads: int) -> int:
    """Index of the first shifted head: the paper shifts the second ``chunk(2)`` of the heads."""
    return (n_heads + 1) // 2


def head_shift(group_size: int, head: int, n_heads: int) -> int:
    """G // 2 for the shifted half of the heads, 0 for the others."""
    return group_size // 2 if head >= shifted_heads_start(n_heads) else 0


def shifted_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """S²-Attn the way the paper computes it: roll, group, attend per group, roll back.

    q: [B, H, N, D]; k, v: [B, Hkv, N, D] with Hkv dividing H (expanded to H heads for the shift).
    Cost O(N * G) instead of O(N^2). Differentiable (plain torch ops). Returns [B, H, N, D].
    """
    bsz, n_heads, seq, dim = q.shape
    if k.shape[2] != seq:
        raise ValueError(f"shifted_sparse_attention is for training: q has {seq} tokens, k has {k.shape[2]}")
    if n_heads % k.shape[1]:
        raise ValueError(f"shifted_sparse_attention: {k.shape[1]} KV heads do not divide {n_heads} heads")
    if group_size < 2:
        raise ValueError(f"shifted_sparse_attention: group_size={group_size} must be >= 2")
    rep = n_heads // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    g = group_size
    s = g // 2
    h0 = shifted_heads_start(n_heads)
    pad = (-seq) % g
    padded = seq + pad
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))

    def roll(t: torch.Tensor, amount: int) -> torch.Tensor:
        return torch.cat([t[:, :h0], t[:, h0:].roll(amount, dims=2)], dim=1)

    n_groups = padded // g
    qg, kg, vg = (roll(t, -s).reshape(bsz, n_heads, n_groups, g, dim) for t in (q, k, v))
    # original position of every rolled slot, per head: [H, n_groups, G]
    idx = torch.arange(padded, device=q.device)
    shifts = torch.tensor([head_shift(g, h, n_heads) for h in range(n_heads)], device=q.device)
    pos = torch.remainder(idx[None, :] + shifts[:, None], padded).view(n_heads, n_groups, g)
    group_id = torch.div(pos - shifts[:, None, None], g, rounding_mode="floor")
    allowed = group_id[..., :, None] == group_id[..., None, :]  # [H, nG, G, G]; splits the wrapped group
    allowed &= (pos < seq)[..., None, :]  # padded keys are never attended
    if causal:
        allowed &= pos[..., None, :] <= pos[..., :, None]
    allowed |= torch.eye(g, dtype=torch.bool, device=q.device)  # padded queries see themselves: no NaN
    scores = (qg @ kg.transpose(-1, -2)) * scale  # [B, H, nG, G, G]
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(vg.dtype) @ vg  # [B, H, nG, G, D]
    out = roll(out.reshape(bsz, n_heads, padded, dim), s)
    return out[:, :, :seq]


def longlora_mask_mod(params: Mapping[str, Any], *, head: int, n_heads: int, q_len: int, kv_len: int) -> Any:
    """Same group (groups shifted by G/2 on the second half of the heads), and causal if asked."""
    g = params["group_size"]
    # block_diagonal_mask groups by (pos + shift) // g; (pos + g - s) // g == (pos - s) // g + 1 is the
    # same partition as the rolled one, (pos - s) // g
    groups = M.block_diagonal_mask(g, (g - head_shift(g, head, n_heads)) % g)
    return M.and_masks(M.causal_mask(), groups) if params["causal"] else groups


def longlora_kv(params: Mapping[str, Any], *, kv_len: int) -> KVPolicy:
    """A fine-tuning method: nothing is evicted (inference uses full attention)."""
    return KVPolicy.all()


LONGLORA = Method(
    name="longlora",
    paper="LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models (ICLR 2024), S²-Attn",
    summary="Attention within groups of G tokens; half the heads' groups shifted by G/2. For fine-tuning.",
    params=(
        Param("group_size", "int", 2048, 2, None, "G: tokens per group"),
        Param("causal", "bool", True, None, None, "causal mask inside each group"),
    ),
    kind="static",
    phases=frozenset({"prefill"}),
    needs_calibration=False,
    crossover=4096,
    crossover_why="with the default G = 2048, fewer than two groups means nothing is skipped",
    mask_mod=longlora_mask_mod,
    kv_policy=longlora_kv,
    per_head=True,
)
