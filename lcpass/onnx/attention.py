"""ONNX lowering of lcpass attention ops: one model-local function per distinct site configuration.

``torch.onnx.export(..., dynamo=True, custom_translation_table=translation_table(fns))`` turns each
``torch.ops.lcpass.planned_attention`` / ``torch.ops.lcpass.attention`` node into ONE node of the ``lcpass``
domain (``lcpass.attention_<hash>(q, k, v[, mask])``); :func:`attach_functions` then appends the
functions' bodies to the model (the exporter inlines local functions, so they are attached after
export). A body is either

* ``Attention`` (opset 23) with the method's mask built in-graph from positions: ``Range`` over the
  query/key positions and the mask's own ``mask_mod`` traced and emitted op by op
  (:mod:`lcpass.onnx.maskmod`, the trace the Triton printer reads; per-head parameters gathered by a head
  index, a ``[H, Sq, Sk]`` computation); the mask switches to
  the site's own below the method's crossover length, exactly as the planned op does; or
* ``com.microsoft.GroupQueryAttention`` with ``local_window_size`` when every head is a pure causal
  sliding window at every length (no sinks, no mask tensor), which onnxruntime runs natively; or
* for the block top-k dynamic methods (Quest, Landmark, the training-free SeerAttention gate), ``Attention``
  with the method's selection computed in standard ops as a bool mask (:mod:`lcpass.onnx.dynamic`); or
* with ``onnx_ops="ort"``, ``com.microsoft.SparseAttention`` for block-aligned static layouts, the function
  then taking and returning KV buffers (:mod:`lcpass.onnx.sparse`).

Example::

    >>> fns: dict[str, AttentionFunction] = {}
    >>> prog = torch.onnx.export(ep, dynamo=True, opset_version=23,
    ...                          custom_translation_table=translation_table(fns))
    >>> attach_functions(prog.model_proto, fns)
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Any, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

from lcpass.lower import crossover as _crossover
from lcpass.lower import checked_claim, lowering_kind, site_mask
from lcpass.onnx.common import (DOMAIN, MS_DOMAIN, OPSET, AttentionFunction, Body, ONNXExportError, base_mask,
                                long_mask, simplify_mask)
from lcpass.onnx.dynamic import check_state, dynamic_method, emit_dynamic_mask
from lcpass.onnx.maskmod import emit_mask_mod
from lcpass.onnx.sparse import add_kv_buffers, sparse_function_proto, sparse_layout as _sparse_layout_of
from lcpass.patterns.maskinfo import NEG_LIMIT  # a fill at or below this masks a key out

__all__ = ["translation_table", "attach_functions", "function_proto", "pure_sliding_window", "precheck"]


def pure_sliding_window(fn: AttentionFunction) -> Optional[int]:
    """The window W when every head is a causal sliding window of W keys at every length, else None
    (what ``com.microsoft.GroupQueryAttention(local_window_size=W)`` expresses)."""
    if fn.sinks or fn.chunk >= 1:
        return None
    if fn.mask != "none" or not fn.same_len or fn.n_heads % fn.n_kv_heads:
        return None
    short = simplify_mask(base_mask(fn.is_causal, fn.window))
    if not fn.planned:
        return short[1] if short[0] == "sliding" else None
    if dynamic_method(fn) is not None:
        return None
    long = simplify_mask(long_mask(fn))
    if long[0] != "sliding":
        return None
    cross = _crossover(fn.spec, fn.n_heads)
    # below the crossover the op runs the site's own mask; equal when the window covers every such length
    if short == long or (short == ("causal",) and cross <= long[1] + 1):
        return long[1]
    return None


def _select(body: Body, cond: str, a: str, b: str) -> str:
    """``cond ? a : b`` on bools (onnxruntime's CPU Where has no bool kernel)."""
    return body.op("Or", body.op("And", cond, a), body.op("And", body.op("Not", cond), b))


def _and(body: Body, a: Optional[str], b: Optional[str]) -> Optional[str]:
    if a is None or b is None:
        return a if b is None else b
    return body.op("And", a, b)


# ------------------------------------------------------------------------------------ function bodies


def function_proto(fn: AttentionFunction) -> onnx.FunctionProto:
    """The ``lcpass`` function body for one site configuration (see the module docstring)."""
    body = Body()
    inputs = ["q", "k", "v"] + (["mask"] if fn.mask != "none" else []) + (["sinks"] if fn.sinks else [])
    doc = (f"lcpass {'planned' if fn.planned else 'canonical'} attention: {fn.spec or 'exact'}; scale={fn.scale}, "
           f"is_causal={fn.is_causal}, window={fn.window}, chunk={fn.chunk}, softcap={fn.softcap}, mask={fn.mask} ({fn.mask_kind})")
    layout = sparse_layout(fn) if fn.ort_max_len else None
    if layout is not None:
        return sparse_function_proto(fn, layout, doc)
    w = pure_sliding_window(fn)
    imports = [helper.make_opsetid("", OPSET)]
    if w is not None:
        _gqa_body(body, fn, w)
        imports.append(helper.make_opsetid(MS_DOMAIN, 1))
    else:
        _attention_body(body, fn)
    return helper.make_function(DOMAIN, fn.name, inputs, ["y"], body.nodes, imports, doc_string=doc)


def _positions(body: Body) -> tuple[str, str, str, str]:
    """q positions [1,1,Sq,1] (absolute: Sk - Sq + i), kv positions [1,1,1,Sk], and Sq, Sk scalars."""
    sq = body.op("Squeeze", body.op("Shape", "q", start=2, end=3))
    sk = body.op("Squeeze", body.op("Shape", "k", start=2, end=3))
    one = body.const(1)
    qpos = body.op("Range", body.op("Sub", sk, sq), sk, one)
    kvpos = body.op("Range", body.const(0), sk, one)
    return (body.op("Unsqueeze", qpos, body.const([0, 1, 3])), body.op("Unsqueeze", kvpos, body.const([0, 1, 2])),
            sq, sk)


def _chunk_start(body: Body, fn: AttentionFunction) -> str:
    """Each batch row's first key some query attends ([B|1, 1, 1, 1]; 0 without a mask): where the row's
    chunks begin (``lcpass.patterns.op.chunk_start``)."""
    if fn.mask == "none":
        return body.const(0)
    valid = "mask" if fn.mask == "bool" else body.op(
        "Greater", "mask", body.op("CastLike", body.const(NEG_LIMIT, np.float32), "mask"))
    seen = body.op("ReduceMax", body.op("Cast", valid, to=TensorProto.INT64), body.const([1, 2]), keepdims=1)
    return body.op("ArgMax", seen, axis=3, keepdims=1)


def _chunk_keep(body: Body, chunk: int, q: str, kv: str, start: str) -> Optional[str]:
    """``(kv - start) // chunk == (q - start) // chunk`` (floor division: both sides are shifted by one
    large multiple of the chunk first, as ONNX's integer Div truncates)."""
    if chunk < 1:
        return None
    c, big = body.const(chunk), body.const(chunk * -(-(1 << 40) // chunk))
    def index(pos: str) -> str:
        return body.op("Div", body.op("Add", body.op("Sub", pos, start), big), c)
    return body.op("Equal", index(q), index(kv))


def _attention_body(body: Body, fn: AttentionFunction) -> None:
    q, kv, _sq, sk = _positions(body)
    h = body.const(np.arange(fn.n_heads, dtype=np.int64).reshape(1, fn.n_heads, 1, 1))
    bool_mask = "mask" if fn.mask == "bool" else None
    start = _chunk_start(body, fn) if fn.chunk >= 1 or (fn.planned and fn.mask != "none") else None
    # the exact path (canonical op; planned op below its crossover): the site's own mask + the mask tensor
    keep = _and(body, emit_mask_mod(body, base_mask(fn.is_causal, fn.window), h, q, kv), bool_mask)
    keep = _and(body, _chunk_keep(body, fn.chunk, q, kv, start), keep) if fn.chunk >= 1 else keep
    bias = "mask" if fn.mask == "float" else None  # a float mask is added to the scores
    violated = None  # a checked claim that the run-time mask breaks: the exact path, as planned_attention runs
    if fn.planned:
        short, short_bias = keep, bias
        claim = checked_claim(fn.mask_kind) if fn.mask != "none" else None
        if claim is not None:
            user = bool_mask or body.op("Greater", "mask", body.op("CastLike", body.const(NEG_LIMIT, np.float32),
                                                                   "mask"))
            form = _and(body, emit_mask_mod(body, base_mask(*claim[:2]), h, q, kv),
                        _chunk_keep(body, claim[2], q, kv, start))
            hidden = body.op("Not", form)
            violated = body.op("Cast", body.op("ReduceMax", body.op("Cast", body.op("And", user, hidden),
                                                                    to=TensorProto.INT64), keepdims=0),
                               to=TensorProto.BOOL)
            # the method's mask with the claim imposed
            fn = replace(fn, is_causal=claim[0], window=claim[1], chunk=claim[2])
        sparse = fn.mask == "none" or lowering_kind(fn.mask_kind) == "sparse"
        dynamic = dynamic_method(fn)
        if dynamic is not None:
            # content selection on plain causal attention without a mask tensor (dynamic_method refuses
            # padding); anything else runs exactly dense at every length, as planned_attention does
            if fn.is_causal and fn.window < 0 and fn.chunk < 1 and not fn.softcap and fn.mask == "none" \
                    and not fn.sinks:
                long = emit_dynamic_mask(body, fn, dynamic[0], dynamic[1], q, kv, _sq, sk)
            else:
                long = short
            long_bias = short_bias
        elif fn.mask != "none" and sparse:
            # padding: a key is valid when any query (of any head) may attend it; when every row's real keys
            # are one contiguous run [p, e), the row runs alone on it (positions count from p, queries outside
            # [p, e) output zeros), as lcpass.lower does; otherwise keys are masked at absolute positions
            valid = bool_mask or body.op("Greater", "mask", body.op("CastLike", body.const(NEG_LIMIT, np.float32),
                                                                      "mask"))
            kv_int = body.op("ReduceMax", body.op("Cast", valid, to=TensorProto.INT64), body.const([1, 2]),
                             keepdims=1)  # [B|1, 1, 1, Sk]
            kv_keep = body.op("Cast", kv_int, to=TensorProto.BOOL)
            first = start  # [B|1, 1, 1, 1]: the row's first valid key (_chunk_start)
            end = body.op("Add", first, body.op("ReduceSum", kv_int, body.const([3]), keepdims=1))
            run = body.op("And", body.op("GreaterOrEqual", kv, first), body.op("Less", kv, end))
            contiguous = body.op("Cast", body.op("ReduceMin", body.op("Cast", body.op("Equal", run, kv_keep),
                                                                      to=TensorProto.INT64), keepdims=0),
                                 to=TensorProto.BOOL)
            offset = body.op("Where", contiguous, first, body.const(0))
            q_in_run = body.op("And", body.op("GreaterOrEqual", q, first), body.op("Less", q, end))
            q_valid = body.op("Or", q_in_run, body.op("Not", contiguous))
            q_run, kv_run = body.op("Sub", q, offset), body.op("Sub", kv, offset)
            long = _and(body, emit_mask_mod(body, long_mask(fn), h, q_run, kv_run), kv_keep)
            long = _and(body, long, q_valid)
            if fn.chunk >= 1:  # chunks count from the run's first key; other padding runs the exact path
                long = _and(body, long, _chunk_keep(body, fn.chunk, q_run, kv_run, body.const(0)))
                scattered = body.op("Not", contiguous)
                violated = scattered if violated is None else body.op("Or", violated, scattered)
            long_bias = None
        else:
            # no mask, or a bias / unnamed pattern: the method's mask on absolute positions, the tensor kept
            # (chunks from each row's first attended key)
            long = _and(body, emit_mask_mod(body, long_mask(fn), h, q, kv), bool_mask)
            if fn.chunk >= 1:
                long = _and(body, long, _chunk_keep(body, fn.chunk, q, kv, start if fn.mask != "none"
                                                    else body.const(0)))
            long_bias = bias
        cross = _crossover(fn.spec, fn.n_heads)
        if cross <= 0 and violated is None:
            keep, bias = long, long_bias
        else:
            below = body.op("Less", sk, body.const(max(cross, 0)))
            below = below if violated is None else body.op("Or", below, violated)
            true = body.const(True, np.bool_)
            keep = None if short is None and long is None else _select(body, below, short or true, long or true)
            if short_bias is None and long_bias is None:
                bias = None
            elif short_bias == long_bias:
                bias = short_bias
            else:  # only the exact path adds the float mask
                zero = body.op("CastLike", body.const(0.0, np.float32), "q")
                bias = body.op("Where", below, short_bias or zero, long_bias or zero)
    attn_mask = keep
    if bias is not None:
        neg = body.op("CastLike", body.const(float("-inf"), np.float32), "q")
        attn_mask = bias if keep is None else body.op("Where", keep, body.op("CastLike", bias, "q"), neg)
    attrs: dict[str, Any] = {"scale": float(fn.scale), "is_causal": 0}
    if fn.softcap:
        attrs["softcap"] = float(fn.softcap)
    qkv = _with_sink_key(body, fn) if fn.sinks else ["q", "k", "v"]
    if fn.sinks and attn_mask is not None:  # the sink key is seen by every row, and adds no bias
        pad = body.const(True, np.bool_) if attn_mask == keep and bias is None else body.op(
            "CastLike", body.const(0.0, np.float32), attn_mask)
        attn_mask = body.op("Pad", attn_mask, body.const([0, 1]), pad, body.const([-1]))
    if attn_mask is not None:  # onnxruntime's Attention broadcasts no mask over the query axis ([B, 1, 1, Sk])
        full = body.op("Concat", body.const([1, 1]), body.op("Shape", qkv[0], start=2, end=3),
                       body.op("Shape", qkv[1], start=2, end=3), axis=0)
        attn_mask = body.op("Expand", attn_mask, full)
    ins = qkv + ([attn_mask] if attn_mask is not None else [])
    y = body.op("Attention", *ins, **attrs)
    if keep is None:
        body.nodes.append(helper.make_node("Identity", [y], ["y"]))
        return
    # rows that see no key output zeros (as the reference and the engine do)
    any_key = body.op("Cast", body.op("ReduceMax", body.op("Cast", keep, to=TensorProto.INT64), body.const([-1]),
                                      keepdims=1), to=TensorProto.BOOL)
    body.nodes.append(helper.make_node("Where", [any_key, y, body.op("CastLike", body.const(0.0, np.float32), y)],
                                       ["y"]))


def _with_sink_key(body: Body, fn: AttentionFunction) -> list[str]:
    """q, k, v with one more key whose score is each row's sink logit and whose value is zero: q gains a
    column sink / scale, k a zero column, and a last key row (0, ..., 0, 1); v a zero row. The row's
    softmax then has the sink logit in its denominator and nothing in its numerator, as gpt-oss computes."""
    if fn.softcap:
        raise ONNXExportError("learned sinks with a softcap have no ONNX form in lcpass yet (the cap would apply "
                              "to the sink logit)")
    zero = body.op("CastLike", body.const(0.0, np.float32), "q")
    one = body.op("CastLike", body.const(1.0, np.float32), "q")
    rows = body.op("Concat", body.op("Shape", "q", start=0, end=3), body.const([1]), axis=0)  # [B, Hq, Sq, 1]
    column = body.op("Div", body.op("Expand", body.op("CastLike", "sinks", "q"), rows),
                     body.op("CastLike", body.const(float(fn.scale), np.float32), "q"))
    q = body.op("Concat", "q", column, axis=-1)
    first = body.op("Slice", "k", body.const([0]), body.const([1]), body.const([3]))  # [B, Hkv, Sk, 1]
    k = body.op("Concat", "k", body.op("Mul", first, zero), axis=-1)  # [B, Hkv, Sk, D + 1]
    row = body.op("Slice", k, body.const([0]), body.const([1]), body.const([2]))  # [B, Hkv, 1, D + 1]
    last = body.op("Slice", row, body.const([-1]), body.const([2 ** 62]), body.const([3]))
    sink_key = body.op("Concat", body.op("Mul", body.op("Slice", row, body.const([0]), body.const([-1]),
                                                        body.const([3])), zero),
                       body.op("Add", body.op("Mul", last, zero), one), axis=-1)
    k = body.op("Concat", k, sink_key, axis=2)
    vrow = body.op("Slice", "v", body.const([0]), body.const([1]), body.const([2]))
    v = body.op("Concat", "v", body.op("Mul", vrow, zero), axis=2)
    return [q, k, v]


def _gqa_body(body: Body, fn: AttentionFunction, window: int) -> None:
    """com.microsoft.GroupQueryAttention on [B, S, H*D] with local_window_size = window."""
    def to3(x: str) -> str:  # [B, H, S, D] -> [B, S, H*D]
        return body.op("Reshape", body.op("Transpose", x, perm=[0, 2, 1, 3]), body.const([0, 0, -1]))

    sk = body.op("Shape", "k", start=2, end=3)  # [1]
    batch = body.op("Shape", "q", start=0, end=1)
    seqlens = body.op("Expand", body.op("Cast", body.op("Sub", sk, body.const([1])), to=TensorProto.INT32), batch)
    total = body.op("Cast", body.op("Squeeze", sk), to=TensorProto.INT32)
    attrs: dict[str, Any] = {"num_heads": fn.n_heads, "kv_num_heads": fn.n_kv_heads, "scale": float(fn.scale),
                             "local_window_size": int(window)}
    if fn.softcap:
        attrs["softcap"] = float(fn.softcap)
    out = body.op("GroupQueryAttention", to3("q"), to3("k"), to3("v"), "", "", seqlens, total, domain=MS_DOMAIN,
                  **attrs)
    y4 = body.op("Reshape", out, body.const([0, 0, fn.n_heads, fn.head_dim]))
    body.nodes.append(helper.make_node("Transpose", [y4], ["y"], perm=[0, 2, 1, 3]))


# ------------------------------------------------------------------------------------ exporter glue


def _schema(name: str, with_mask: bool, with_sinks: bool = False) -> onnx.defs.OpSchema:
    FP = onnx.defs.OpSchema.FormalParameter
    inputs = [FP("q", "T"), FP("k", "T"), FP("v", "T")] + ([FP("mask", "M")] if with_mask else []) + (
        [FP("sinks", "S")] if with_sinks else [])
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    return onnx.defs.OpSchema(name, DOMAIN, 1, inputs=inputs, outputs=[FP("y", "T")],
                              type_constraints=[("T", floats, "q, k, v, y"), ("M", floats + ["tensor(bool)"], "mask"),
                                                ("S", floats, "sinks")])


def _static(dim: Any, what: str, site: str) -> int:
    if not isinstance(dim, int):
        raise ONNXExportError(f"site {site}: {what} is symbolic ({dim}); lcpass ONNX functions need a static count")
    return dim


@lru_cache(maxsize=256)
def _sparse(fn: AttentionFunction) -> tuple[Any, str]:
    return _sparse_layout_of(fn, fn.ort_max_len)


def sparse_layout(fn: AttentionFunction) -> Any:
    """The site's :class:`lcpass.onnx.sparse.SparseLayout` under ``onnx_ops="ort"``, else None."""
    return _sparse(fn)[0] if fn.ort_max_len else None


def translation_table(functions: dict[str, AttentionFunction], ort_max_len: int = 0,
                      notes: Optional[dict[str, str]] = None) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``; fills ``functions`` (name -> config).

    ``ort_max_len > 0`` (``onnx_ops="ort"``): planned sites with a block-aligned static layout of that many
    keys lower to ``com.microsoft.SparseAttention``; ``notes`` receives, per other planned site, why not.
    """
    import torch
    from onnxscript import values  # lazy: onnxscript is optional (export extra) and slow to import; only this needs it

    opset = values.Opset(DOMAIN, 1)

    def emit(planned: bool, q, k, v, mask, scale, is_causal, window, softcap, site, mask_kind, spec, sinks=None,
             chunk=-1):
        q_shape, k_shape = q.shape, k.shape
        mtype = "none" if mask is None else ("bool" if str(mask.dtype).upper().endswith("BOOL") else "float")
        fn = AttentionFunction(
            planned, _static(q_shape[1], "the query head count", site), _static(k_shape[1], "the KV head count", site),
            _static(q_shape[3], "head_dim", site), float(scale), bool(is_causal), int(window), float(softcap), mtype,
            mask_kind if planned else "", spec if planned else "", q_shape[2] == k_shape[2],
            (q_shape[2], k_shape[2]) if isinstance(q_shape[2], int) and isinstance(k_shape[2], int) else (),
            ort_max_len if planned and sinks is None else 0, sinks is not None, int(chunk))
        if planned and sinks is not None and ort_max_len and notes is not None:
            notes[site] = "learned sinks: the site keeps the standard Attention lowering"
        if fn.ort_max_len and sparse_layout(fn) is None:
            if notes is not None:
                notes[site] = _sparse(fn)[1]
            fn = replace(fn, ort_max_len=0)
        function_proto(fn)  # fail now (with the site's name) rather than after the export
        functions[fn.name] = fn
        node = values.Op(opset, fn.name, _schema(fn.name, mask is not None, sinks is not None))
        ins = [q, k, v] + ([mask] if mask is not None else []) + ([sinks] if sinks is not None else [])
        return node(*ins)

    def planned_attention(q, k, v, mask=None, scale=1.0, is_causal=False, window=-1, softcap=0.0, dropout_p=0.0,
                          site="", mask_kind="none", spec="", sinks=None, chunk=-1):
        return emit(True, q, k, v, mask, scale, is_causal, window, softcap, site, mask_kind, spec, sinks, chunk)

    def attention(q, k, v, mask=None, scale=1.0, is_causal=False, window=-1, softcap=0.0, dropout_p=0.0, site="",
                  source="", sinks=None, chunk=-1):
        return emit(False, q, k, v, mask, scale, is_causal, window, softcap, site, "", "", sinks, chunk)

    return {torch.ops.lcpass.planned_attention.default: planned_attention,
            torch.ops.lcpass.attention.default: attention}


def precheck(graph) -> None:
    """Refuse, before the (slow) ONNX export, planned sites that have no ONNX form; names the site."""
    import torch

    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.lcpass.planned_attention.default:
            continue
        q, k = node.args[0], node.args[1]
        qv, kv = (x.meta.get("val") if hasattr(x, "meta") else None for x in (q, k))
        n_heads = int(qv.shape[1]) if qv is not None else 1
        static = ()
        if qv is not None and kv is not None and isinstance(qv.shape[2], int) and isinstance(kv.shape[2], int):
            static = (int(qv.shape[2]), int(kv.shape[2]))
        fn = AttentionFunction(True, n_heads, 1, 1, 1.0, bool(node.args[5]), int(node.args[6]), float(node.args[7]),
                               "none" if node.args[3] is None else "bool",
                               str(node.args[10]), str(node.args[11]), False, static)
        try:
            dynamic = dynamic_method(fn)
            if dynamic is None:
                long_mask(fn)
            else:
                check_state(dynamic[0], str(node.args[9]), str(node.args[11]))
        except ONNXExportError as exc:
            raise ONNXExportError(f"lcpass.export: site {node.args[9]}: {exc}") from None


def attach_functions(model: onnx.ModelProto, functions: dict[str, AttentionFunction]) -> list[str]:
    """Append the bodies of the functions the model calls and import their domains; calls of
    SparseAttention functions get their KV buffer inputs/outputs. Returns those buffer inputs."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    have = {f.name for f in model.functions}
    for name in sorted(used - have):
        model.functions.append(function_proto(functions[name]))
    buffers = add_kv_buffers(model, {n: functions[n] for n in used if sparse_layout(functions[n]) is not None})
    domains = {o.domain for o in model.opset_import}
    if used and DOMAIN not in domains:
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    if any(n.domain == MS_DOMAIN for f in model.functions for n in f.node) and MS_DOMAIN not in domains:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return buffers
