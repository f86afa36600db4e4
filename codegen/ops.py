"""The generated kernels as custom ops (``torch.library.triton_op`` + ``wrap_triton``).

Three ops in the ``lcpass_codegen`` namespace, one per algorithm; the generated kernel module is
named by its spec key (a string argument), so a single op serves every spec and torch.compile /
torch.export see one node per call (with a fake implementation for shape propagation)::

    lcpass_codegen::sparse_attention(q, k, v, kv_num, kv_idx, full_num, full_idx, tables, scale,
                                     key, bwd_key, kv_keep, sinks) -> (out, lse)   # autograd: bwd_key
    lcpass_codegen::sparse_attention_bwd(q, k, v, out, dout, lse, kv_num, kv_idx, full_num,
                                         full_idx, tables, scale, key, kv_keep) -> (dq, dk, dv)
    lcpass_codegen::sparse_decode(q, k, v, full_num, full_idx, part_num, part_idx, part_member,
                                  part_fullbits, tables, scale, key, n_splits, kv_keep, sinks) -> out

``kv_keep`` is ``Bool[B, Sk]`` (True = real key) or an EMPTY tensor for none; ``sinks`` is
``Float[B, Hq, Sq]`` (one logit per row that attends nothing: learned attention sinks) or an EMPTY
tensor for none (ops take no optional tensors so their autograd structure is fixed). The sinks'
gradient is ``-exp(sink - lse) * rowsum(dout * out)``: the sink's value is zero.

Import this module (``import lcpass.codegen.ops``) before ``torch.export.load`` of a program that
uses them. Kernels are loaded with :func:`lcpass.codegen.cache.load_by_key`, from this process's
memory or the on-disk cache.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from lcpass.codegen import launch
from lcpass.codegen.cache import load_by_key

__all__ = ["sparse_attention", "sparse_attention_bwd", "sparse_decode"]


@triton_op("lcpass_codegen::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_num: Tensor, kv_idx: Tensor,
                     full_num: Tensor, full_idx: Tensor, tables: list[Tensor], scale: float,
                     key: str, bwd_key: str, kv_keep: Tensor, sinks: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """Block-sparse forward with the generated kernel ``key``; returns ``(out, lse)`` (lse in log2
    units, ``[B, Hq, Sq]`` fp32). ``bwd_key`` names the backward kernel ("" = not differentiable);
    ``kv_keep: Bool[B, Sk]`` masks padded keys; ``sinks: Float[B, Hq, Sq]`` learned sink logits."""
    return launch.fwd(load_by_key(key), q, k, v, kv_num, kv_idx, full_num, full_idx, tables, scale,
                      store_lse=bool(bwd_key), wrap=_traced(q), kv_keep=kv_keep, sinks=sinks)


def _traced(t: Tensor) -> bool:
    """True while torch.compile / export trace the op body (launch through wrap_triton then);
    eager calls launch the kernel directly (less host overhead per decode step)."""
    return type(t) is not torch.Tensor or torch.compiler.is_compiling()


@sparse_attention.register_fake
def _(q, k, v, kv_num, kv_idx, full_num, full_idx, tables, scale, key, bwd_key, kv_keep, sinks):
    B, Hq, Sq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, Sq) if bwd_key else (1,), dtype=torch.float32)


@triton_op("lcpass_codegen::sparse_attention_bwd", mutates_args=())
def sparse_attention_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
                         kv_num: Tensor, kv_idx: Tensor, full_num: Tensor, full_idx: Tensor,
                         tables: list[Tensor], scale: float, key: str,
                         kv_keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv with the generated backward kernel ``key`` (transposed lists built here)."""
    fwd_lists = (kv_num, kv_idx, full_num, full_idx)
    bwd_lists = launch.csr_transpose(*fwd_lists, kv_num.shape[-1])
    return launch.bwd(load_by_key(key), q, k, v, out, dout, lse, fwd_lists, bwd_lists, tables, scale,
                      wrap=_traced(q), kv_keep=kv_keep)


@sparse_attention_bwd.register_fake
def _(q, k, v, out, dout, lse, kv_num, kv_idx, full_num, full_idx, tables, scale, key, kv_keep):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output) -> None:
    q, k, v, kv_num, kv_idx, full_num, full_idx, tables, scale, key, bwd_key, kv_keep, sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_num, kv_idx, full_num, full_idx, kv_keep, sinks, *tables)
    ctx.scale = scale
    ctx.bwd_key = bwd_key
    ctx.n_tables = len(tables)


def _backward(ctx, dout, dlse):
    if not ctx.bwd_key:
        raise RuntimeError("lcpass_codegen::sparse_attention was called without a backward kernel "
                           "(bwd_key=''); call lcpass.codegen.attention with inputs that require grad")
    q, k, v, out, lse, kv_num, kv_idx, full_num, full_idx, kv_keep, sinks, *tables = ctx.saved_tensors
    dq, dk, dv = torch.ops.lcpass_codegen.sparse_attention_bwd(
        q, k, v, out, dout, lse, kv_num, kv_idx, full_num, full_idx, tables, ctx.scale, ctx.bwd_key,
        kv_keep)
    dsinks = None
    if sinks.numel() and ctx.needs_input_grad[-1]:
        # the sink is one more logit with a zero value: d sink = p_sink * (0 - rowsum(dout * out))
        p_sink = torch.exp2(sinks.float() * 1.4426950408889634 - lse)
        dsinks = (-p_sink * (dout.float() * out.float()).sum(-1)).to(sinks.dtype)
    return dq, dk, dv, None, None, None, None, [None] * ctx.n_tables, None, None, None, None, dsinks


sparse_attention.register_autograd(_backward, setup_context=_setup)


@triton_op("lcpass_codegen::sparse_decode", mutates_args=())
def sparse_decode(q: Tensor, k: Tensor, v: Tensor, full_num: Tensor, full_idx: Tensor,
                  part_num: Tensor, part_idx: Tensor, part_member: Tensor, part_fullbits: Tensor,
                  tables: list[Tensor], scale: float, key: str, n_splits: int,
                  kv_keep: Tensor, sinks: Tensor) -> Tensor:
    """Split-KV decode with the generated kernel ``key`` over per-KV-head block lists."""
    lists = (full_num, full_idx, part_num, part_idx, part_member, part_fullbits)
    return launch.decode(load_by_key(key), q, k, v, lists, tables, scale, n_splits, wrap=_traced(q),
                         kv_keep=kv_keep, sinks=sinks)


@sparse_decode.register_fake
def _(q, k, v, full_num, full_idx, part_num, part_idx, part_member, part_fullbits, tables, scale,
      key, n_splits, kv_keep, sinks):
    return torch.empty_like(q)
