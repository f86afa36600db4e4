"""ONNX lowering of the block top-k dynamic methods: the selection in standard ops, as a bool mask.

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

The caller (:func:`lcpass.onnx_attention.function_proto`) feeds that mask to ONNX ``Attention`` and
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

import math
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from onnx import TensorProto

from lcpass.methods.dynamic.common import FORCE  # the score of blocks a method always keeps

if TYPE_CHECKING:
    from lcpass.onnx_attention import AttentionFunction, _Body

__all__ = ["SUPPORTED", "check_state", "dynamic_method", "emit_dynamic_mask"]

SUPPORTED = ("quest", "landmark", "seer")  # block top-k methods with an exact ONNX selection
F32 = TensorProto.FLOAT


def dynamic_method(fn: "AttentionFunction") -> Optional[tuple[str, dict[str, Any]]]:
    """The site's dynamic method and its parameters when its plan has one, else None.

    Raises :class:`lcpass.onnx_attention.ONNXExportError` when the method has no ONNX lowering, when the
    heads of the site mix methods, or when the site carries a padding mask (the engine then runs each row
    alone on its real keys, which the graph does not reproduce).
    """
    from lcpass.lower import lowering_kind, parse_spec
    from lcpass.methods import get_method
    from lcpass.onnx_attention import ONNXExportError

    if not fn.planned or not fn.spec:
        return None
    specs = parse_spec(fn.spec)
    dynamic = sorted({name for name, _ in specs if get_method(name).kind == "dynamic"})
    if not dynamic:
        return None
    bad = [n for n in dynamic if n not in SUPPORTED]
    if bad:
        raise ONNXExportError(
            f"dynamic (content-selected) methods {bad} have no ONNX lowering; dynamic methods with one: "
            f"{list(SUPPORTED)}; export the others with format='torch', or plan those sites with a static method")
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
    from lcpass.methods import resolve_params

    return name, resolve_params(get_method(name), dict(params))


def check_state(name: str, site: str, spec: str = "") -> None:
    """Refuse a site whose method state changes the selection beyond what the graph computes (a learned
    SeerAttention gate loaded into the site's state)."""
    from lcpass.lower import site_state
    from lcpass.onnx_attention import ONNXExportError

    if name == "seer" and site_state(site, spec).get("gate") is not None:
        raise ONNXExportError("seer with a learned gate (state['gate']) has no ONNX lowering yet (only the "
                              "training-free gate); export it with format='torch'")


def emit_dynamic_mask(body: "_Body", fn: "AttentionFunction", name: str, params: dict[str, Any], qpos: str,
                      kvpos: str, sq: str, sk: str) -> str:
    """Bool ``[B, Hq, Sq, Sk]``: the keys method ``name`` selects for each query, causal included.

    ``qpos [1,1,Sq,1]`` / ``kvpos [1,1,1,Sk]`` are absolute positions, ``sq``/``sk`` int64 scalars; the
    body's inputs ``q [B, Hq, Sq, D]`` and ``k [B, Hkv, Sk, D]``.
    """
    hq, hkv, d = fn.n_heads, fn.n_kv_heads, fn.head_dim
    g = hq // hkv
    if name == "quest":
        p = int(params["page_size"])
        topk, sink, local, reduce = max(1, -(-int(params["token_budget"]) // p)), int(params["sink_pages"]), \
            int(params["local_pages"]), "max"
    else:
        p = int(params["block_size"])
        topk, sink, local = int(params["topk"]), int(params["sink_blocks"]), 1
        reduce = "mean" if name == "seer" else "max"
    c = body.const
    qf, kf = body.op("Cast", "q", to=F32), body.op("Cast", "k", to=F32)
    mq = body.op("Div", body.op("Add", sq, c(p - 1)), c(p))
    mk = body.op("Div", body.op("Add", sk, c(p - 1)), c(p))
    j = body.op("Range", c(0), mk, c(1))  # key block ids [Mk]

    def pooled(x: str, length: str, m: str, how: str) -> str:
        """x [B, H, S, D] -> per block of p positions along axis 2: [B, H, M, D] (padding excluded)."""
        pad = body.op("Sub", body.op("Mul", m, c(p)), length)
        fill = {"max": float("-inf"), "min": float("inf"), "mean": 0.0}[how]
        xp = body.op("Pad", x, body.op("Concat", c([0]), body.op("Unsqueeze", pad, c([0])), axis=0),
                     c(fill, np.float32), c([2]))
        xb = body.op("Reshape", xp, c([0, 0, -1, p, d]))  # [B, H, M, p, D]
        if how == "max":
            return body.op("ReduceMax", xb, c([3]), keepdims=0)
        if how == "min":
            return body.op("ReduceMin", xb, c([3]), keepdims=0)
        ids = body.op("Range", c(0), m, c(1))
        cnt = body.op("Min", c(p), body.op("Sub", length, body.op("Mul", ids, c(p))))  # real positions per block
        cnt = body.op("Unsqueeze", body.op("Cast", cnt, to=F32), c([0, 1, 3]))  # [1, 1, M, 1]
        return body.op("Div", body.op("ReduceSum", xb, c([3]), keepdims=0), cnt)

    def block_max(s: str) -> str:
        """[B, Hkv, G, Sq, Mk] -> max over each query block: [B, Hkv, G, Mq, Mk] (padded queries -inf)."""
        pad = body.op("Sub", body.op("Mul", mq, c(p)), sq)
        sp = body.op("Pad", s, body.op("Concat", c([0]), body.op("Unsqueeze", pad, c([0])), axis=0),
                     c(float("-inf"), np.float32), c([3]))
        shape = body.op("Concat", c([0, 0, 0, -1, p]), body.op("Shape", sp, start=4, end=5), axis=0)
        return body.op("ReduceMax", body.op("Reshape", sp, shape), c([4]), keepdims=0)

    def transpose_last(x: str, rank: int) -> str:
        return body.op("Transpose", x, perm=list(range(rank - 2)) + [rank - 1, rank - 2])

    # first / last KV block under each query block (lcpass.methods.dynamic.common.local_block_ids)
    qstart = body.op("Add", body.op("Mul", body.op("Range", c(0), mq, c(1)), c(p)), body.op("Sub", sk, sq))
    first = body.op("Div", qstart, c(p))
    last = body.op("Div", body.op("Min", body.op("Add", qstart, c(p - 1)), body.op("Sub", sk, c(1))), c(p))
    first, last = (body.op("Unsqueeze", x, c([1])) for x in (first, last))  # [Mq, 1]
    jj = body.op("Unsqueeze", j, c([0]))  # [1, Mk]
    touched = body.op("LessOrEqual", jj, last)  # causal blocks [Mq, Mk]

    if name == "quest":
        kmax, kmin = pooled(kf, sk, mk, "max"), pooled(kf, sk, mk, "min")
        qg = body.op("Reshape", qf, c([0, hkv, -1, d]))  # [B, Hkv, G*Sq, D]
        qc = body.op("Concat", body.op("Relu", qg), body.op("Min", qg, c(0.0, np.float32)), axis=-1)
        kc = body.op("Concat", kmax, kmin, axis=-1)  # [B, Hkv, Mk, 2D]
        s = body.op("MatMul", qc, transpose_last(kc, 4))  # [B, Hkv, G*Sq, Mk]
        shape = body.op("Concat", c([0, 0, g, -1]), body.op("Shape", s, start=3, end=4), axis=0)
        scores = block_max(body.op("Reshape", s, shape))
    elif name == "landmark":
        kmean = pooled(kf, sk, mk, "mean")  # [B, Hkv, Mk, D]
        qg = body.op("Reshape", qf, c([0, hkv, g, -1, d]))  # [B, Hkv, G, Sq, D]
        s = body.op("MatMul", qg, transpose_last(body.op("Unsqueeze", kmean, c([2])), 5))  # [B, Hkv, G, Sq, Mk]
        scores = block_max(s)
    else:  # seer, training-free gate
        qa = pooled(qf, sq, mq, "mean")  # [B, Hq, Mq, D]
        kc = body.op("Add", body.op("Add", pooled(kf, sk, mk, "mean"), pooled(kf, sk, mk, "max")),
                     pooled(kf, sk, mk, "min"))
        s = body.op("MatMul", body.op("Reshape", qa, c([0, hkv, g, -1, d])),
                    transpose_last(body.op("Unsqueeze", kc, c([2])), 5))
        s = body.op("Div", s, c(math.sqrt(3 * d), np.float32))
        s = body.op("Where", touched, s, c(float("-inf"), np.float32))
        scores = body.op("Softmax", s, axis=-1)
        if float(params["threshold"]) > 0:
            scores = body.op("Where", body.op("Less", scores, c(float(params["threshold"]), np.float32)),
                             c(float("-inf"), np.float32), scores)
            topk = None  # every block above the threshold: k = Mk
    if params["share_kv_heads"] and g > 1:
        scores = body.op("ReduceMax" if reduce == "max" else "ReduceMean", scores, c([2]), keepdims=1)

    forced = body.op("Or", body.op("Less", jj, c(sink)),
                     body.op("And", body.op("GreaterOrEqual", jj, body.op("Sub", first, c(local - 1))),
                             body.op("LessOrEqual", jj, last)))
    scores = body.op("Where", forced, c(FORCE, np.float32), scores)
    scores = body.op("Where", touched, scores, c(float("-inf"), np.float32))
    kk = mk if topk is None else body.op("Min", mk, c(topk))
    values, indices = body.op("TopK", scores, body.op("Unsqueeze", kk, c([0])), axis=-1, largest=1, sorted=1,
                              n_out=2)  # [B, Hkv, G|1, Mq, K]
    finite = body.op("Greater", values, c(float("-inf"), np.float32))
    hit = body.op("And", body.op("Equal", body.op("Unsqueeze", indices, c([-1])), j),
                  body.op("Unsqueeze", finite, c([-1])))  # [.., Mq, K, Mk]
    hit = body.op("ReduceMax", body.op("Cast", hit, to=TensorProto.INT64), c([-2]), keepdims=0)  # [.., Mq, Mk]
    # element mask: query block of each query, key block of each key
    qb = body.op("Div", body.op("Range", c(0), sq, c(1)), c(p))
    kb = body.op("Div", body.op("Range", c(0), sk, c(1)), c(p))
    elem = body.op("Gather", body.op("Gather", hit, qb, axis=3), kb, axis=4)  # [B, Hkv, G|1, Sq, Sk]
    shape5 = body.op("Concat", body.op("Shape", "q", start=0, end=1), c([hkv, g]),
                     body.op("Shape", "q", start=2, end=3), body.op("Shape", "k", start=2, end=3), axis=0)
    elem = body.op("Expand", elem, shape5)
    shape4 = body.op("Concat", body.op("Shape", "q", start=0, end=3), body.op("Shape", "k", start=2, end=3), axis=0)
    elem = body.op("Cast", body.op("Reshape", elem, shape4), to=TensorProto.BOOL)  # [B, Hq, Sq, Sk]
    return body.op("And", elem, body.op("LessOrEqual", kvpos, qpos))
