"""The canonical attention op: every attention site lcpass finds becomes one call of
``torch.ops.lcpass.attention``.

Its named arguments are all that later stages (plan, lower, verify) read:

    q            [B, Hq, Sq, D]      queries
    k            [B, Hkv, Sk, D]     keys, Hkv divides Hq (repeat_kv / enable_gqa folded away)
    v            [B, Hkv, Sk, Dv]    values
    mask         optional, broadcastable to [B, Hq, Sq, Sk]: bool (True = attend) or float
                 (added to the scores); kept only when it carries information (padding, a learned
                 bias such as T5's, a pattern lcpass could not name)
    scale        float multiplying q·kᵀ
    is_causal    bool; causal is *bottom-right* aligned: query i of Sq sits at absolute position
                 Sk - Sq + i, so decode (Sq = 1) sees every key
    window       int, -1 for none; with is_causal, each query sees the ``window`` most recent keys
                 including itself (kv_idx > q_idx - window, Hugging Face ``sliding_window``)
    softcap      float, 0.0 for none; scores <- softcap * tanh(scores / softcap) before the mask
    dropout_p    float; dropout on the probabilities (applied only when > 0)
    site         provenance: the layer name from ``nn_module_stack`` (e.g. ``model.layers.0.self_attn``)
    source       provenance: the source form (``sdpa``, ``eager-softmax``, ``einsum``, ``baddbmm`` ...)
    sinks        optional, broadcastable to [B, Hq, Sq, 1]: learned attention-sink logits (gpt-oss): one
                 extra logit per row joins the softmax and its probability is dropped (it attends a zero
                 value), so ``out = attention(...) * sigmoid(lse - sink)`` with ``lse`` the row's
                 log-sum-exp over its keys; any method that knows its ``lse`` carries sinks exactly
    chunk        int, -1 for none; chunked attention (Llama-4's chunked layers): the positions are cut
                 into chunks of ``chunk`` and a query sees only keys of its own chunk
                 (``kv_idx // chunk == q_idx // chunk``), causally when ``is_causal``; the chunks begin
                 at each batch row's first key the mask lets a query see (left padding moves them, as
                 in transformers), at 0 without a mask

The default implementation is exact (plain PyTorch), so capture + canonicalisation never change
results. Scores are combined in the order: scale -> softcap -> mask/bias (and the positional causal / window / chunk
mask) -> [sink column] -> softmax.

Example::

    >>> import torch, lcpass.patterns.op  # registers the op
    >>> q = torch.randn(1, 4, 5, 8); k = v = torch.randn(1, 2, 5, 8)
    >>> out = torch.ops.lcpass.attention(q, k, v, None, 8 ** -0.5, True, -1, 0.0, 0.0, "l0", "sdpa")
    >>> out.shape
    torch.Size([1, 4, 5, 8])
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch._prims_common import compute_elementwise_output_logical_to_physical_perm

__all__ = ["attention", "CANONICAL_OP", "CanonicalArgs", "canonical_args", "positional_keep", "chunk_start", "reference",
           "output_buffer", "laid_out"]


def positional_keep(
    q_len: int, kv_len: int, is_causal: bool, window: int, device: torch.device | None = None, chunk: int = -1,
    start: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """The [Sq, Sk] bool mask of the positional part (causal, sliding window, chunks); None when all True.

    Chunks are cut from each batch row's first position ``start`` ([B] ints, see :func:`chunk_start`;
    0 when None): with ``start`` the keep is [B, 1, Sq, Sk]."""
    if not is_causal and window < 0 and chunk < 1:
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # [Sq, 1]
    kv_pos = torch.arange(kv_len, device=device)[None, :]  # [1, Sk]
    keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if is_causal:
        keep = keep & (kv_pos <= q_pos)
    if window >= 0:
        keep = keep & (kv_pos > q_pos - window)
    if chunk >= 1:
        if start is None:
            keep = keep & (kv_pos // chunk == q_pos // chunk)
        else:
            s0 = start.to(device=keep.device, dtype=torch.long)[:, None, None, None]  # [B, 1, 1, 1]
            keep = keep & ((kv_pos - s0) // chunk == (q_pos - s0) // chunk)
    return keep


def chunk_start(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Where each batch row's chunks begin: its first key that some query attends ([B] ints; None without
    a mask, i.e. 0). Left padding moves the chunks with the text, as transformers' chunked masks do
    (``(kv - left_padding) // chunk == (q - left_padding) // chunk``)."""
    if mask is None:
        return None
    keep = mask if mask.dtype == torch.bool else mask > -1e4
    keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape)) if keep.dim() < 4 else keep
    seen = keep.flatten(1, 2).any(1)  # [B|1, Sk]: keys some query of the row attends
    return torch.where(seen.any(-1), seen.int().argmax(-1), 0)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
    window: int = -1,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    chunk: int = -1,
) -> torch.Tensor:
    """Exact attention with the canonical op's semantics, in plain PyTorch.

    Rows that see no key at all output zeros (as ``torch``'s ``_safe_softmax`` does; with ``sinks`` the
    sink takes the whole probability, and it attends nothing).
    """
    # q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D]
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv != 0:
        raise ValueError(f"lcpass.attention: q has {hq} heads, k has {hkv}; Hkv must divide Hq")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    sq, sk = q.shape[-2], k.shape[-2]
    keep = positional_keep(sq, sk, is_causal, window, q.device, chunk,
                           chunk_start(mask) if chunk >= 1 else None)
    if mask is not None and mask.dtype == torch.bool:
        keep = mask if keep is None else (mask & keep)
        mask = None
    if softcap == 0.0 and dropout_p == 0.0 and mask is None and sinks is None:
        # The fused path: bit-for-bit what models calling SDPA get.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B, Hq, Sq, Sk]
    if softcap != 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if sinks is not None:  # one more logit per row; its probability attends nothing
        b, h = scores.shape[0], scores.shape[1]
        column = sinks.to(scores.dtype).expand(b, h, sq, 1)
        probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    probs = torch.nan_to_num(probs, nan=0.0).to(q.dtype)  # fully masked rows -> 0
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


def output_buffer(q: torch.Tensor, dv: int, follow_q: bool) -> torch.Tensor:
    """An empty [B, Hq, Sq, Dv] output laid out as the replaced call laid out its own: in q's memory order
    for SDPA (which follows its query: GPT-2- or ViT-style code transposes q and views SDPA's output
    without a copy), contiguous for a matrix product. Real and fake kernels both use it, so the strides
    torch.compile assumes are the strides every call returns."""
    shape = (*q.shape[:-1], dv)
    if not follow_q:
        return q.new_empty(shape)
    perm, _ = compute_elementwise_output_logical_to_physical_perm(q)
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return q.new_empty([shape[p] for p in perm]).permute(inverse)


def laid_out(out: torch.Tensor, q: torch.Tensor, follow_q: bool) -> torch.Tensor:
    """``out`` in :func:`output_buffer`'s layout (a copy only when it differs)."""
    want = output_buffer(q, out.shape[-1], follow_q)
    if want.stride() == out.stride():
        return out
    return want.copy_(out)


@torch.library.custom_op("lcpass::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    is_causal: bool,
    window: int,
    softcap: float,
    dropout_p: float,
    site: str,
    source: str,
    sinks: Optional[torch.Tensor] = None,
    chunk: int = -1,
) -> torch.Tensor:
    return laid_out(reference(q, k, v, mask, scale, is_causal, window, softcap, dropout_p, sinks, chunk), q,
                    source == "sdpa")


@attention.register_fake
def _attention_fake(q, k, v, mask, scale, is_causal, window, softcap, dropout_p, site, source, sinks=None,
                    chunk=-1):
    # out: [B, Hq, Sq, Dv]
    return output_buffer(q, v.shape[-1], source == "sdpa")


def _attention_setup_context(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, window, softcap, dropout_p, _site, _source, *rest = inputs
    sinks = rest[0] if rest else None
    chunk = rest[1] if len(rest) > 1 else -1
    ctx.save_for_backward(q, k, v, mask, sinks)
    ctx.params = (scale, is_causal, window, softcap, dropout_p, chunk)


def _attention_backward(ctx, grad_out):
    q, k, v, mask, sinks = ctx.saved_tensors
    scale, is_causal, window, softcap, dropout_p, chunk = ctx.params
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        if sinks is not None and sinks.requires_grad:
            leaves.append(sinks.detach().requires_grad_(True))
        out = reference(*leaves[:3], mask, scale, is_causal, window, softcap, dropout_p,
                        leaves[3] if len(leaves) > 3 else sinks, chunk)
        grads = torch.autograd.grad(out, leaves, grad_out)
    return (*grads[:3], None, None, None, None, None, None, None, None, grads[3] if len(grads) > 3 else None,
            None)


attention.register_autograd(_attention_backward, setup_context=_attention_setup_context)

CANONICAL_OP = torch.ops.lcpass.attention.default

_ARG_NAMES = ("q", "k", "v", "mask", "scale", "is_causal", "window", "softcap", "dropout_p", "site", "source",
              "sinks", "chunk")


@dataclass(frozen=True)
class CanonicalArgs:
    """The named arguments of one canonical op node (fx nodes for tensors, Python values otherwise)."""

    q: object
    k: object
    v: object
    mask: object
    scale: float
    is_causal: bool
    window: int
    softcap: float
    dropout_p: float
    site: str
    source: str
    sinks: object = None
    chunk: int = -1


def canonical_args(node: torch.fx.Node) -> CanonicalArgs:
    """Read a canonical op node's arguments by name."""
    if node.target is not CANONICAL_OP:
        raise ValueError(f"{node.format_node()} is not a call of torch.ops.lcpass.attention")
    values = dict(zip(_ARG_NAMES, node.args))
    values.update(node.kwargs)
    return CanonicalArgs(**values)
