"""Gradients of ``torch.ops.lcpass.planned_attention``: the derivative of its dense specification.

The planned op runs a method on the block engine or the generated kernels, which have no backward. Its
gradient is that of what it is specified to compute — the method's attention, written densely in plain
PyTorch by :func:`lcpass.verify.specified_output` — taken by one opaque op,
``torch.ops.lcpass.planned_attention_backward``, so torch.compile's joint-graph tracing (AOTAutograd,
which traces a backward whenever a parameter requires grad, even for inference) sees a fake kernel, and
a real backward is exact for static methods. Dynamic methods (their selection is not differentiable) and
dropout (a recompute would draw another mask) refuse a real backward by name.

Example::

    >>> out = torch.ops.lcpass.planned_attention(q, k, v, None, 0.125, True, -1, 0.0, 0.0, "l0", "causal", spec)
    >>> out.sum().backward()          # q.grad: the gradient of the streaming attention written out densely
"""
from __future__ import annotations

from typing import Optional

import torch

from lcpass.lower import planned_attention
from lcpass.verify import specified_output

__all__ = ["planned_attention_backward"]


@torch.library.custom_op("lcpass::planned_attention_backward", mutates_args=())
def planned_attention_backward(
    grad: torch.Tensor,
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
    mask_kind: str,
    spec: str,
    sinks: Optional[torch.Tensor] = None,
    chunk: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if dropout_p > 0:
        raise ValueError(f"lcpass: site {site}: no backward through attention dropout (p={dropout_p}): a "
                         "recompute would draw another mask; train with dropout 0 or the model's own attention")
    args = dict(mask=mask, scale=scale, is_causal=is_causal, window=window, softcap=softcap, dropout_p=0.0,
                site=site, mask_kind=mask_kind, spec=spec, sinks=sinks, chunk=chunk)
    def forward(q_, k_, v_):
        return specified_output(dict(q=q_, k=k_, v=v_, **args))

    try:  # a functional vjp: a custom op's kernel runs below the autograd dispatch key
        out, vjp = torch.func.vjp(forward, q, k, v)
    except ValueError as why:
        raise ValueError(f"lcpass: site {site}: no backward for this plan ({why}); plan the site with a "
                         "static method to train through it") from None
    grads = vjp(grad.to(out.dtype))
    # laid out as the inputs (empty_like keeps their strides), as the fake kernel promises torch.compile
    return tuple(torch.empty_like(t).copy_(g) for g, t in zip(grads, (q, k, v)))  # type: ignore[return-value]


@planned_attention_backward.register_fake
def _backward_fake(grad, q, k, v, mask, scale, is_causal, window, softcap, dropout_p, site, mask_kind, spec,
                   sinks=None, chunk=-1):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, mask, *params = inputs
    sinks = params[8] if len(params) > 8 else None
    ctx.save_for_backward(q, k, v, mask, sinks)
    ctx.params = tuple(params[:8])
    ctx.chunk = params[9] if len(params) > 9 else -1


def _backward(ctx, grad):
    q, k, v, mask, sinks = ctx.saved_tensors
    dq, dk, dv = torch.ops.lcpass.planned_attention_backward(grad, q, k, v, mask, *ctx.params, sinks, ctx.chunk)
    return (dq, dk, dv) + (None,) * 11


planned_attention.register_autograd(_backward, setup_context=_setup)
