"""A toy dynamic method in one file, as a user would add one: prefill selection, decode selector and ONNX
lowering all in its record. ``tests/test_toy_method.py`` registers it (one line) and runs every door.

``toy_blockmax``: each key block is represented by its element-wise max key; a query block keeps the
``topk`` blocks whose representative scores best for any of its queries (``q . kmax``), plus the first
(sink) block and its own local block. At decode, each KV head attends the ``budget`` slots whose keys
score best for its query heads (summed softmax), plus the newest slot.
"""
from __future__ import annotations

import torch

from lcpass.methods.base import KVPolicy, Param
from lcpass.methods.dynamic.block import topk_block_layout
from lcpass.methods.dynamic.common import (DecodeSelector, DynamicMethod, OnnxBlockTopK, OnnxLowering, attend_by,
                                           block_pool, block_query_scores, causal_envelope, check_causal)
from lcpass.methods.dynamic.decode import head_probs, indices_decode, tail_indices, topk_slots, valid_slots


def toy_select(q, k, *, params, state, mask_mod):
    mm = check_causal(mask_mod, "toy_blockmax")
    bs = params["block_size"]
    s = block_query_scores(q, block_pool(k, bs)[1], bs, "max")  # [B, Hkv, G, Mq, Mk]
    return topk_block_layout(s, params["topk"], q_len=q.shape[2], kv_len=k.shape[2], block=bs, sink_blocks=1,
                             share=False, reduce="max", mask_mod=mm)


def toy_onnx_scores(g, params):
    kmax = g.op("Unsqueeze", g.pooled(g.k, "k", "max"), g.const([2]))  # [B, Hkv, 1, Mk, D]
    qg = g.op("Reshape", g.q, g.const([0, g.hkv, g.g, -1, g.d]))  # [B, Hkv, G, Sq, D]
    return g.block_max(g.op("MatMul", qg, g.transpose_last(kmax, 5)))


def toy_decode_indices(q, group, p, scale, layer_idx, n_layers, shared):
    k, pos = group.keys, group.pos
    B, h, L, _ = k.shape
    if L <= p["budget"] + 1:
        return None  # everything fits: attend every slot
    score = head_probs(q, k[:, :, :L - 1], valid_slots(pos[:, :L - 1]), scale)  # [B, h, L - 1]
    return torch.cat([topk_slots(score, p["budget"]), tail_indices(L - 1, L, B, h, q.device)], -1)


TOY = DynamicMethod(
    name="toy_blockmax",
    paper="(a test's toy method)",
    summary="Top-k key blocks by q . max(k); decode: top budget slots by summed softmax.",
    params=(Param("block_size", "int", 16, 16, 4096, "tokens per block"),
            Param("topk", "int", 3, 1, None, "blocks kept per query block (sink and local included)"),
            Param("budget", "int", 8, 1, None, "slots one decode step attends besides the newest")),
    kind="dynamic", phases=frozenset({"prefill", "decode"}), needs_calibration=False, crossover=0,
    mask_mod=causal_envelope, kv_policy=lambda p, *, kv_len: KVPolicy.all(),
    select=toy_select, attend=attend_by(toy_select), granularity="block",
    decode=DecodeSelector(("budget",), indices_decode(toy_decode_indices), budget=lambda p: p["budget"]),
    onnx=OnnxLowering(lambda p: OnnxBlockTopK(p["block_size"], p["topk"], sink=1, local=1), toy_onnx_scores),
)
