"""RazorAttention: full KV for retrieval heads; sinks + recent + one compensation token for the rest.

Paper: Tang, Lin, Lin, Han, Hong, Yao, Wang, "RazorAttention: Efficient KV Cache Compression Through
Retrieval Heads", ICLR 2025. Prefill is ordinary full (causal) attention. Afterwards the KV cache of each
non-retrieval head is cut to the first N0 sink tokens and the last L_h = max(S0, N / C) tokens; the
dropped middle D is folded into one compensation token

    k_hat = mean_{m in D} k_m,   v_hat = mean_{m in D} v_m

which decoding attends to with weight |D| (as if the |D| dropped tokens were all equal to it):

    out = (sum_{i kept} e^{q.k_i} v_i + |D| e^{q.k_hat} v_hat) / (sum_{i kept} e^{q.k_i} + |D| e^{q.k_hat})

Parameters (paper's symbols in brackets): ``sink`` [N0], ``threshold`` [S0, minimum buffer],
``ratio`` [C, compression ratio], ``retrieval`` (head kept whole: echo / induction heads).

Example:
    >>> import torch
    >>> q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    >>> compensated_attention(q, k, v, sink=4, recent=8, scale=8 ** -0.5).shape
    torch.Size([1, 2, 1, 8])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lcpass import masks as M
from lcpass.methods.base import KVPolicy, Method, Param


def razor_recent(params: Mapping[str, Any], *, kv_len: int) -> int:
    """L_h = max(S0, ceil(N / C)) recent tokens a non-retrieval head keeps."""
    return max(params["threshold"], math.ceil(kv_len / params["ratio"]))


def compress_kv(
    k: torch.Tensor, v: torch.Tensor, sink: int, recent: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cut a KV cache to [sinks | compensation token | recent]; return (k', v', |D|).

    k, v: [B, H, S, D] -> [B, H, sink + 1 + recent, D] when S > sink + recent (|D| = S - sink - recent
    tokens dropped, their mean at index `sink`), else returned unchanged with |D| = 0.
    """
    seq = k.shape[-2]
    dropped = seq - sink - recent
    if dropped <= 0:
        return k, v, 0
    mid = slice(sink, seq - recent)
    k_hat = k[..., mid, :].mean(dim=-2, keepdim=True)  # [B, H, 1, D]
    v_hat = v[..., mid, :].mean(dim=-2, keepdim=True)
    k2 = torch.cat([k[..., :sink, :], k_hat, k[..., seq - recent :, :]], dim=-2)
    v2 = torch.cat([v[..., :sink, :], v_hat, v[..., seq - recent :, :]], dim=-2)
    return k2, v2, dropped


def compensated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, recent: int, scale: float
) -> torch.Tensor:
    """Decode-time RazorAttention output of non-retrieval heads, in plain PyTorch.

    q: [B, Hq, Sq, D] (the newest Sq tokens, absolute positions Sk - Sq + i); k, v: [B, Hkv, Sk, D],
    Hkv dividing Hq. The cache is compressed with `compress_kv`, the compensation token weighted by
    |D| (a log|D| bias on its score), causal among the recent tokens. Needs Sq <= recent so every
    query's own key is kept. Returns [B, Hq, Sq, D] in q's dtype (computed in float32).
    """
    bsz, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"compensated_attention: {hkv} KV heads do not divide {hq} query heads")
    if sq > sk:
        raise ValueError(
            f"compensated_attention: {sq} queries but only {sk} keys; queries must be in the cache"
        )
    k2, v2, dropped = compress_kv(k, v, sink, recent)
    if dropped and sq > recent:
        raise ValueError(
            f"compensated_attention: {sq} queries exceed recent={recent}, so some queries' own keys "
            f"would be compressed; decode in chunks of at most {recent} tokens or raise recent"
        )
    n_keys = k2.shape[-2]
    # key absolute positions: sinks 0..sink-1, compensation (before every query), recent tail
    if dropped:
        pos = torch.cat([torch.arange(sink), torch.full((1,), sink), torch.arange(sk - recent, sk)])
    else:
        pos = torch.arange(sk)
    qpos = torch.arange(sk - sq, sk)
    allowed = pos[None, :].to(q.device) <= qpos[:, None].to(q.device)  # [Sq, Sk']
    bias = torch.zeros(n_keys, dtype=torch.float32, device=q.device)
    if dropped:
        bias[sink] = math.log(dropped)
    group = hq // hkv
    qf = q.float().reshape(bsz, hkv, group * sq, dim)  # [B, Hkv, G*Sq, D]
    scores = (qf @ k2.float().transpose(-1, -2)) * scale + bias  # [B, Hkv, G*Sq, Sk']
    scores = scores.view(bsz, hkv, group, sq, n_keys).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(bsz, hkv, group * sq, n_keys)
    out = probs @ v2.float()  # [B, Hkv, G*Sq, D]
    return out.view(bsz, hq, sq, dim).to(q.dtype)


def razor_mask_mod(params: Mapping[str, Any], *, head: int, n_heads: int, q_len: int, kv_len: int) -> Any:
    """Prefill is full causal attention for every head (the paper compresses only the cache)."""
    return M.causal_mask()


def razor_kv(params: Mapping[str, Any], *, kv_len: int) -> KVPolicy:
    """Retrieval heads keep everything; the others keep N0 sinks, L_h recent and a compensation token."""
    if params["retrieval"]:
        return KVPolicy.all()
    return KVPolicy.compensated(params["sink"], razor_recent(params, kv_len=kv_len))


RAZOR = Method(
    name="razor",
    paper="RazorAttention: Efficient KV Cache Compression Through Retrieval Heads (ICLR 2025)",
    summary=(
        "Prefill dense; non-retrieval heads' KV cut to N0 sinks + max(S0, N/C) recent + 1 "
        "compensation token (mean of the dropped keys/values, weighted by their count)."
    ),
    params=(
        Param("sink", "int", 4, 0, None, "N0: sink tokens kept"),
        Param("threshold", "int", 4000, 1, None, "S0: minimum recent buffer"),
        Param("ratio", "float", 5.0, 1.0, None, "C: compression ratio; recent = max(S0, N / C)"),
        Param("retrieval", "bool", False, None, None, "this head is a retrieval (echo/induction) head"),
    ),
    kind="static",
    phases=frozenset({"decode", "kv"}),
    needs_calibration=True,
    crossover=4096,
    crossover_why=(
        "below N0 + S0 (~4000 tokens by default) no token is dropped, so the compressed cache equals "
        "the full one"
    ),
    mask_mod=razor_mask_mod,
    kv_policy=razor_kv,
)
