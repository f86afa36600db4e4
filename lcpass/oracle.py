"""Attention as the eager forward computes it, seen at the ATen dispatcher: the architecture sweep's
oracle, and ``lcpass.optimize``'s check that detection missed no attention.

lcpass finds attention on a captured FX graph; this module never looks at one. It runs the model's own
eager forward under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` and counts what the
kernels do:

* a fused attention kernel (``_scaled_dot_product_flash_attention_for_cpu``, the CUDA flash / efficient /
  cuDNN kernels) is one attention; its mask comes from ``is_causal`` and ``attn_mask``;
* a softmax (``_softmax`` / ``_safe_softmax``) is one attention when its output, through views, casts and
  dropout, is an operand of a matrix product (``bmm`` / ``mm``): that is the ``P @ V``. A softmax that
  never meets a matrix product (an MoE router, a classifier head) is not attention. Its mask is read off
  the probabilities: the keys with probability exactly 0. Columns sliced off the probabilities before
  the product (gpt-oss's learned sink logit, concatenated after the keys and dropped after the softmax)
  are not keys: the mask and the attention's shape are those of the columns kept. A ``logsumexp`` of the
  very scores a softmax then reads (Granite-SWA's sinks, ``out * sigmoid(lse - sink)``) is part of that
  attention: :func:`masked_forward` restricts it with the same keep-mask.

Each attention's mask is reported as a pattern over (query, key) positions with queries at the end of the
keys (decode convention): ``"none"``, ``"causal"``, ``"sliding(W)"``, ``"chunked(C)"``, ``"other"`` (a fixed pattern none
of those) or ``"varies"`` (differs across batch rows or heads).

:func:`masked_forward` reruns the forward with each attention's scores restricted to a given keep-mask
(``-inf`` elsewhere) — the hand-built reference of a sparse method: the model's own code with only the
mask changed.

Example::

    >>> calls, out = attention_calls(model, inputs)
    >>> [c.pattern for c in calls]
    ['causal', 'causal']
    >>> ref = masked_forward(model, inputs, {0: keep, 1: keep})    # keep(sq, sk, n_heads) -> bool [H|1, sq, sk]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lcpass.outputs import main_output

__all__ = ["AttentionCall", "attention_calls", "masked_forward", "mask_pattern", "first_tensor", "Keep"]

aten = torch.ops.aten

_FUSED = {aten._scaled_dot_product_flash_attention_for_cpu.default}
for _name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention"):
    if hasattr(aten, _name):
        _FUSED.add(getattr(aten, _name).default)
_SOFTMAX = {aten._softmax.default, aten._safe_softmax.default}
_MATMUL = {aten.bmm.default, aten.mm.default, aten.baddbmm.default}
# ops through which "this is a softmax's output" flows on its way to P @ V
_CARRY = {"view", "_unsafe_view", "reshape", "_to_copy", "clone", "expand", "transpose", "permute", "slice",
          "contiguous", "native_dropout", "where", "masked_fill", "detach", "select", "unsqueeze", "squeeze",
          "alias", "t", "mul", "div", "split", "unbind", "narrow", "index_select", "to", "type_as", "flatten",
          "unflatten", "_reshape_alias", "dropout", "copy", "lift_fresh", "as_strided", "constant_pad_nd", "pad"}

Keep = Callable[[int, int, int], torch.Tensor]  # (sq, sk, n_heads) -> bool [H or 1, sq, sk]


@dataclass(frozen=True)
class AttentionCall:
    """One attention computation of an eager forward, in execution order."""

    index: int  # execution order among attention calls
    kind: str  # "sdpa" (a fused kernel) or "softmax"
    pattern: str  # none | causal | sliding(W) | chunked(C) | other | varies
    shape: tuple[int, ...]  # the scores' shape [..., Sq, Sk]


def mask_pattern(keep: torch.Tensor) -> str:
    """Name the keep-pattern of ``keep`` [..., Sq, Sk] (queries aligned to the end of the keys)."""
    keep = keep.reshape(-1, *keep.shape[-2:]).to("cpu")
    sq, sk = keep.shape[-2:]
    if bool(keep.all()):
        return "none"
    first = keep[0]
    if not bool((keep == first).all()):
        return "varies"
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    causal = j <= i
    if bool((first == causal).all()):
        return "causal"
    for w in range(1, sk):
        if bool((first == (causal & (i - j < w))).all()):
            return f"sliding({w})"
    for c in range(1, sk):  # causal within chunks of c positions (Llama-4's chunked layers)
        if bool((first == (causal & (i // c == j // c))).all()):
            return f"chunked({c})"
    return "other"


def _op_name(func: Any) -> str:
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


def _sdpa_keep(q: torch.Tensor, k: torch.Tensor, is_causal: bool, mask: Optional[torch.Tensor]) -> torch.Tensor:
    sq, sk = q.shape[-2], k.shape[-2]
    if is_causal:
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    else:
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if mask is not None:
        m = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        keep = keep & m
    return keep


class _Mode(TorchDispatchMode):
    def __init__(self, keeps: Optional[dict[int, Keep]] = None, heads: Optional[dict[int, int]] = None):
        super().__init__()
        self.keeps = keeps or {}
        self.heads = heads or {}
        self.calls: list[AttentionCall] = []
        self._softmax_outputs: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # id -> (n, probs, alive)
        self._pending: dict[int, tuple[torch.Tensor, tuple[int, ...]]] = {}  # softmax n -> probs, shape
        self._n = 0  # attention-candidate counter (fused kernels and softmaxes, execution order)
        self._order: dict[int, int] = {}  # candidate n -> attention index
        self._fused_or_softmax = 0
        self._dropped: dict[int, int] = {}  # softmax n -> trailing columns sliced off before P @ V (sinks)
        self._lse_seen: dict[int, tuple[int, torch.Tensor]] = {}  # id(scores) -> (logsumexp number, scores)
        self._lse_of: dict[int, int] = {}  # logsumexp number -> the softmax n that read the same scores
        self._n_lse = 0

    def _logsumexp(self, func, args, kwargs):
        """A logsumexp of scores a softmax reads next is part of that attention: same keep-mask."""
        k = self._n_lse
        self._n_lse += 1
        x = args[0]
        self._lse_seen[id(x)] = (k, x)
        n = getattr(self, "_ref_lse_of", {}).get(k)
        index = self._ref_index.get(n) if n is not None and hasattr(self, "_ref_index") else None
        if index is not None and index in self.keeps:
            extra = self._keep_for(index, tuple(x.shape), x.device)
            if extra is not None:
                args = (x.masked_fill(~extra, float("-inf")), *args[1:])
        return func(*args, **kwargs)

    def _drop_columns(self, n: int, probs: torch.Tensor, args: tuple) -> None:
        """``probs[..., :end]`` straight after the softmax: the trailing columns are not keys (sinks)."""
        dim = args[1] if len(args) > 1 else 0
        start = args[2] if len(args) > 2 else None
        end = args[3] if len(args) > 3 else None
        step = args[4] if len(args) > 4 else 1
        size = probs.shape[-1]
        if dim not in (-1, probs.dim() - 1) or start not in (None, 0) or step != 1 or end is None:
            return
        end = end + size if end < 0 else min(end, size)
        if 0 < end < size:
            keep, shape = self._pending[n]
            self._pending[n] = (keep[..., :end], (*shape[:-1], end))
            self._dropped[n] = size - end

    # -- reference: restrict scores ------------------------------------------------------------
    def _keep_for(self, index: int, shape: tuple[int, ...], device) -> Optional[torch.Tensor]:
        fn = self.keeps.get(index)
        if fn is None:
            return None
        sq, sk = shape[-2], shape[-1]
        heads = self.heads.get(index, 1)
        keep = fn(sq, sk, heads).to(device)  # [H|1, sq, sk]
        if len(shape) == 4:
            return keep[None]  # [1, H|1, sq, sk]
        if len(shape) == 3 and keep.shape[0] > 1:  # [B*H, sq, sk]
            return keep.repeat(shape[0] // keep.shape[0], 1, 1)
        return keep

    def _fused(self, func, args, kwargs):
        q, k, v = args[:3]
        is_causal = bool(args[4]) if len(args) > 4 else bool(kwargs.get("is_causal", False))
        mask = kwargs.get("attn_mask")
        keep = _sdpa_keep(q, k, is_causal, mask)
        index = len(self.calls)
        self.calls.append(AttentionCall(index, "sdpa", mask_pattern(keep.expand(
            *torch.broadcast_shapes(keep.shape, (*q.shape[:-2], q.shape[-2], k.shape[-2])))),
            (*q.shape[:-1], k.shape[-2])))
        extra = self._keep_for(index, (*q.shape[:-1], k.shape[-2]), q.device)
        if extra is None:
            return func(*args, **kwargs)
        # the same attention in plain ops, with the scores restricted
        scale = kwargs.get("scale") or q.shape[-1] ** -0.5
        if k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        s = s.masked_fill(~keep, float("-inf"))
        if mask is not None and mask.dtype != torch.bool:
            s = s + mask.float()
        s = s.masked_fill(~extra, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out = (p @ v.float()).to(q.dtype)
        return out, torch.logsumexp(s, -1)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FUSED:
            return self._fused(func, args, kwargs)
        if func is aten.logsumexp.default:
            return self._logsumexp(func, args, kwargs)
        if func in _SOFTMAX:
            n = self._n
            self._n += 1
            index = self._order.get(n)
            x = args[0]
            seen = self._lse_seen.pop(id(x), None)
            if seen is not None and seen[1] is x:
                self._lse_of[seen[0]] = n
            if index is None and self.keeps:
                # the reference run follows the first run's numbering: softmax n was attention index[n]
                index = self._ref_index.get(n) if hasattr(self, "_ref_index") else None
            if index is not None and index in self.keeps:
                drop = getattr(self, "_ref_dropped", {}).get(n, 0)
                extra = self._keep_for(index, (*x.shape[:-1], x.shape[-1] - drop), x.device)
                if extra is not None and drop:  # sink columns stay attended
                    extra = torch.cat([extra.expand(*x.shape[:-1], x.shape[-1] - drop),
                                       extra.new_ones(*x.shape[:-1], drop)], -1)
                if extra is not None:
                    x = x.masked_fill(~extra, float("-inf"))
                    args = (x, *args[1:])
            out = func(*args, **kwargs)
            self._softmax_outputs[id(out)] = (n, out, out)
            # what the scores mask out (-inf or the dtype's minimum), read from the softmax input: a
            # probability can underflow to 0 for a key that is attended (Gemma 4's unscaled tiny scores)
            self._pending[n] = (x > torch.finfo(x.dtype).min / 2 if x.is_floating_point() else out > 0,
                                tuple(out.shape))
            return out
        out = func(*args, **kwargs)
        name = _op_name(func)
        if func in _MATMUL:
            for a in args[:3]:
                hit = self._softmax_outputs.get(id(a)) if isinstance(a, torch.Tensor) else None
                if hit is not None and hit[0] in self._pending:
                    keep, shape = self._pending.pop(hit[0])
                    index = len(self.calls)
                    self._order[hit[0]] = index
                    self.calls.append(AttentionCall(index, "softmax", mask_pattern(keep) if keep.dim() >= 2
                                                    else "other", shape))
        elif name in _CARRY:
            src = next((self._softmax_outputs[id(a)] for a in args
                        if isinstance(a, torch.Tensor) and id(a) in self._softmax_outputs), None)
            if src is not None and name == "slice" and src[2] is src[1] and src[0] in self._pending:
                self._drop_columns(src[0], src[1], args)
            if src is not None:
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        self._softmax_outputs[id(t)] = (src[0], src[1], t)
        return out


first_tensor = main_output  # the main output of a forward (logits, else the last hidden state)


def _forward(model: torch.nn.Module, inputs: dict[str, Any], args: tuple = ()) -> Any:
    with torch.no_grad():
        return model(*args, **inputs)


def attention_calls(model: torch.nn.Module, inputs: dict[str, Any],
                    args: tuple = ()) -> tuple[list[AttentionCall], torch.Tensor]:
    """The attention computations of ``model(*args, **inputs)`` in execution order, and its main output."""
    mode = _Mode()
    with mode:
        out = _forward(model, inputs, args)
    return mode.calls, first_tensor(out)


def masked_forward(model: torch.nn.Module, inputs: dict[str, Any], keeps: dict[int, Keep],
                   heads: Optional[dict[int, int]] = None) -> torch.Tensor:
    """``model(**inputs)`` with attention ``i``'s scores restricted to ``keeps[i](sq, sk, n_heads)``.

    ``heads[i]`` is attention ``i``'s head count (for per-head keep-masks on ``[B*H, Sq, Sk]`` scores).
    The attention numbering is that of :func:`attention_calls` on the same inputs.
    """
    probe = _Mode()
    with probe:
        _forward(model, inputs)
    mode = _Mode(keeps, heads)
    mode._ref_index = dict(probe._order)  # softmax number -> attention index, from the unmodified run
    mode._ref_dropped = dict(probe._dropped)
    mode._ref_lse_of = dict(probe._lse_of)
    with mode:
        out = _forward(model, inputs)
    return first_tensor(out)
