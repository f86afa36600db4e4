"""Run a transformers model with its attention routed through a Python function (calibration probes).

transformers 5 calls the function registered under ``config._attn_implementation`` in
``transformers.AttentionInterface`` with the attention module itself, ``query`` [B, Hq, S, D] and
``key``/``value`` [B, Hkv, Sk, D] (GQA not yet repeated), the mask and the scale. `attention_probe`
registers one dispatcher, switches the model to it for the duration of a ``with`` block and restores
the previous implementation afterwards, handing every call to ``fn(call)`` with the call's site name
(the attention module's qualified name, the name the detector gives the site).

Example:
    >>> seen = []
    >>> def fn(call):
    ...     seen.append((call.site, call.query.shape))
    ...     return call.dense()
    >>> with attention_probe(model, fn):           # doctest: +SKIP
    ...     model(input_ids=ids)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionCall", "attention_probe", "PROBE_NAME", "expand_kv", "allowed_mask"]

PROBE_NAME = "lcpass_calibration_probe"
_state = threading.local()


def expand_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hq, S, D] (each KV head repeated for its query group)."""
    hkv = t.shape[1]
    if hkv == n_heads:
        return t
    return t.repeat_interleave(n_heads // hkv, dim=1)


def allowed_mask(q_len: int, kv_len: int, attention_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Bool [B or 1, 1 or H, Sq, Sk] of allowed (query, key) pairs: causal (queries are the last Sq
    positions) combined with the model's mask (bool = keep, float = additive with -inf/min as masked)."""
    q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    k_pos = torch.arange(kv_len)[None, :]
    allowed = (k_pos <= q_pos) if causal else torch.ones(q_len, kv_len, dtype=torch.bool)
    allowed = allowed[None, None]
    if attention_mask is not None:
        m = attention_mask[..., -q_len:, :kv_len]
        keep = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        allowed = allowed.to(keep.device) & keep
    return allowed


@dataclass
class AttentionCall:
    """One attention call seen by the probe (tensors are the model's, not copies)."""

    site: str
    module: nn.Module
    query: torch.Tensor  # [B, Hq, Sq, D]
    key: torch.Tensor  # [B, Hkv, Sk, D]
    value: torch.Tensor  # [B, Hkv, Sk, D]
    attention_mask: torch.Tensor | None
    scaling: float
    causal: bool

    @property
    def n_heads(self) -> int:
        return int(self.query.shape[1])

    @property
    def n_kv_heads(self) -> int:
        return int(self.key.shape[1])

    def allowed(self) -> torch.Tensor:
        """Bool mask [.., Sq, Sk] of pairs this call may attend (causal + the model's mask)."""
        return allowed_mask(self.query.shape[2], self.key.shape[2], self.attention_mask, self.causal)

    def dense(self, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """The attention output [B, Hq, Sq, D] restricted to `allowed` (default: the model's own mask)."""
        k = expand_kv(self.key, self.n_heads)
        v = expand_kv(self.value, self.n_heads)
        if allowed is None and self.attention_mask is None and self.causal:
            sq, sk = self.query.shape[2], self.key.shape[2]
            if sq == sk:
                return F.scaled_dot_product_attention(self.query, k, v, is_causal=True, scale=self.scaling)
        if allowed is None:
            allowed = self.allowed()
        return F.scaled_dot_product_attention(
            self.query, k, v, attn_mask=allowed.to(self.query.device), scale=self.scaling
        )

    def probs(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities [B, Hq, R, Sk] (float32) of query rows `rows` (default: all)."""
        q = self.query if rows is None else self.query[:, :, rows]
        k = expand_kv(self.key, self.n_heads)
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.scaling
        allowed = self.allowed()
        if rows is not None:
            allowed = allowed[..., rows, :]
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        return torch.softmax(scores, dim=-1)


def _dispatch(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    stack = getattr(_state, "stack", None)
    if not stack:
        raise RuntimeError(
            f"attention implementation {PROBE_NAME!r} was called outside lcpass.calibration.attention_probe; "
            "set the model back with model.set_attn_implementation('sdpa')"
        )
    fn, names = stack[-1]
    site = names.get(id(module), type(module).__name__)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    call = AttentionCall(site, module, query, key, value, attention_mask, scale, causal)
    out = fn(call)  # [B, Hq, Sq, D]
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE_NAME, _dispatch)


@contextmanager
def attention_probe(model: nn.Module, fn: Callable[[AttentionCall], torch.Tensor]) -> Iterator[None]:
    """Route every attention call of `model` through `fn(call) -> output [B, Hq, Sq, D]` inside the block.

    Needs a transformers model (one with ``config._attn_implementation`` and ``set_attn_implementation``);
    anything else gets a ValueError saying so. The model's previous implementation is restored on exit.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"calibration needs a transformers model (with config._attn_implementation); "
            f"{type(model).__name__} is not one: pass a plan made by hand (lcpass.plan.Plan) instead"
        )
    _register()
    previous = getattr(config, "_attn_implementation", None) or "sdpa"
    names = {id(m): n for n, m in model.named_modules()}
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append((fn, names))
    model.set_attn_implementation(PROBE_NAME)
    try:
        yield
    finally:
        stack.pop()
        model.set_attn_implementation(previous)
