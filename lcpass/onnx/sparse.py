"""``com.microsoft.SparseAttention`` for sites whose plan is a block-aligned static layout (opt-in).

``lcpass.export(..., onnx_ops="ort")`` lowers a planned site to onnxruntime's block-sparse contrib op when
the op computes exactly what the planned op does:

* a static method (no content selection), causal, no mask tensor, no softcap, queries and keys of one
  length (prefill), ``head_dim % 8 == 0``, fp32/fp16;
* the site's mask is **block-aligned** for a block size ``b`` in 128, 64, 32, 16: every block of the
  layout is full or empty, except diagonal blocks, which are exactly causal (SparseAttention attends
  whole blocks, then applies causality). S2-Attention with ``block_size`` a multiple of 16 and LongLoRA's
  (shifted) groups of a multiple of 16 are; token-granular windows (StreamingLLM, DuoAttention, dilated)
  are not;
* the mask does not depend on the sequence length, and below the site's crossover (where the planned op
  runs dense) the layout is dense, since the op's layout is fixed.

Any other site keeps the default lowering (an ``lcpass`` function around ONNX ``Attention``), and the
reason is recorded (``ExportResult.notes`` and a warning).

The layout is a constant block CSR for ``max_len`` keys (the model's position limit): ``block_row_indices
[L, max_len / b + 1]``, ``block_col_indices [L, nnz]`` (-1 padded), one layout per head or one shared
(``L`` divides the head count; head h uses layout ``h % L``).

**KV buffers.** On the CPU the op only runs when its ``past_key``/``present_key`` (and value) share one
buffer: each such site adds graph inputs ``past_key.<i>``, ``past_value.<i>`` of shape ``[B, Hkv, N, D]``
(``N`` >= the sequence length) and outputs ``present_key.<i>``, ``present_value.<i>``, which must be bound
to the same memory with IOBinding; :func:`run_with_kv_buffers` does that. A plain ``session.run`` fails
with ``past_key->DataRaw() == present_key->DataRaw() ... was false``.

Example::

    >>> res = lcpass.export(model, {"input_ids": ids}, "m.onnx", method="s2", block_size=16, local_blocks=2,
    ...                     vert_stride=2, dense_below=0, onnx_ops="ort")
    >>> sess = ort.InferenceSession("m.onnx")
    >>> logits = run_with_kv_buffers(sess, {"input_ids": ids.numpy()})[0]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

from lcpass.layout import build_layout
from lcpass.lower import crossover
from lcpass.onnx.common import DOMAIN, MS_DOMAIN, OPSET, AttentionFunction, Body, ONNXExportError, long_mask
from lcpass.onnx.dynamic import dynamic_method

__all__ = ["BLOCK_SIZES", "SparseLayout", "sparse_layout", "sparse_function_proto", "add_kv_buffers",
           "run_with_kv_buffers", "KV_INPUTS"]

BLOCK_SIZES = (128, 64, 32, 16)  # what SparseAttention accepts, largest (fewest blocks) first
KV_INPUTS = ("past_key", "past_value")
KV_OUTPUTS = ("present_key", "present_value")


@dataclass(frozen=True)
class SparseLayout:
    """Block CSR of one site for SparseAttention: ``rows [L, M+1]``, ``cols [L, nnz]`` (int32)."""

    block: int
    rows: np.ndarray
    cols: np.ndarray


def _block_aligned(mask, n_heads: int, length: int, block: int, cross: int) -> Optional[str]:
    """None when ``mask`` is whole blocks + causal diagonal blocks at ``block``; else why not."""
    import torch


    part, full = (m[0] for m in build_layout(mask, n_heads, length, length, block).block_maps())  # [H, M, M]
    m = part.shape[-1]
    diag = torch.eye(m, dtype=torch.bool)
    off = part & ~diag
    if bool(off.any()):
        h, r, c = (int(x) for x in off.nonzero()[0])
        return f"head {h}: key block {c} of query block {r} is partly masked"
    idx = torch.arange(m).view(1, m, 1, 1) * block
    qq = idx + torch.arange(block).view(1, 1, block, 1)
    kk = idx + torch.arange(block).view(1, 1, 1, block)
    hh = torch.arange(n_heads).view(n_heads, 1, 1, 1)
    val = mask(torch.zeros((), dtype=torch.long), hh, qq, kk).expand(n_heads, m, block, block)
    d = torch.diagonal(part | full, dim1=1, dim2=2)  # [H, M]
    bad = (val != (kk <= qq)).flatten(2).any(-1) | ~d
    if bool(bad.any()):
        h, r = (int(x) for x in bad.nonzero()[0])
        return f"head {h}: the diagonal block {r} is not exactly causal"
    if cross > 0:  # lengths below the crossover run dense: the block rows they reach must be dense
        rows = max(0, min(m, (cross - 2) // block + 1))
        dense = torch.tril(torch.ones(m, m, dtype=torch.bool))
        if rows and not bool(((part | full)[:, :rows] == dense[:rows]).all()):
            return (f"below its crossover ({cross} keys) the site runs dense, but the fixed layout is sparse "
                    f"there; pass dense_below=0 (or a crossover below which the layout is dense)")
    return None


def _csr(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block maps [L, M, M] (lower triangle) -> (rows [L, M+1], cols [L, nnz]) int32, -1 padded."""
    n, m, _ = maps.shape
    rows = np.zeros((n, m + 1), np.int32)
    rows[:, 1:] = np.cumsum(maps.sum(-1), -1)
    cols = [np.nonzero(maps[i])[1].astype(np.int32) for i in range(n)]
    width = max(1, max(len(c) for c in cols))
    out = np.full((n, width), -1, np.int32)
    for i, c in enumerate(cols):
        out[i, :len(c)] = c
    return rows, out


def sparse_layout(fn: AttentionFunction, max_len: int) -> tuple[Optional[SparseLayout], str]:
    """The site's SparseAttention layout for ``max_len`` keys, or (None, why it does not apply)."""

    checks = [
        (not fn.planned, "dense site"),
        (dynamic_method(fn) is not None, "a dynamic method selects by content (no fixed layout)"),
        (fn.mask != "none", f"the site has a mask tensor ({fn.mask_kind})"),
        (not fn.is_causal, "not causal (SparseAttention is unidirectional)"),
        (fn.window >= 0, f"the site has its own sliding window ({fn.window})"),
        (fn.chunk >= 1, f"the site has its own chunks ({fn.chunk})"),
        (bool(fn.softcap), "softcap"),
        (not fn.same_len, "queries and keys differ in length"),
        (fn.head_dim % 8 != 0, f"head_dim={fn.head_dim} is not a multiple of 8"),
        (fn.n_heads % fn.n_kv_heads != 0, "KV heads do not divide the query heads"),
        (max_len < 1, "no maximum sequence length"),
    ]
    for failed, why in checks:
        if failed:
            return None, why
    try:
        mask = long_mask(fn)
    except ONNXExportError as exc:
        return None, str(exc)
    cross = crossover(fn.spec, fn.n_heads)
    why = ""  # the reason at the smallest block size
    for block in BLOCK_SIZES:
        length = -(-max_len // block) * block
        reason = _block_aligned(mask, fn.n_heads, length, block, cross)
        if reason is None:
            return _layout(mask, fn.n_heads, length, block), ""
        if "crossover" in reason:
            return None, reason
        why = f"not block-aligned at any block size {BLOCK_SIZES} (at {block}: {reason})"
    return None, why


def _layout(mask, n_heads: int, length: int, block: int) -> SparseLayout:

    part, full = (m[0] for m in build_layout(mask, n_heads, length, length, block).block_maps())
    maps = (part | full).numpy()  # [H, M, M]
    period = next(p for p in range(1, n_heads + 1)
                  if n_heads % p == 0 and all((maps[h] == maps[h % p]).all() for h in range(n_heads)))
    rows, cols = _csr(maps[:period])
    return SparseLayout(block, rows, cols)


def sparse_function_proto(fn: AttentionFunction, layout: SparseLayout, doc: str) -> onnx.FunctionProto:
    """``lcpass`` function (q, k, v, past_key, past_value) -> (y, present_key, present_value)."""

    body = Body()

    def to3(x: str) -> str:  # [B, H, S, D] -> [B, S, H*D]
        return body.op("Reshape", body.op("Transpose", x, perm=[0, 2, 1, 3]), body.const([0, 0, -1]))

    sk = body.op("Shape", "k", start=2, end=3)  # [1]
    total = body.op("Cast", body.op("Squeeze", sk), to=TensorProto.INT32)
    lens = body.op("Expand", body.op("Cast", sk, to=TensorProto.INT32), body.op("Shape", "q", start=0, end=1))
    rows = body.const(layout.rows, np.int32)
    cols = body.const(layout.cols, np.int32)
    y3 = body._fresh("y3")
    body.nodes.append(helper.make_node(
        "SparseAttention", [to3("q"), to3("k"), to3("v"), *KV_INPUTS, rows, cols, total, lens],
        [y3, *KV_OUTPUTS], domain=MS_DOMAIN, num_heads=fn.n_heads, kv_num_heads=fn.n_kv_heads,
        scale=float(fn.scale), sparse_block_size=layout.block))
    y4 = body.op("Reshape", y3, body.const([0, 0, fn.n_heads, fn.head_dim]))
    body.nodes.append(helper.make_node("Transpose", [y4], ["y"], perm=[0, 2, 1, 3]))
    return helper.make_function(DOMAIN, fn.name, ["q", "k", "v", *KV_INPUTS], ["y", *KV_OUTPUTS], body.nodes,
                                [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                                doc_string=doc)


def add_kv_buffers(model: onnx.ModelProto, sparse: dict[str, AttentionFunction]) -> list[str]:
    """Give every call of a SparseAttention function its KV buffer inputs/outputs (graph order)."""

    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    added: list[str] = []
    i = 0
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type not in sparse:
            continue
        fn = sparse[node.op_type]
        dtype = types.get(node.input[0]) or TensorProto.FLOAT
        shape = ["batch", fn.n_kv_heads, "kv_buffer", fn.head_dim]
        names_in = [f"{n}.{i}" for n in KV_INPUTS]
        names_out = [f"{n}.{i}" for n in KV_OUTPUTS]
        node.input.extend(names_in)
        node.output.extend(names_out)
        model.graph.input.extend(helper.make_tensor_value_info(n, dtype, shape) for n in names_in)
        model.graph.output.extend(helper.make_tensor_value_info(n, dtype, shape) for n in names_out)
        added += names_in
        i += 1
    return added


def run_with_kv_buffers(session: Any, feeds: dict[str, np.ndarray], kv_len: Optional[int] = None) -> list:
    """Run an ``onnx_ops="ort"`` model: each ``past_*.<i>`` input and its ``present_*.<i>`` output are bound
    to one zero-initialised buffer of ``kv_len`` positions (default: the longest dim 1 among ``feeds``).

    Returns the model's other outputs, in order, as numpy arrays (like ``session.run(None, feeds)``).
    """
    import onnxruntime as ort  # lazy: onnxruntime is optional (export extra); only running a model needs it

    batch = next(iter(feeds.values())).shape[0]
    n = kv_len or max(a.shape[1] for a in feeds.values() if a.ndim > 1)
    io = session.io_binding()
    for name, value in feeds.items():
        io.bind_cpu_input(name, value)
    bound: list[str] = []  # output names in binding order (copy_outputs_to_cpu returns them so)
    buffers = []
    for inp in session.get_inputs():
        if inp.name.split(".")[0] not in KV_INPUTS:
            continue
        _, hkv, _, d = inp.shape
        dtype = np.float16 if "float16" in inp.type else np.float32
        buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, hkv, n, d), dtype))
        present = inp.name.replace("past_", "present_", 1)
        io.bind_ortvalue_input(inp.name, buf)
        io.bind_ortvalue_output(present, buf)
        buffers.append(buf)
        bound.append(present)
    outs = [o.name for o in session.get_outputs() if o.name.split(".")[0] not in KV_OUTPUTS]
    for name in outs:
        io.bind_output(name)
        bound.append(name)
    session.run_with_iobinding(io)
    values = io.copy_outputs_to_cpu()
    return [values[bound.index(o)] for o in outs]
