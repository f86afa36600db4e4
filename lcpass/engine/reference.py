"""Dense attention: the plain-PyTorch oracle and the SDPA fallback used below the crossover length.

Conventions shared by the engine: ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]`` with ``Hkv`` dividing
``Hq`` (q head ``h`` reads kv head ``h // (Hq // Hkv)``); queries sit at ABSOLUTE positions
``Sk - Sq + i``; ``kv_keep [B, Sk]`` (True = real key) masks padding; rows that see no key output zeros.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lcpass.masks import MaskMod

__all__ = ["ScoreMod", "check_qkv", "reference_attention", "dense_attention", "element_mask", "with_sinks"]

# score_mod(score, b, h, q_idx, kv_idx) -> score, applied before the mask (absolute positions)
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def check_qkv(q: Tensor, k: Tensor, v: Tensor, kv_keep: Tensor | None, owner: str) -> None:
    """Validate shapes: q [B, Hq, Sq, Dk], k [B, Hkv, Sk, Dk], v [B, Hkv, Sk, Dv], Hkv | Hq, Sq <= Sk,
    kv_keep [B, Sk]. The value head dim may differ from the key's (MLA: DeepSeek-V2/V3)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{owner}: q, k, v must be 4-D [B, H, S, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Sq, D = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{owner}: k {tuple(k.shape)} must be [B={B}, Hkv, Sk, Dk={D}] and v "
                         f"{tuple(v.shape)} [B={B}, Hkv, Sk, Dv]")
    if Hq % k.shape[1]:
        raise ValueError(f"{owner}: Hkv={k.shape[1]} must divide Hq={Hq} (GQA groups)")
    if Sq > k.shape[2]:
        raise ValueError(f"{owner}: Sq={Sq} > Sk={k.shape[2]}; queries are the last Sq positions")
    if kv_keep is not None and (kv_keep.shape != (B, k.shape[2]) or kv_keep.dtype != torch.bool):
        raise ValueError(f"{owner}: kv_keep must be Bool[B={B}, Sk={k.shape[2]}], got "
                         f"{kv_keep.dtype} {tuple(kv_keep.shape)}")


def with_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """Attention ``out`` [B, Hq, Sq, Dv] with one more logit per row that attends nothing (learned sinks,
    [B, Hq, Sq, 1]): the row's probabilities shrink by ``sigmoid(lse - sink)``, ``lse`` [B, Hq, Sq] the
    natural log-sum-exp over the keys it attends (a row without keys, lse = -inf, outputs zeros)."""
    w = torch.sigmoid(lse.float() - sinks[..., 0].float())
    return (out.float() * w[..., None]).to(out.dtype)


def element_mask(mask_mod: MaskMod | None, B: int, H: int, Sq: int, Sk: int,
                 kv_keep: Tensor | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Dense boolean mask ``[B|1, H|1, Sq, Sk]`` of ``mask_mod`` (absolute positions) and ``kv_keep``."""
    b = torch.arange(B, device=device).view(-1, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, -1, 1, 1)
    qi = (torch.arange(Sq, device=device) + (Sk - Sq)).view(1, 1, -1, 1)
    ki = torch.arange(Sk, device=device).view(1, 1, 1, -1)
    m = mask_mod(b, h, qi, ki) if mask_mod is not None else torch.ones(1, 1, Sq, Sk, dtype=torch.bool,
                                                                         device=device)
    if kv_keep is not None:
        m = m & kv_keep[:, None, None, :]
    return m


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask_mod: MaskMod | None, *, scale: float,
                        score_mod: ScoreMod | None = None, kv_keep: Tensor | None = None,
                        return_lse: bool = False):
    """Dense masked attention in plain PyTorch, computed in float32 (the oracle; small N only).
    ``return_lse``: also each row's log-sum-exp over its visible keys, Float[B, Hq, Sq] (-inf: no key).

    >>> from lcpass.masks import causal_mask
    >>> q = k = v = torch.randn(1, 2, 5, 8)
    >>> out = reference_attention(q, k, v, causal_mask(), scale=8 ** -0.5)   # [1, 2, 5, 8]
    """
    check_qkv(q, k, v, kv_keep, "reference_attention")
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    G = Hq // k.shape[1]
    kf = k.float().repeat_interleave(G, dim=1)  # [B, Hq, Sk, D]
    vf = v.float().repeat_interleave(G, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale  # [B, Hq, Sq, Sk]
    if score_mod is not None:
        dev = q.device
        b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
        h = torch.arange(Hq, device=dev).view(1, -1, 1, 1)
        qi = (torch.arange(Sq, device=dev) + (Sk - Sq)).view(1, 1, -1, 1)
        ki = torch.arange(Sk, device=dev).view(1, 1, 1, -1)
        s = score_mod(s, b, h, qi, ki)
    m = element_mask(mask_mod, B, Hq, Sq, Sk, kv_keep, q.device)
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows without any key -> zeros
    out = torch.matmul(p, vf).to(q.dtype)
    return (out, torch.logsumexp(s, dim=-1)) if return_lse else out


def dense_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, is_causal: bool = False,
                    attn_mask: Tensor | None = None, kv_keep: Tensor | None = None,
                    score_mod: ScoreMod | None = None, return_lse: bool = False):
    """SDPA on the whole sequence (the fallback below the crossover length).
    ``return_lse``: also each row's log-sum-exp, Float[B, Hq, Sq] (the math path).

    ``is_causal`` uses absolute positions (query ``i`` sees keys ``<= Sk - Sq + i``), unlike SDPA's
    top-left convention when ``Sq != Sk``. ``attn_mask``: Bool broadcastable to ``[B, Hq, Sq, Sk]``.
    With ``score_mod`` the math path of :func:`reference_attention` is used.

    >>> q = k = v = torch.randn(1, 4, 64, 32)
    >>> out = dense_attention(q, k[:, :2], v[:, :2], scale=32 ** -0.5, is_causal=True)   # GQA
    """
    check_qkv(q, k, v, kv_keep, "dense_attention")
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    mask = attn_mask
    if is_causal and (Sq != Sk or mask is not None or kv_keep is not None or score_mod is not None):
        c = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
        mask = c if mask is None else mask & c
        is_causal = False
    if kv_keep is not None:
        keep = kv_keep[:, None, None, :]
        mask = keep if mask is None else mask & keep
    if score_mod is not None or return_lse:
        mm = None
        if mask is not None:
            mask4 = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))

            def mm(b, h, qi, ki):
                return mask4[b % mask4.shape[0], h % mask4.shape[1],
                             (qi - (Sk - Sq)) % mask4.shape[2], ki % mask4.shape[3]]
        return reference_attention(q, k, v, mm, scale=scale, score_mod=score_mod, return_lse=return_lse)
    gqa = Hq != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=gqa)
    if mask is not None:
        seen = mask.any(-1, keepdim=True)  # rows with no visible key -> zeros (SDPA may give NaN)
        out = out.masked_fill(~seen, 0.0)
    return out
