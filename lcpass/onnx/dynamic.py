"""ONNX lowering of the block top-k dynamic methods: the selection in standard ops, as a bool mask.

Which methods have one, and how each scores its blocks, is in the method's record
(``DynamicMethod.onnx``, an :class:`~lcpass.methods.dynamic.common.OnnxLowering`); this module builds
the rest of the graph for any of them from the record's :class:`OnnxBlockTopK` layout, handing the
record's ``scores`` function a :class:`BlockGraph`. For the methods the registry ships:

The CPU engine's selection (:mod:`lcpass.methods.dynamic.block`) is the reference, and the graph computes
the same thing step by step, so that onnxruntime picks the same blocks:

1. block statistics of ``k [B, Hkv, Sk, D]`` over key blocks of ``P`` keys cut from position 0 (``Pad`` to
   ``Mk * P`` with a neutral value, ``Reshape`` to ``[B, Hkv, Mk, P, D]``, ``ReduceMax``/``ReduceMin``/
   ``ReduceSum`` divided by the block's real length), in fp32;
2. block scores ``s [B, Hkv, G, Mq, Mk]`` (query blocks of ``P`` queries cut from the first query):

   * ``quest``: ``[relu(q), min(q, 0)] . [kmax, kmin]`` (one ``MatMul``), max over the block's queries;
   * ``landmark``: ``q . mean(k)``, max over the block's queries;
   * ``seer`` (training-free gate): ``mean(q) . (kavg + kmax + kmin) / sqrt(3D)``, ``Softmax`` over the
     causal blocks, optional ``threshold`` (blocks below it are dropped);

3. with ``share_kv_heads`` the G query heads of a KV group share one score row (``ReduceMax``, or
   ``ReduceMean`` for seer); sink blocks (``j < sink``) and the local blocks (from the KV block of the
   query block's first query, minus ``local - 1``, to that of its last) are forced to ``FORCE``; blocks
   the causal mask does not touch to ``-inf``;
4. ``TopK(min(k, Mk))`` per query block; a block is selected when it is among the top ``k`` with a finite
   score (``Equal`` against ``Range(Mk)``, ``ReduceMax`` over the k slots);
5. the block map is expanded to an element mask ``[B, Hq, Sq, Sk]`` with two ``Gather`` (query block of
   each query, key block of each key) and intersected with the causal mask.

The caller (:func:`lcpass.onnx.attention.function_proto`) feeds that mask to ONNX ``Attention`` and
switches to the exact causal mask below the site's crossover length, as ``planned_attention`` does.

**Mask, not gather.** The selected blocks are passed as a bool mask over all keys rather than gathered:
every selected key is attended exactly once and every other one is masked, so the result equals the
engine's block-sparse result (which also applies the causal mask inside partial blocks) up to float
summation order; the cost is dense (O(Sq * Sk)), i.e. the export is exact but saves no FLOPs.

**Ties.** ``TopK`` and ``torch.topk`` may order equal scores differently. The forced blocks all score
``FORCE``; they are all kept whenever the budget ``k`` is at least the number of forced blocks per query
block (sink + local), which is the intended configuration. Content scores are fp32 dot products; two
blocks scoring exactly alike (e.g. copies of the same tokens) may resolve differently.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
from onnx import TensorProto

from lcpass.lower import lowering_kind, parse_spec, site_state
from lcpass.methods import get_method, list_methods, resolve_params
from lcpass.methods.dynamic.common import FORCE  # the score of blocks a method always keeps
from lcpass.onnx.common import AttentionFunction, Body, ONNXExportError

__all__ = ["BlockGraph", "check_state", "dynamic_method", "emit_dynamic_mask", "onnx_methods"]

F32 = TensorProto.FLOAT


def onnx_methods() -> tuple[str, ...]:
    """The dynamic methods whose record has an ONNX lowering, in table order."""
    return tuple(m.name for m in list_methods() if getattr(m, "onnx", None) is not None)


def dynamic_method(fn: AttentionFunction) -> Optional[tuple[str, dict[str, Any]]]:
    """The site's dynamic method and its parameters when its plan has one, else None.

    Raises :class:`lcpass.onnx.attention.ONNXExportError` when the method's record has no ONNX lowering,
    when the heads of the site mix methods, or when the site carries a padding mask (the engine then runs
    each row alone on its real keys, which the graph does not reproduce).
    """
    if not fn.planned or not fn.spec:
        return None
    specs = parse_spec(fn.spec)
    dynamic = sorted({name for name, _ in specs if get_method(name).kind == "dynamic"})
    if not dynamic:
        return None
    bad = [n for n in dynamic if getattr(get_method(n), "onnx", None) is None]
    if bad:
        raise ONNXExportError(
            f"dynamic (content-selected) methods {bad} have no ONNX lowering; dynamic methods with one: "
            f"{list(onnx_methods())}; export the others with format='torch', or plan those sites with a static method")
    if len({(n, tuple(sorted(p.items()))) for n, p in specs}) != 1:
        raise ONNXExportError(
            f"the heads of this site mix methods ({sorted({n for n, _ in specs})}) and one of them is dynamic "
            f"{dynamic}; the ONNX lowering needs one dynamic method for every head of a site; plan the whole "
            f"site with it, or export with format='torch'")
    if fn.mask != "none" and lowering_kind(fn.mask_kind) == "sparse" and fn.is_causal and fn.window < 0 \
            and not fn.softcap:
        raise ONNXExportError(
            f"a {dynamic[0]} site with a padding mask ({fn.mask_kind}) has no ONNX lowering (each row selects on "
            f"its own real keys); export without an attention_mask input, or with format='torch'")
    name, params = specs[0]
    return name, resolve_params(get_method(name), dict(params))


def check_state(name: str, site: str, spec: str = "") -> None:
    """Refuse a site whose method state changes the selection beyond what the graph computes (the
    record's ``onnx.refuse``: e.g. a learned SeerAttention gate loaded into the site's state)."""
    why = get_method(name).onnx.refuse(site_state(site, spec))
    if why:
        raise ONNXExportError(why)


class BlockGraph:
    """What a record's ``onnx.scores(g, params)`` builds with: the function body's ops and the site's
    dimensions, for blocks of ``p`` queries / keys.

    ``q`` / ``k``: the body's inputs cast to fp32 (``[B, Hq, Sq, D]``, ``[B, Hkv, Sk, D]``); ``hq``,
    ``hkv``, ``g`` (= Hq / Hkv), ``d``, ``p``: ints; ``sq``, ``sk``, ``mq``, ``mk``: int64 scalars
    (lengths and block counts); ``touched``: bool ``[Mq, Mk]``, the key blocks the causal mask lets each
    query block reach. ``op(type, *inputs, **attrs)`` adds a node, ``const`` an int64 constant, ``f32`` a
    float one."""

    def __init__(self, body: Body, fn: AttentionFunction, p: int, sq: str, sk: str) -> None:
        self.body, self.p, self.sq, self.sk = body, p, sq, sk
        self.hq, self.hkv, self.d = fn.n_heads, fn.n_kv_heads, fn.head_dim
        self.g = self.hq // self.hkv
        self.q, self.k = body.op("Cast", "q", to=F32), body.op("Cast", "k", to=F32)
        c = self.const
        self.mq = body.op("Div", body.op("Add", sq, c(p - 1)), c(p))
        self.mk = body.op("Div", body.op("Add", sk, c(p - 1)), c(p))
        self.j = body.op("Range", c(0), self.mk, c(1))  # key block ids [Mk]
        # first / last KV block under each query block (lcpass.methods.dynamic.common.local_block_ids)
        qstart = body.op("Add", body.op("Mul", body.op("Range", c(0), self.mq, c(1)), c(p)), body.op("Sub", sk, sq))
        first = body.op("Div", qstart, c(p))
        last = body.op("Div", body.op("Min", body.op("Add", qstart, c(p - 1)), body.op("Sub", sk, c(1))), c(p))
        self.first, self.last = (body.op("Unsqueeze", x, c([1])) for x in (first, last))  # [Mq, 1]
        self.jj = body.op("Unsqueeze", self.j, c([0]))  # [1, Mk]
        self.touched = body.op("LessOrEqual", self.jj, self.last)  # causal blocks [Mq, Mk]

    def op(self, op_type: str, *inputs: str, **attrs: Any):
        return self.body.op(op_type, *inputs, **attrs)

    def const(self, value: Any) -> str:
        return self.body.const(value)

    def f32(self, value: float) -> str:
        return self.body.const(value, np.float32)

    def pooled(self, x: str, axis_of: str, how: str) -> str:
        """``x [B, H, S, D]`` (``axis_of``: ``"q"`` or ``"k"``, whose length S is) pooled per block of
        ``p`` positions: ``[B, H, M, D]`` by ``"max"``, ``"min"`` or ``"mean"`` (padding excluded)."""
        body, c, p = self.body, self.const, self.p
        length, m = (self.sq, self.mq) if axis_of == "q" else (self.sk, self.mk)
        pad = body.op("Sub", body.op("Mul", m, c(p)), length)
        fill = {"max": float("-inf"), "min": float("inf"), "mean": 0.0}[how]
        xp = body.op("Pad", x, body.op("Concat", c([0]), body.op("Unsqueeze", pad, c([0])), axis=0),
                     self.f32(fill), c([2]))
        xb = body.op("Reshape", xp, c([0, 0, -1, p, self.d]))  # [B, H, M, p, D]
        if how == "max":
            return body.op("ReduceMax", xb, c([3]), keepdims=0)
        if how == "min":
            return body.op("ReduceMin", xb, c([3]), keepdims=0)
        ids = body.op("Range", c(0), m, c(1))
        cnt = body.op("Min", c(p), body.op("Sub", length, body.op("Mul", ids, c(p))))  # real positions per block
        cnt = body.op("Unsqueeze", body.op("Cast", cnt, to=F32), c([0, 1, 3]))  # [1, 1, M, 1]
        return body.op("Div", body.op("ReduceSum", xb, c([3]), keepdims=0), cnt)

    def block_max(self, s: str) -> str:
        """``[B, Hkv, G, Sq, Mk]`` -> max over each query block: ``[B, Hkv, G, Mq, Mk]`` (padded queries -inf)."""
        body, c = self.body, self.const
        pad = body.op("Sub", body.op("Mul", self.mq, c(self.p)), self.sq)
        sp = body.op("Pad", s, body.op("Concat", c([0]), body.op("Unsqueeze", pad, c([0])), axis=0),
                     self.f32(float("-inf")), c([3]))
        shape = body.op("Concat", c([0, 0, 0, -1, self.p]), body.op("Shape", sp, start=4, end=5), axis=0)
        return body.op("ReduceMax", body.op("Reshape", sp, shape), c([4]), keepdims=0)

    def transpose_last(self, x: str, rank: int) -> str:
        return self.body.op("Transpose", x, perm=list(range(rank - 2)) + [rank - 1, rank - 2])


def emit_dynamic_mask(body: Body, fn: AttentionFunction, name: str, params: dict[str, Any], qpos: str,
                      kvpos: str, sq: str, sk: str) -> str:
    """Bool ``[B, Hq, Sq, Sk]``: the keys method ``name`` selects for each query, causal included.

    ``qpos [1,1,Sq,1]`` / ``kvpos [1,1,1,Sk]`` are absolute positions, ``sq``/``sk`` int64 scalars; the
    body's inputs ``q [B, Hq, Sq, D]`` and ``k [B, Hkv, Sk, D]``. The block scores and the layout come
    from the method's record (``onnx``); the forced blocks, the top-k and the element mask from here.
    """
    lowering = get_method(name).onnx
    lay = lowering.layout(params)
    g = BlockGraph(body, fn, int(lay.block), sq, sk)
    c = g.const
    scores = lowering.scores(g, params)  # [B, Hkv, G, Mq, Mk]
    if lay.share_kv_heads and g.g > 1:
        scores = body.op("ReduceMax" if lay.share == "max" else "ReduceMean", scores, c([2]), keepdims=1)
    jj, first, last = g.jj, g.first, g.last
    forced = body.op("Or", body.op("Less", jj, c(int(lay.sink))),
                     body.op("And", body.op("GreaterOrEqual", jj, body.op("Sub", first, c(int(lay.local) - 1))),
                             body.op("LessOrEqual", jj, last)))
    scores = body.op("Where", forced, g.f32(FORCE), scores)
    scores = body.op("Where", g.touched, scores, g.f32(float("-inf")))
    kk = g.mk if lay.topk is None else body.op("Min", g.mk, c(int(lay.topk)))
    values, indices = body.op("TopK", scores, body.op("Unsqueeze", kk, c([0])), axis=-1, largest=1, sorted=1,
                              n_out=2)  # [B, Hkv, G|1, Mq, K]
    finite = body.op("Greater", values, g.f32(float("-inf")))
    hit = body.op("And", body.op("Equal", body.op("Unsqueeze", indices, c([-1])), g.j),
                  body.op("Unsqueeze", finite, c([-1])))  # [.., Mq, K, Mk]
    hit = body.op("ReduceMax", body.op("Cast", hit, to=TensorProto.INT64), c([-2]), keepdims=0)  # [.., Mq, Mk]
    # element mask: query block of each query, key block of each key
    qb = body.op("Div", body.op("Range", c(0), sq, c(1)), c(g.p))
    kb = body.op("Div", body.op("Range", c(0), sk, c(1)), c(g.p))
    elem = body.op("Gather", body.op("Gather", hit, qb, axis=3), kb, axis=4)  # [B, Hkv, G|1, Sq, Sk]
    shape5 = body.op("Concat", body.op("Shape", "q", start=0, end=1), c([g.hkv, g.g]),
                     body.op("Shape", "q", start=2, end=3), body.op("Shape", "k", start=2, end=3), axis=0)
    elem = body.op("Expand", elem, shape5)
    shape4 = body.op("Concat", body.op("Shape", "q", start=0, end=3), body.op("Shape", "k", start=2, end=3), axis=0)
    elem = body.op("Cast", body.op("Reshape", elem, shape4), to=TensorProto.BOOL)  # [B, Hq, Sq, Sk]
    return body.op("And", elem, body.op("LessOrEqual", kvpos, qpos))
