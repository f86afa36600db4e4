"""Block-granular dynamic selectors: Quest, SeerAttention-style gate, Landmark retrieval, LongHeads.

Each scores every (query block, KV block) pair from cheap per-block statistics, forces the sink
block(s) and the local (diagonal) block(s), and keeps the best ``topk`` blocks through
:func:`lcpass.layout.layout_from_topk`, so the result is an ordinary :class:`BlockLayout` that the
engine runs. Scores are computed per query head; with ``share_kv_heads`` (default for Quest, Seer and
Landmark) the G query heads of a KV group share one selection (scores max-/mean-reduced over the
group), which lets the engine gather each KV block once for the whole group. ``share_kv_heads=False``
is the papers' per-head selection.

Query blocks and KV blocks have the same size (``page_size`` / ``block_size`` / ``chunk_size``).

>>> import torch
>>> q = torch.randn(1, 8, 1024, 64); k = torch.randn(1, 2, 1024, 64)
>>> from lcpass.methods import validate_params
>>> p = validate_params("quest", {"token_budget": 256, "page_size": 128})
>>> lay = quest_select(q, k, params=p, state=None, mask_mod=None)
>>> int(lay.full_kv_num_blocks.max() + lay.kv_num_blocks.max())   # 2 pages per query block
2
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lcpass.layout import BlockLayout, layout_from_topk
from lcpass.masks import MaskMod
from lcpass.methods.base import KVPolicy, Param
from lcpass.methods.dynamic.common import (FORCE, DecodeSelector, DynamicMethod, OnnxBlockTopK, OnnxLowering,
                                           attend_by, block_mean, block_pool, block_query_scores,
                                           causal_envelope, check_causal, local_block_ids)
from lcpass.methods.dynamic.decode import quest_decode

__all__ = ["QUEST", "SEER", "LANDMARK", "LONGHEADS", "SeerGate", "load_seer_gate", "topk_block_layout",
           "quest_select", "seer_select", "landmark_select", "longheads_select", "quest_bounds"]


def topk_block_layout(scores: Tensor, k: int, *, q_len: int, kv_len: int, block: int, sink_blocks: int,
                 share: bool, reduce: str, mask_mod: MaskMod, local_blocks: int = 1) -> BlockLayout:
    """scores [B, Hkv, G, Mq, Mk] -> layout keeping sinks, local blocks and the top ``k`` in total.

    Local: the KV blocks under the query block plus the ``local_blocks - 1`` blocks before them."""
    B, Hkv, G, mq, mk = scores.shape
    if share and G > 1:
        red = scores.amax(2, keepdim=True) if reduce == "max" else scores.mean(2, keepdim=True)
        scores = red.expand(B, Hkv, G, mq, mk)
    first, last = local_block_ids(q_len, kv_len, block, block, device=scores.device)
    j = torch.arange(mk, device=scores.device)
    first = first - (local_blocks - 1)
    forced = (j[None] < sink_blocks) | ((j[None] >= first[:, None]) & (j[None] <= last[:, None]))
    scores = scores.masked_fill(forced, FORCE)  # forced: [Mq, Mk]
    return layout_from_topk(scores.reshape(B, Hkv * G, mq, mk), k, q_len=q_len, kv_len=kv_len,
                            mask_mod=mask_mod, block_size=block)


def _sizes(q: Tensor, k: Tensor, owner: str) -> tuple[int, int]:
    if q.dim() != 4 or k.dim() != 4 or q.shape[1] % k.shape[1] or q.shape[2] > k.shape[2]:
        raise ValueError(f"{owner}: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, Hq, Sq, D] "
                         f"and [B, Hkv, Sk, D] with Hkv | Hq and Sq <= Sk")
    return q.shape[2], k.shape[2]


# ----------------------------------------------------------------------------------------------
# Quest


_BOUND_ROWS = 8192  # query rows (G heads x query blocks) scored per chunk: the chunk stays in cache


def quest_bounds(q: Tensor, k: Tensor, page_size: int, *, causal: bool = False) -> Tensor:
    """Quest's upper bound of q.k over each page, max over the queries of each query block.

    ``sum_d max(q_d * kmin_d, q_d * kmax_d) = q . kmax + q- . (kmin - kmax)`` with ``q- = min(q, 0)``
    (= ``q+ . kmax + q- . kmin``): two matmuls accumulated in place, and ``q-`` the only copy of q.
    q [B, Hq, Sq, D], k [B, Hkv, Sk, D] -> [B, Hkv, G, Mq, Mk].

    Computed a chunk of query blocks at a time so the chunk's ``q-`` and scores stay in cache.
    ``causal=True`` scores only the pages some query of the block can see (page start <= the block's
    last position) and leaves the others at ``-inf`` (a causal selection never keeps them), which
    halves the work.
    """
    _, kmax, kmin = block_pool(k, page_size)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    ps = page_size
    mq, mk = -(-Sq // ps), kmax.shape[2]
    R = B * Hkv * G

    def per_head(x: Tensor) -> Tensor:  # [B, Hkv, Mk, D] -> [B*Hkv*G, D, Mk] (each query head's copy)
        return x.transpose(-1, -2)[:, :, None].expand(B, Hkv, G, D, mk).reshape(R, D, mk)

    kmax_t, kdiff_t = per_head(kmax), per_head(kmin - kmax)
    qv = q.float().reshape(B, Hkv, G, Sq, D)
    # last causal page of each query block, as Python ints (index arithmetic: no device round trip);
    # = local_block_ids(Sq, Sk, ps, ps)[1]
    last = [min(i * ps + Sk - Sq + ps - 1, Sk - 1) // ps for i in range(mq)]
    out = torch.full((B, Hkv, G, mq, mk), float("-inf"), device=q.device)
    step = max(1, _BOUND_ROWS // (G * ps))  # query blocks per chunk
    for i0 in range(0, mq, step):
        i1 = min(mq, i0 + step)
        hi = last[i1 - 1] + 1 if causal else mk
        qc = qv[:, :, :, i0 * ps:min(i1 * ps, Sq)].reshape(R, -1, D)  # a view: [R, r, D]
        s = torch.bmm(qc, kmax_t[..., :hi])  # q . kmax: [R, r, hi]
        s.baddbmm_(qc.clamp(max=0), kdiff_t[..., :hi])  # + q- . (kmin - kmax)
        r = s.shape[1]
        pad = (i1 - i0) * ps - r
        if pad:
            s = torch.nn.functional.pad(s, (0, 0, 0, pad), value=float("-inf"))
        out[:, :, :, i0:i1, :hi] = s.view(B, Hkv, G, i1 - i0, ps, hi).amax(4)
    return out


def quest_select(q: Tensor, k: Tensor, *, params: dict, state: dict | None,
                 mask_mod: MaskMod | None) -> BlockLayout:
    """Quest (Tang et al., ICML 2024): per page the element-wise min and max key; a query's bound on
    the page's best score is ``sum_d max(q_d kmin_d, q_d kmax_d)``; keep the top pages within
    ``token_budget`` tokens (sink and local pages included): ``sink_pages`` first pages and the
    ``local_pages`` most recent ones are always kept.

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D] -> BlockLayout with page_size blocks.
    """
    mm = check_causal(mask_mod, "quest")
    sq, sk = _sizes(q, k, "quest")
    ps = params["page_size"]
    kk = max(1, -(-params["token_budget"] // ps))
    s = quest_bounds(q, k, ps, causal=True)
    return topk_block_layout(s, kk, q_len=sq, kv_len=sk, block=ps, sink_blocks=params["sink_pages"],
                        share=params["share_kv_heads"], reduce="max", mask_mod=mm,
                        local_blocks=params["local_pages"])


_SHARE = Param("share_kv_heads", "bool", True, None, None,
               "GQA: the query heads of a KV group share one selection (False = per head, as in the paper)")

def _quest_onnx_layout(p: dict) -> OnnxBlockTopK:
    return OnnxBlockTopK(p["page_size"], max(1, -(-p["token_budget"] // p["page_size"])), p["sink_pages"],
                         p["local_pages"], p["share_kv_heads"], "max")


def _quest_onnx_scores(g, p: dict) -> str:
    """Quest's page bound in ONNX ops: ``[relu(q), min(q, 0)] . [kmax, kmin]`` (one MatMul), max over the
    query block."""
    kc = g.op("Concat", g.pooled(g.k, "k", "max"), g.pooled(g.k, "k", "min"), axis=-1)  # [B, Hkv, Mk, 2D]
    qg = g.op("Reshape", g.q, g.const([0, g.hkv, -1, g.d]))  # [B, Hkv, G*Sq, D]
    qc = g.op("Concat", g.op("Relu", qg), g.op("Min", qg, g.f32(0.0)), axis=-1)
    s = g.op("MatMul", qc, g.transpose_last(kc, 4))  # [B, Hkv, G*Sq, Mk]
    shape = g.op("Concat", g.const([0, 0, g.g, -1]), g.op("Shape", s, start=3, end=4), axis=0)
    return g.block_max(g.op("Reshape", s, shape))


QUEST = DynamicMethod(
    name="quest",
    paper="Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (ICML 2024)",
    summary="Top pages by the query's upper bound over per-page min/max keys, plus sink and local pages.",
    params=(
        Param("token_budget", "int", 2048, 1, None, "tokens attended per query block (pages x page_size)"),
        Param("page_size", "int", 128, 16, 4096, "tokens per page (= engine block)"),
        Param("sink_pages", "int", 1, 0, None, "first pages always kept"),
        Param("local_pages", "int", 1, 1, None,
              "most recent pages always kept (the query's own page and those before it)"),
        _SHARE,
    ),
    kind="dynamic", phases=frozenset({"prefill", "decode"}), needs_calibration=False, crossover=4096,
    crossover_why="below ~4k tokens a 2k budget keeps most pages; selection costs more than it saves",
    mask_mod=causal_envelope, kv_policy=lambda p, *, kv_len: KVPolicy.all(),
    select=quest_select, attend=attend_by(quest_select), granularity="block",
    decode=DecodeSelector(("token_budget", "page_size", "sink_pages"), quest_decode,
                          budget=lambda p: p["token_budget"]),
    onnx=OnnxLowering(_quest_onnx_layout, _quest_onnx_scores),
)


# ----------------------------------------------------------------------------------------------
# SeerAttention-style gate


@dataclass(frozen=True)
class SeerGate:
    """Learned SeerAttention gate of one site: ``q_weight [Hq, D, dg]`` on the average-pooled query,
    ``k_weight [Hkv, 3D, dg]`` on the concatenated (avg, max, min)-pooled keys."""

    q_weight: Tensor
    k_weight: Tensor


def load_seer_gate(path: str | Path, *, n_heads: int, n_kv_heads: int, head_dim: int) -> SeerGate:
    """Load gate weights saved as ``torch.save({"q_weight": ..., "k_weight": ...}, path)``.

    Shapes are checked: ``q_weight [n_heads, head_dim, dg]``, ``k_weight [n_kv_heads, 3*head_dim, dg]``.

    >>> # torch.save({"q_weight": torch.randn(8, 64, 32), "k_weight": torch.randn(2, 192, 32)}, "g.pt")
    >>> # gate = load_seer_gate("g.pt", n_heads=8, n_kv_heads=2, head_dim=64)
    """
    obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or not {"q_weight", "k_weight"} <= set(obj):
        raise ValueError(f"load_seer_gate: {path} must hold a dict with 'q_weight' and 'k_weight', got "
                         f"{sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
    qw, kw = obj["q_weight"].float(), obj["k_weight"].float()
    dg = qw.shape[-1] if qw.dim() == 3 else -1
    for name, t, want in (("q_weight", qw, (n_heads, head_dim, dg)),
                          ("k_weight", kw, (n_kv_heads, 3 * head_dim, dg))):
        if tuple(t.shape) != want or dg < 1:
            raise ValueError(f"load_seer_gate: {path}: {name} has shape {tuple(t.shape)}; expected "
                             f"{list(want)} (heads, in features, gate dim) for this site")
    return SeerGate(qw, kw)


def seer_gate_scores(q: Tensor, k: Tensor, block: int, gate: SeerGate | None) -> Tensor:
    """Gate logits [B, Hkv, G, Mq, Mk]: pooled q (avg) against pooled k (avg, max, min concatenated).

    Training-free (``gate=None``): the identity gate, ``[q, q, q] . [kavg, kmax, kmin] / sqrt(3D)``.
    """
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qa = block_mean(q, block)  # [B, Hq, Mq, D]
    kavg, kmax, kmin = block_pool(k, block)
    mq = qa.shape[2]
    if gate is None:
        kc = kavg + kmax + kmin  # [B, Hkv, Mk, D]
        s = qa.view(B, Hkv, G, mq, D) @ kc[:, :, None].transpose(-1, -2)
        return s / math.sqrt(3 * D)
    if gate.q_weight.shape[0] != Hq or gate.k_weight.shape[0] != Hkv or gate.q_weight.shape[1] != D:
        raise ValueError(f"seer: gate weights {tuple(gate.q_weight.shape)}/{tuple(gate.k_weight.shape)} "
                         f"do not fit Hq={Hq}, Hkv={Hkv}, D={D}; load them with load_seer_gate")
    qw, kw = gate.q_weight.to(qa.device), gate.k_weight.to(qa.device)  # no-op when already there
    qg = torch.einsum("bhmd,hde->bhme", qa, qw)  # [B, Hq, Mq, dg]
    kg = torch.einsum("bhmd,hde->bhme", torch.cat([kavg, kmax, kmin], -1), kw)
    s = qg.view(B, Hkv, G, mq, -1) @ kg[:, :, None].transpose(-1, -2)
    return s / math.sqrt(gate.q_weight.shape[-1])


def seer_select(q: Tensor, k: Tensor, *, params: dict, state: dict | None,
                mask_mod: MaskMod | None) -> BlockLayout:
    """SeerAttention (Gao et al., 2024): a block gate from pooled q and (avg, max, min)-pooled k,
    softmax over the causal KV blocks, then the ``topk`` blocks, or every block whose gate probability
    is at least ``threshold`` when ``threshold > 0``. Learned weights: ``state["gate"]`` (a
    :class:`SeerGate` from :func:`load_seer_gate`); training-free otherwise.
    """
    mm = check_causal(mask_mod, "seer")
    sq, sk = _sizes(q, k, "seer")
    bs = params["block_size"]
    s = seer_gate_scores(q, k, bs, (state or {}).get("gate"))
    _, last = local_block_ids(sq, sk, bs, bs, device=q.device)
    ok = torch.arange(s.shape[-1], device=q.device)[None] <= last[:, None]  # causal blocks [Mq, Mk]
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1)
    kk = params["topk"]
    if params["threshold"] > 0:
        p = p.masked_fill(p < params["threshold"], float("-inf"))
        kk = s.shape[-1]
    return topk_block_layout(p, kk, q_len=sq, kv_len=sk, block=bs, sink_blocks=params["sink_blocks"],
                        share=params["share_kv_heads"], reduce="mean", mask_mod=mm)


def _seer_onnx_layout(p: dict) -> OnnxBlockTopK:
    return OnnxBlockTopK(p["block_size"], None if p["threshold"] > 0 else p["topk"], p["sink_blocks"], 1,
                         p["share_kv_heads"], "mean")


def _seer_onnx_scores(g, p: dict) -> str:
    """The training-free gate in ONNX ops: ``mean(q) . (kavg + kmax + kmin) / sqrt(3D)``, softmax over the
    causal blocks; with a ``threshold`` the blocks below it score -inf."""
    kc = g.op("Add", g.op("Add", g.pooled(g.k, "k", "mean"), g.pooled(g.k, "k", "max")), g.pooled(g.k, "k", "min"))
    qa = g.op("Reshape", g.pooled(g.q, "q", "mean"), g.const([0, g.hkv, g.g, -1, g.d]))  # [B, Hkv, G, Mq, D]
    s = g.op("MatMul", qa, g.transpose_last(g.op("Unsqueeze", kc, g.const([2])), 5))
    s = g.op("Div", s, g.f32(math.sqrt(3 * g.d)))
    scores = g.op("Softmax", g.op("Where", g.touched, s, g.f32(float("-inf"))), axis=-1)
    if p["threshold"] > 0:
        scores = g.op("Where", g.op("Less", scores, g.f32(float(p["threshold"]))), g.f32(float("-inf")), scores)
    return scores


def _seer_onnx_refuse(state) -> str | None:
    if state.get("gate") is not None:
        return ("seer with a learned gate (state['gate']) has no ONNX lowering yet (only the training-free "
                "gate); export it with format='torch'")
    return None


SEER = DynamicMethod(
    name="seer",
    paper="SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs (Gao et al., 2024)",
    summary="Block gate on pooled q and (avg,max,min)-pooled k; softmax over blocks; top-k or threshold.",
    params=(
        Param("block_size", "int", 128, 16, 4096, "tokens per gate block (= engine block)"),
        Param("topk", "int", 16, 1, None, "blocks kept per query block (sink and local included)"),
        Param("threshold", "float", 0.0, 0.0, 1.0, "if > 0: keep blocks with gate probability >= it"),
        Param("sink_blocks", "int", 1, 0, None, "first blocks always kept"),
        _SHARE,
    ),
    kind="dynamic", phases=frozenset({"prefill", "decode"}), needs_calibration=False, crossover=4096,
    crossover_why="the gate and gather cost more than the skipped blocks below ~4k tokens",
    mask_mod=causal_envelope, kv_policy=lambda p, *, kv_len: KVPolicy.all(),
    select=seer_select, attend=attend_by(seer_select), granularity="block",
    onnx=OnnxLowering(_seer_onnx_layout, _seer_onnx_scores, _seer_onnx_refuse),
)


# ----------------------------------------------------------------------------------------------
# Landmark-style retrieval and LongHeads


def landmark_select(q: Tensor, k: Tensor, *, params: dict, state: dict | None,
                    mask_mod: MaskMod | None) -> BlockLayout:
    """Landmark Attention (Mohtashami & Jaggi, NeurIPS 2023), training-free: the block's representative
    key (its mean, standing in for the trained landmark token) scores the block for each query; a query
    block keeps the ``topk`` blocks best for any of its queries, plus sink and local blocks."""
    mm = check_causal(mask_mod, "landmark")
    sq, sk = _sizes(q, k, "landmark")
    bs = params["block_size"]
    s = block_query_scores(q, block_mean(k, bs), bs, "max")
    return topk_block_layout(s, params["topk"], q_len=sq, kv_len=sk, block=bs,
                        sink_blocks=params["sink_blocks"], share=params["share_kv_heads"], reduce="max",
                        mask_mod=mm)


def _landmark_onnx_layout(p: dict) -> OnnxBlockTopK:
    return OnnxBlockTopK(p["block_size"], p["topk"], p["sink_blocks"], 1, p["share_kv_heads"], "max")


def _landmark_onnx_scores(g, p: dict) -> str:
    """Landmark retrieval in ONNX ops: ``q . mean(k)`` per key block, max over the query block."""
    kmean = g.op("Unsqueeze", g.pooled(g.k, "k", "mean"), g.const([2]))  # [B, Hkv, 1, Mk, D]
    qg = g.op("Reshape", g.q, g.const([0, g.hkv, g.g, -1, g.d]))  # [B, Hkv, G, Sq, D]
    return g.block_max(g.op("MatMul", qg, g.transpose_last(kmean, 5)))


LANDMARK = DynamicMethod(
    name="landmark",
    paper="Landmark Attention: Random-Access Infinite Context Length for Transformers (NeurIPS 2023)",
    summary="Training-free block retrieval: mean key per block as landmark; top-k blocks per query block.",
    params=(
        Param("block_size", "int", 128, 16, 4096, "tokens per block (= engine block)"),
        Param("topk", "int", 16, 1, None, "blocks kept per query block (sink and local included)"),
        Param("sink_blocks", "int", 1, 0, None, "first blocks always kept"),
        _SHARE,
    ),
    kind="dynamic", phases=frozenset({"prefill", "decode"}), needs_calibration=False, crossover=4096,
    crossover_why="as Quest: below ~4k tokens selection does not pay",
    mask_mod=causal_envelope, kv_policy=lambda p, *, kv_len: KVPolicy.all(),
    select=landmark_select, attend=attend_by(landmark_select), granularity="block",
    onnx=OnnxLowering(_landmark_onnx_layout, _landmark_onnx_scores),
)


def longheads_select(q: Tensor, k: Tensor, *, params: dict, state: dict | None,
                     mask_mod: MaskMod | None) -> BlockLayout:
    """LongHeads (Lu et al., 2024): each head picks the chunks most relevant to its (chunk-pooled)
    queries, the chunk represented by its mean key, within ``trained_length`` tokens; the first chunk
    and the local chunk are always kept, so every head sees a trained-length context."""
    mm = check_causal(mask_mod, "longheads")
    sq, sk = _sizes(q, k, "longheads")
    cs = params["chunk_size"]
    kk = max(1, params["trained_length"] // cs)
    s = block_query_scores(q, block_mean(k, cs), cs, "mean")
    return topk_block_layout(s, kk, q_len=sq, kv_len=sk, block=cs, sink_blocks=1,
                        share=params["share_kv_heads"], reduce="mean", mask_mod=mm)


LONGHEADS = DynamicMethod(
    name="longheads",
    paper="LongHeads: Multi-Head Attention is Secretly a Long Context Processor (Lu et al., 2024)",
    summary="Per head: chunks by mean-key relevance within the trained length; first and local chunk kept.",
    params=(
        Param("chunk_size", "int", 128, 16, 4096, "tokens per chunk (= engine block)"),
        Param("trained_length", "int", 2048, 16, None, "tokens each head attends (the trained context)"),
        Param("share_kv_heads", "bool", False, None, None,
              "GQA: the heads of a KV group share one selection (False = per head, as in the paper)"),
    ),
    kind="dynamic", phases=frozenset({"prefill", "decode"}), needs_calibration=False, crossover=4096,
    crossover_why="within the trained length the method is dense causal",
    mask_mod=causal_envelope, kv_policy=lambda p, *, kv_len: KVPolicy.all(),
    select=longheads_select, attend=attend_by(longheads_select), granularity="block",
)
