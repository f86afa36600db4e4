"""Score modifications: Selective Attention temperature, TempScale, Entropy-ABF, AutoPASTA steering.

Each factory returns a ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (absolute positions, applied
to the scaled scores before the mask) that :func:`lcpass.engine.sparse_attention` and
:func:`lcpass.engine.reference_attention` accept. The registered methods run causal attention with
their score_mod (the engine's math path).

>>> import torch
>>> from lcpass.engine import reference_attention
>>> from lcpass.masks import causal_mask
>>> q = k = v = torch.randn(1, 2, 16, 8)
>>> out = reference_attention(q, k, v, causal_mask(), scale=8 ** -0.5, score_mod=tempscale_score_mod(0.5))
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lcpass.engine import dense_attention
from lcpass.engine.reference import ScoreMod
from lcpass.masks import MaskMod
from lcpass.methods.base import Param
from lcpass.methods.dynamic.common import DynamicMethod, causal_envelope, check_causal

__all__ = ["SELECTIVE", "TEMPSCALE", "ENTROPY_ABF", "PASTA", "tempscale_score_mod",
           "selective_query_temperature", "selective_score_mod", "entropy_abf_rope",
           "entropy_abf_score_mod", "pasta_score_mod", "spans_to_mask"]


def tempscale_score_mod(temperature: float) -> ScoreMod:
    """TempScale: a constant softmax temperature, ``score / temperature`` (< 1 sharpens)."""
    if not temperature > 0:
        raise ValueError(f"tempscale: temperature={temperature}; pass a value > 0")

    def mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score / temperature
    return mod


def selective_query_temperature(q: Tensor, weight: Tensor | None = None) -> Tensor:
    """Selective Attention's query temperature ``tau_q [B, Hq, Sq]``: ``1 + tanh(q . w_h)`` with learned
    ``weight [Hq, D]``; all ones without weights (training-free: position temperature only)."""
    if weight is None:
        return torch.ones(q.shape[:3], device=q.device)
    if weight.shape != (q.shape[1], q.shape[3]):
        raise ValueError(f"selective: weight has shape {tuple(weight.shape)}; expected [Hq={q.shape[1]}, "
                         f"D={q.shape[3]}]")
    return 1.0 + torch.tanh(torch.einsum("bhsd,hd->bhs", q.float(), weight.to(q.device).float()))


def selective_score_mod(alpha: float, q_temperature: Tensor | None = None, q_offset: int = 0) -> ScoreMod:
    """Selective Attention (Zhang et al., NeurIPS 2024): query- and position-dependent temperature,
    ``score * tau_q[b, h, i] * (1 + alpha * log(1 + pos_i))``; ``q_temperature [B, Hq, Sq]`` from
    :func:`selective_query_temperature`, indexed by ``q_idx - q_offset`` (queries' first position)."""
    def mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        t = 1.0 + alpha * torch.log1p(q_idx.float())
        if q_temperature is not None:
            tq = q_temperature[b % q_temperature.shape[0], h, (q_idx - q_offset).clamp(min=0)]
            t = t * tq
        return score * t
    return mod


def entropy_abf_rope(rope_base: float, *, abf_base: float = 500000.0) -> float:
    """Entropy-ABF's RoPE base (Zhang et al., 2024, "Extending LLMs' Context Window with 100 Samples"):
    the adjusted base frequency, ``max(rope_base, abf_base)`` (500,000 in the paper).
    :func:`lcpass.rope.set_rope_base` rewrites the rotary embedding to it (``lcpass.optimize`` does so for
    every plan using ``entropy_abf``); :func:`entropy_abf_score_mod` scales the logits."""
    if rope_base <= 0 or abf_base <= 0:
        raise ValueError(f"entropy_abf_rope: rope_base={rope_base}, abf_base={abf_base}; both must be > 0")
    return max(float(rope_base), float(abf_base))


def entropy_abf_score_mod(trained_length: int) -> ScoreMod:
    """Entropy-aware logit scaling: ``score * max(1, log(pos + 1) / log(trained_length))`` keeps the
    attention entropy of positions past the trained length near its trained value."""
    if trained_length < 2:
        raise ValueError(f"entropy_abf: trained_length={trained_length}; pass the trained context (>= 2)")
    inv = 1.0 / math.log(trained_length)

    def mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score * torch.clamp(torch.log1p(q_idx.float()) * inv, min=1.0)
    return mod


def spans_to_mask(spans: list[tuple[int, int]], batch: int, kv_len: int, *,
                  device: torch.device | str | None = None) -> Tensor:
    """User-marked half-open spans ``[(start, end), ...]`` -> ``Bool[batch, kv_len]`` (True = inside)
    on ``device`` (pass the keys' device; None = the default device)."""
    m = torch.zeros(batch, kv_len, dtype=torch.bool, device=device)
    for a, e in spans:
        if not 0 <= a <= e <= kv_len:
            raise ValueError(f"pasta: span ({a}, {e}) is outside [0, {kv_len}]")
        m[:, a:e] = True
    return m


def pasta_score_mod(in_span: Tensor, alpha: float, heads: list[int] | None = None) -> ScoreMod:
    """AutoPASTA-style steering (Zhang et al., ICLR 2024 / 2025): on the steered ``heads`` (all when
    None) attention to keys outside the marked spans is multiplied by ``alpha`` (then renormalised),
    i.e. ``score + log(alpha)`` on those keys. ``in_span: Bool[B, Sk]`` (on the scores' device)."""
    if not 0 < alpha <= 1:
        raise ValueError(f"pasta: alpha={alpha}; pass a coefficient in (0, 1]")
    pen = math.log(alpha)
    hs = None if heads is None else torch.tensor(heads, dtype=torch.long, device=in_span.device)

    def mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        outside = ~in_span[b % in_span.shape[0], kv_idx]
        if hs is not None:
            outside = outside & torch.isin(h, hs)
        return score + pen * outside.to(score.dtype)
    return mod


def _attend_with(make: Any):
    def attend(q: Tensor, k: Tensor, v: Tensor, *, params: dict, state: dict | None,
               mask_mod: MaskMod | None, scale: float) -> Tensor:
        check_causal(mask_mod, "score_mod")
        return dense_attention(q, k, v, scale=scale, is_causal=True,
                               score_mod=make(params, state or {}, q, k))
    return attend


def _selective(params: dict, state: dict, q: Tensor, k: Tensor) -> ScoreMod:
    tq = selective_query_temperature(q, state.get("selective_weight"))
    return selective_score_mod(params["alpha"], tq, k.shape[2] - q.shape[2])


def _pasta(params: dict, state: dict, q: Tensor, k: Tensor) -> ScoreMod:
    if "spans" not in state:
        raise ValueError("pasta: needs state={'spans': [(start, end), ...]} (the user-marked spans)")
    in_span = spans_to_mask(state["spans"], q.shape[0], k.shape[2], device=k.device)
    return pasta_score_mod(in_span, params["alpha"], state.get("heads"))


_COMMON = dict(kind="dynamic", phases=frozenset({"prefill", "decode"}), needs_calibration=False,
               crossover=0, mask_mod=causal_envelope, select=None, granularity="score",
               crossover_why="changes the result, not the cost: applies at every length")

SELECTIVE = DynamicMethod(
    name="selective",
    paper="Selective Attention: Enhancing Transformer through Principled Context Control (NeurIPS 2024)",
    summary="Query- and position-dependent softmax temperature (learned query weights via state).",
    params=(Param("alpha", "float", 0.1, 0.0, 10.0, "position temperature slope: 1 + alpha*log(1+pos)"),),
    attend=_attend_with(_selective), **_COMMON)

TEMPSCALE = DynamicMethod(
    name="tempscale",
    paper="TempScale: constant attention-temperature scaling (softmax temperature)",
    summary="Divide every attention score by a constant temperature.",
    params=(Param("temperature", "float", 1.0, 0.01, 100.0, "softmax temperature (< 1 sharpens)"),),
    attend=_attend_with(lambda p, s, q, k: tempscale_score_mod(p["temperature"])),
    score_mod=lambda p, *, head, n_heads: tempscale_score_mod(p["temperature"]), **_COMMON)

ENTROPY_ABF = DynamicMethod(
    name="entropy_abf",
    paper="Extending LLMs' Context Window with 100 Samples (Entropy-ABF, Zhang et al., 2024)",
    summary="Entropy-aware logit scaling past the trained length + RoPE base raised to abf_base (rewrite).",
    params=(Param("trained_length", "int", 4096, 2, None, "context length the model was trained on"),
            Param("abf_base", "float", 500000.0, 0.0, None,
                  "RoPE base lcpass.optimize sets (max(model's base, abf_base)); 0 = logit scaling only")),
    attend=_attend_with(lambda p, s, q, k: entropy_abf_score_mod(p["trained_length"])),
    score_mod=lambda p, *, head, n_heads: entropy_abf_score_mod(p["trained_length"]),
    rope_base=lambda p: p["abf_base"], **_COMMON)

PASTA = DynamicMethod(
    name="pasta",
    paper="Tell Your Model Where to Attend: Post-hoc Attention Steering for LLMs (PASTA / AutoPASTA)",
    summary="Down-weight attention to tokens outside user-marked spans (state['spans']) by alpha.",
    params=(Param("alpha", "float", 0.01, 1e-6, 1.0, "attention multiplier outside the marked spans"),),
    attend=_attend_with(_pasta), **_COMMON)
