"""Core Context Aware attention (CCA): globality pooling into core tokens + locality-preserved attention.

The keys are augmented with one *core token* per complete group of ``group_size`` tokens (the
importance-weighted mean of the group's keys and values); a query attends, in ONE softmax, the core
tokens of the groups lying entirely before its local window and the ``local_window`` most recent
tokens (itself included). The augmented sequence ``[cores | keys]`` runs through the block engine
with a :class:`~lcpass.masks.MaskMod` that has an exact block classifier, so the layout costs
O(blocks).

>>> import torch
>>> q = torch.randn(1, 4, 512, 32); k = v = torch.randn(1, 2, 512, 32)
>>> p = {"group_size": 16, "local_window": 128}
>>> out = cca_attend(q, k, v, params=p, state=None, mask_mod=None, scale=32 ** -0.5)   # [1, 4, 512, 32]
"""

from __future__ import annotations

import torch
from torch import Tensor

from lcpass.engine import sparse_attention
from lcpass.layout import build_layout
from lcpass.masks import MaskMod
from lcpass.methods.base import KVPolicy, Param
from lcpass.methods.dynamic.common import DynamicMethod, causal_envelope, check_causal

__all__ = ["CCA", "cca_attend", "cca_core_tokens", "cca_mask"]


def cca_core_tokens(k: Tensor, v: Tensor, group_size: int, scale: float) -> tuple[Tensor, Tensor]:
    """Core key/value per complete group: k, v [B, Hkv, S, D] -> [B, Hkv, S // g, D] each.

    Importance of a token = softmax over its group of ``k_last . k_t * scale``, with the group's last
    key standing in for its last query (training-free, and available at decode time).
    """
    B, H, S, D = k.shape
    g = group_size
    n = S // g
    kg = k[:, :, : n * g].float().view(B, H, n, g, D)
    vg = v[:, :, : n * g].float().view(B, H, n, g, D)
    w = torch.softmax((kg @ kg[:, :, :, -1:].transpose(-1, -2)).squeeze(-1) * scale, -1)  # [B,H,n,g]
    return (w[..., None] * kg).sum(3).to(k.dtype), (w[..., None] * vg).sum(3).to(v.dtype)


def cca_mask(group_size: int, local_window: int, n_cores: int) -> MaskMod:
    """Mask over the augmented keys ``[cores (n_cores) | keys]``; queries at ``n_cores + i``.

    core ``j`` visible to query ``i`` iff ``(j + 1) * g <= i - s + 1`` (group outside the window);
    key ``t`` iff ``i - s < t <= i``.
    """
    g, s, nc = group_size, local_window, n_cores

    def fn(b: Tensor, h: Tensor, qa: Tensor, kv: Tensor) -> Tensor:
        i = qa - nc
        core = (kv < nc) & ((kv + 1) * g <= i - s + 1)
        d = qa - kv
        return core | ((kv >= nc) & (d >= 0) & (d < s))

    def cls(h, q_lo, q_hi, kv_lo, kv_hi):
        t_core = (kv_lo < nc) & ((kv_lo + 1) * g <= q_hi - nc - s)
        f_core = (kv_hi <= nc) & (kv_hi * g <= q_lo - nc - s + 1)
        lo = torch.clamp(kv_lo, min=nc)
        dmin, dmax = q_lo - (kv_hi - 1), (q_hi - 1) - lo
        t_orig = (kv_hi > nc) & (torch.clamp(dmin, min=0) <= torch.clamp(dmax, max=s - 1))
        f_orig = (kv_lo >= nc) & (dmin >= 0) & (dmax <= s - 1)
        exact = (kv_hi <= nc) | (kv_lo >= nc)
        shape = torch.broadcast_shapes(h.shape, t_core.shape)
        return ((t_core | t_orig).expand(shape), (f_core | f_orig).expand(shape), exact.expand(shape))
    return MaskMod(f"cca(g={g}, s={s}, cores={nc})", ("cca", g, s, nc), fn, cls)


def cca_attend(q: Tensor, k: Tensor, v: Tensor, *, params: dict, state: dict | None,
               mask_mod: MaskMod | None, scale: float) -> Tensor:
    """CCA-Attention (Chen et al., 2024): fused globality-pooling (core tokens) and locality-preserved
    attention. q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> [B, Hq, Sq, D]."""
    check_causal(mask_mod, "cca")
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    kc, vc = cca_core_tokens(k, v, params["group_size"], scale)
    nc = kc.shape[2]
    ka, va = torch.cat([kc, k], 2), torch.cat([vc, v], 2)
    mm = cca_mask(params["group_size"], params["local_window"], nc)
    lay = build_layout(mm, Hq, Sq, nc + Sk)
    return sparse_attention(q, ka, va, lay, scale=scale)


CCA = DynamicMethod(
    name="cca",
    paper="Core Context Aware Attention for Long Context Language Modeling "
          "(CCA-Attention, Chen et al., 2024)",
    summary="Groups merged into importance-weighted core tokens + local window, one fused softmax.",
    params=(
        Param("group_size", "int", 16, 1, None, "tokens merged into one core token (g)"),
        Param("local_window", "int", 1024, 1, None, "recent tokens attended exactly (s), itself included"),
    ),
    kind="dynamic", phases=frozenset({"prefill", "decode"}), needs_calibration=False, crossover=4096,
    crossover_why="below ~4k tokens the local window covers most of the context",
    mask_mod=causal_envelope, kv_policy=lambda p, *, kv_len: KVPolicy.all(),
    select=None, attend=cca_attend, granularity="cluster",
)
