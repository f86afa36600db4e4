"""Token-granular dynamic selectors: TokenSelect, HiP, Recycled Attention, TidalDecode.

They return a :class:`~lcpass.methods.dynamic.common.TokenSelection` (K past tokens per KV head and
query block, plus the causal local block), or a causal :class:`BlockLayout` on steps where the method
runs full attention (Recycled's full steps, TidalDecode's selection layers and prefill). Stateful
methods keep what they reuse in the per-site ``state`` dict; TidalDecode's positions live in a
:class:`TidalState` object shared by every site of the model.

>>> import torch
>>> q = torch.randn(1, 8, 512, 64); k = torch.randn(1, 2, 512, 64)
>>> from lcpass.methods import validate_params
>>> p = validate_params("tokenselect", {"k": 64, "n_sink": 4})
>>> sel = tokenselect_select(q, k, params=p, state=None, mask_mod=None)
>>> tuple(sel.indices.shape)          # [B, Hkv, Mq, K]: k + n_sink tokens
(1, 2, 4, 68)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lcpass.layout import BlockLayout, build_layout
from lcpass.masks import MaskMod, causal_mask
from lcpass.methods.base import KVPolicy, Param
from lcpass.methods.dynamic.common import (FORCE, DecodeSelector, DynamicMethod, TokenSelection, attend_by,
                                           block_mean, causal_envelope, check_causal)
from lcpass.methods.dynamic.decode import recycled_decode, tidal_decode, tokenselect_decode

__all__ = ["TOKENSELECT", "HIP", "RECYCLED", "TIDAL", "TidalState", "tokenselect_select",
           "hip_select", "recycled_select", "tidal_select"]


_VOTE_ELEMS = 1 << 18  # scores per TokenSelect chunk (G heads x query blocks x keys): stays in cache


def _topk_tokens(score: Tensor, K: int) -> Tensor:
    """Indices of the K best finite scores per row, -1 where fewer are finite. score [..., Sk]."""
    K = min(K, score.shape[-1])
    top = score.topk(K, dim=-1)
    return torch.where(torch.isfinite(top.values), top.indices, -1)


def _starts(Sq: int, Sk: int, bq: int, device: torch.device) -> Tensor:
    """Absolute position of each query block's first query: int64 [Mq] on ``device``."""
    return torch.arange(-(-Sq // bq), device=device) * bq + (Sk - Sq)


def _starts_list(Sq: int, Sk: int, bq: int) -> list[int]:
    """:func:`_starts` as Python ints (loop bounds and sizes without a device round trip)."""
    return [i * bq + (Sk - Sq) for i in range(-(-Sq // bq))]


def _causal_layout(Hq: int, Sq: int, Sk: int) -> BlockLayout:
    return build_layout(causal_mask(), Hq, Sq, Sk)


# ----------------------------------------------------------------------------------------------
# TokenSelect


def tokenselect_select(q: Tensor, k: Tensor, *, params: dict, state: dict | None,
                       mask_mod: MaskMod | None) -> TokenSelection:
    """TokenSelect (Wu et al., 2024): per-head criticality ``q . k`` of every past token, soft voting
    across the query heads of a KV group (per-head softmax, then sum), the ``k`` best tokens per KV
    head, plus ``n_sink`` initial and ``n_local`` recent tokens. Prefill scores each query block with
    its mean query; decode uses the query itself and, with a ``state`` dict, the *selection cache*:
    when every head's query has cosine similarity >= ``cache_threshold`` with the query of the last
    fresh selection, that selection is reused (``state["tokenselect_hits"]`` counts reuses).

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D] -> TokenSelection with indices [B, Hkv, Mq, K].
    """
    check_causal(mask_mod, "tokenselect")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bq = params["block_size"]
    dev = q.device
    starts = _starts(Sq, Sk, bq, dev)  # [Mq] past tokens per query block
    first = _starts_list(Sq, Sk, bq)  # the same, as Python ints
    mq = starts.shape[0]
    K = min(params["k"] + params["n_sink"] + params["n_local"], first[-1])
    kv = torch.arange(Sk, device=dev)
    invalid = kv[None] >= starts[:, None]  # [Mq, Sk]: not strictly before the query block
    forced = ~invalid & ((kv[None] < params["n_sink"]) | (kv[None] >= starts[:, None] - params["n_local"]))
    qbar = block_mean(q, bq)  # [B, Hq, Mq, D]
    if K == 0:
        return TokenSelection(torch.zeros(B, Hkv, mq, 0, dtype=torch.long, device=dev), bq, Sq, Sk)
    cache = state.get("tokenselect") if state is not None else None
    if (Sq == 1 and cache is not None and cache["K"] == K and cache["kv_len"] < Sk
            and cache["q"].shape == qbar[:, :, 0].shape):
        cos = F.cosine_similarity(qbar[:, :, 0].float(), cache["q"], dim=-1)  # [B, Hq]
        # host sync (decode, one per call): reusing the cached selection is a Python branch
        if bool((cos >= params["cache_threshold"]).all()):
            content = cache["content"]  # [B, Hkv, K] ranked, -1 = none
            score = torch.full((B, Hkv, 1, Sk + 1), float("-inf"), device=dev)
            rank = torch.arange(K, 0, -1, dtype=torch.float32, device=dev).expand(B, Hkv, K)
            score[:, :, 0].scatter_(-1, torch.where(content < 0, Sk, content), rank)
            score = score[..., :Sk].masked_fill(forced, FORCE).masked_fill(invalid, float("-inf"))
            state["tokenselect_hits"] = state.get("tokenselect_hits", 0) + 1
            return TokenSelection(_topk_tokens(score, K), bq, Sq, Sk)
    # per chunk of query blocks, only the keys some block of the chunk may select (before its start):
    # the causal triangle is skipped instead of scored and masked
    qs = qbar.float() * D ** -0.5  # [B, Hq, Mq, D]
    kt = k.float().transpose(-1, -2)  # [B, Hkv, D, Sk]
    idx = torch.full((B, Hkv, mq, K), -1, dtype=torch.long, device=dev)
    step = max(1, min(-(-mq // 8), _VOTE_ELEMS // max(1, G * Sk)))  # query blocks per chunk
    for i0 in range(0, mq, step):
        i1 = min(mq, i0 + step)
        hi, c = first[i1 - 1], i1 - i0
        if hi <= 0:
            continue
        qc = qs.view(B, Hkv, G, mq, D)[:, :, :, i0:i1].reshape(B, Hkv, G * c, D)
        s = (qc @ kt[..., :hi]).view(B, Hkv, G, c, hi)
        inv = invalid[i0:i1, :hi]
        # per-head softmax over the valid past, in place: s [B, Hkv, G, c, hi]
        s.masked_fill_(inv, float("-inf"))
        mx = s.amax(-1, keepdim=True).nan_to_num_(0.0, 0.0, 0.0)  # rows without a past: 0
        s.sub_(mx).exp_()
        s.div_(s.sum(-1, keepdim=True).clamp_(min=1e-30))
        vote = s.sum(2)  # [B, Hkv, c, hi]: soft vote of the group's heads
        del s
        vote.masked_fill_(inv, float("-inf"))
        kk = min(K, hi)
        idx[:, :, i0:i1, :kk] = _topk_tokens(vote.masked_fill(forced[i0:i1, :hi], FORCE), kk)
        if state is not None and Sq == 1:
            content = torch.full((B, Hkv, K), -1, dtype=torch.long, device=dev)
            content[..., :kk] = _topk_tokens(vote.masked_fill(forced[i0:i1, :hi], float("-inf")), kk)[:, :, 0]
            state["tokenselect"] = {"q": qbar[:, :, 0].float(), "content": content, "K": K, "kv_len": Sk}
    return TokenSelection(idx, bq, Sq, Sk)


TOKENSELECT = DynamicMethod(
    name="tokenselect",
    paper="TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via "
          "Dynamic Token-Level KV Cache Selection (Wu et al., 2024)",
    summary="Per-KV-head top-k tokens by head soft voting of q.k; selection cache across similar queries.",
    params=(
        Param("k", "int", 2048, 0, None, "tokens selected per KV head (besides sinks and local)"),
        Param("n_sink", "int", 4, 0, None, "initial tokens always kept"),
        Param("n_local", "int", 0, 0, None, "recent tokens before the query block always kept"),
        Param("block_size", "int", 128, 1, 4096, "queries per prefill chunk scored by their mean"),
        Param("cache_threshold", "float", 0.9, -1.0, 2.0,
              "decode: reuse the last selection while query cosine similarity >= this (> 1: never reuse)"),
    ),
    kind="dynamic", phases=frozenset({"prefill", "decode"}), needs_calibration=False, crossover=4096,
    crossover_why="below ~4k tokens a 2k budget keeps most of the context",
    mask_mod=causal_envelope, kv_policy=lambda p, *, kv_len: KVPolicy.all(),
    select=tokenselect_select, attend=attend_by(tokenselect_select), granularity="token",
    decode=DecodeSelector(("k", "n_sink", "n_local", "cache_threshold"), tokenselect_decode,
                          budget=lambda p: p["k"], working_slots=lambda p: p["k"] + p["n_sink"] + p["n_local"] + 1),
)


# ----------------------------------------------------------------------------------------------
# HiP


def hip_select(q: Tensor, k: Tensor, *, params: dict, state: dict | None,
               mask_mod: MaskMod | None) -> TokenSelection:
    """HiP attention (Lee et al., 2024): hierarchical pruning. Per query block the past (after
    ``sink`` tokens) is cut into ``k // block_size_k`` branches; at each level every branch longer than
    ``block_size_k`` is split in two, each half scored by its representative (middle) key against the
    block's queries (max over queries and the KV group's heads), and the best ``k // block_size_k``
    halves are kept. O(T log T); no branch is dropped before it was scored. ``n_local`` recent tokens
    before the query block are always kept (in addition to ``k``).

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D] -> TokenSelection [B, Hkv, Mq, sink + k].
    """
    check_causal(mask_mod, "hip")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bq, bk = params["block_size_q"], params["block_size_k"]
    n = max(1, params["k"] // bk)
    dev = q.device
    P = _starts(Sq, Sk, bq, dev)  # [Mq]
    mq = P.shape[0]
    lo = torch.clamp(P, max=params["sink"])
    j = torch.arange(n, device=dev)
    span = P - lo
    s = (lo[:, None] + (j[None] * span[:, None]) // n).expand(B, Hkv, mq, n).contiguous()
    e = (lo[:, None] + ((j[None] + 1) * span[:, None]) // n).expand(B, Hkv, mq, n).contiguous()
    pad = mq * bq - Sq
    qb = F.pad(q.float(), (0, 0, 0, pad)).view(B, Hkv, G, mq, bq, D).transpose(2, 3)
    qb = qb.reshape(B, Hkv, mq, G * bq, D)
    qvalid = (torch.arange(mq * bq, device=dev) < Sq).view(mq, 1, bq).expand(mq, G, bq).reshape(mq, G * bq, 1)
    kf = k.float()
    # host sync per level (O(log T) of them): how many halvings a block needs depends on which
    # branches won, so the loop's trip count is data-dependent
    while bool(((e - s) > bk).any()):
        long = (e - s) > bk
        mid = torch.where(long, (s + e) // 2, e)
        cs, ce = torch.cat([s, mid], -1), torch.cat([mid, e], -1)  # [B, Hkv, Mq, 2n]
        rep = ((cs + ce - 1) // 2).clamp(min=0)
        kr = torch.gather(kf, 2, rep.view(B, Hkv, -1, 1).expand(-1, -1, -1, D)).view(B, Hkv, mq, 2 * n, D)
        sc = (qb @ kr.transpose(-1, -2)).masked_fill(~qvalid, float("-inf")).amax(-2)  # [B,Hkv,Mq,2n]
        sc = sc.masked_fill(ce <= cs, float("-inf"))
        top = sc.topk(n, dim=-1).indices
        s, e = cs.gather(-1, top), ce.gather(-1, top)
    tok = s[..., None] + torch.arange(bk, device=dev)  # [B, Hkv, Mq, n, bk]
    tok = torch.where(tok < e[..., None], tok, -1).flatten(-2)
    sink = torch.arange(params["sink"], device=dev)
    sinks = torch.where(sink[None] < P[:, None], sink[None], -1).expand(B, Hkv, mq, -1)
    # recent tokens [Mq, n_local]
    loc = P[:, None] - params["n_local"] + torch.arange(params["n_local"], device=dev)
    tok = torch.where(tok >= (P - params["n_local"]).view(1, 1, mq, 1), -1, tok)  # no duplicates
    loc = torch.where(loc >= lo[:, None], loc, -1).expand(B, Hkv, mq, -1)
    return TokenSelection(torch.cat([sinks, loc, tok], -1), bq, Sq, Sk)


HIP = DynamicMethod(
    name="hip",
    paper="A Training-Free Sub-quadratic Cost Transformer Model Serving Framework With Hierarchically "
          "Pruned Attention (HiP, Lee et al., 2024)",
    summary="Per query block, hierarchical halving of key branches scored by representative keys; top-k.",
    params=(
        Param("k", "int", 2048, 1, None, "selected key tokens per query block (besides sinks)"),
        Param("block_size_q", "int", 128, 1, 4096, "queries sharing one selection"),
        Param("block_size_k", "int", 32, 1, 4096, "leaf branch length (tokens)"),
        Param("sink", "int", 4, 0, None, "initial tokens always kept"),
        Param("n_local", "int", 0, 0, None, "recent tokens before the query block always kept"),
    ),
    kind="dynamic", phases=frozenset({"prefill", "decode"}), needs_calibration=False, crossover=4096,
    crossover_why="below ~4k tokens a 2k budget keeps most of the context",
    mask_mod=causal_envelope, kv_policy=lambda p, *, kv_len: KVPolicy.all(),
    select=hip_select, attend=attend_by(hip_select), granularity="token",
)


# ----------------------------------------------------------------------------------------------
# Recycled Attention


def _last_query_votes(q: Tensor, k: Tensor) -> Tensor:
    """Attention probabilities of the last query, summed over each KV group: [B, Hkv, Sk]."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    s = q[:, :, -1:].float().view(B, Hkv, Hq // Hkv, 1, D) @ k.float()[:, :, None].transpose(-1, -2)
    return torch.softmax(s * D ** -0.5, -1).sum(2)[:, :, 0]


def recycled_select(q: Tensor, k: Tensor, *, params: dict, state: dict | None,
                    mask_mod: MaskMod | None) -> BlockLayout | TokenSelection:
    """Recycled Attention (Xu et al., 2024): full attention on prefill and every ``S`` decode steps,
    recording the ``K`` tokens the last query attended most (per KV head); between full steps a decode
    query attends only those ``K`` tokens plus the tokens generated since. Needs a ``state`` dict.
    """
    check_causal(mask_mod, "recycled")
    if state is None:
        raise ValueError("recycled: needs a per-site state dict (pass state={}) to recycle selections")
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    rec = state.get("recycled")
    if Sq > 1 or rec is None or rec["since"] + 1 >= params["S"] or rec["full_len"] >= Sk:
        votes = _last_query_votes(q, k)
        state["recycled"] = {"topk": _topk_tokens(votes, params["K"]), "full_len": Sk, "since": 0}
        return _causal_layout(Hq, Sq, Sk)
    rec["since"] += 1
    new = torch.arange(rec["full_len"], Sk - 1, device=k.device).expand(B, k.shape[1], -1)
    idx = torch.cat([rec["topk"], new], -1)[:, :, None]  # [B, Hkv, 1, K + new]
    return TokenSelection(idx, 1, Sq, Sk)


RECYCLED = DynamicMethod(
    name="recycled",
    paper="Recycled Attention: Efficient inference for long-context language models (Xu et al., 2024)",
    summary="Full attention every S decode steps; in between only the top-K tokens of the last full step.",
    params=(
        Param("S", "int", 10, 1, None, "decode steps between full-attention steps"),
        Param("K", "int", 2048, 1, None, "tokens recycled from the last full step"),
    ),
    kind="dynamic", phases=frozenset({"decode"}), needs_calibration=False, crossover=4096,
    crossover_why="decode only; below ~4k tokens the recycled set is most of the context",
    mask_mod=causal_envelope, kv_policy=lambda p, *, kv_len: KVPolicy.all(),
    select=recycled_select, attend=attend_by(recycled_select), granularity="token",
    decode=DecodeSelector(("S", "K"), recycled_decode, budget=lambda p: p["K"]),
)


# ----------------------------------------------------------------------------------------------
# TidalDecode


@dataclass
class TidalState:
    """Positions picked by TidalDecode's token-selection layers, shared by every site of a model.

    Give every site ``state={"tidal": shared, "layer": i, "n_layers": L}`` with one ``shared``.
    """

    positions: Tensor | None = None  # [B, k] absolute positions
    kv_len: int = 0


def tidal_select(q: Tensor, k: Tensor, *, params: dict, state: dict | None,
                 mask_mod: MaskMod | None) -> BlockLayout | TokenSelection:
    """TidalDecode (Yang et al., 2024): layers before ``selection_layer`` and the token-selection
    layers (``selection_layer`` and ``reselection_layer``, default the middle layer) run full
    attention; a selection layer picks the ``k`` positions with the most attention from the current
    query (summed over all heads); every other decode layer attends only those positions (and
    itself). Prefill is full. ``state`` = ``{"tidal": TidalState, "layer": int, "n_layers": int}``.
    """
    check_causal(mask_mod, "tidal")
    if state is None or not isinstance(state.get("tidal"), TidalState) or "layer" not in state:
        raise ValueError("tidal: needs state={'tidal': TidalState() shared by all sites, 'layer': i, "
                         "'n_layers': L}")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    layer = state["layer"]
    re = params["reselection_layer"]
    if re < 0:
        if "n_layers" not in state:
            raise ValueError("tidal: reselection_layer=-1 (middle layer) needs state['n_layers']")
        re = state["n_layers"] // 2
    shared: TidalState = state["tidal"]
    if layer in (params["selection_layer"], re):
        shared.positions = _topk_tokens(_last_query_votes(q, k).sum(1), params["k"])  # [B, k]
        shared.kv_len = Sk
        return _causal_layout(Hq, Sq, Sk)
    if Sq > 1 or layer < params["selection_layer"] or shared.positions is None or shared.kv_len != Sk:
        return _causal_layout(Hq, Sq, Sk)
    pos = shared.positions
    pos = torch.where(pos < Sk - Sq, pos, -1)
    return TokenSelection(pos[:, None, None].expand(B, Hkv, 1, -1).contiguous(), Sq, Sq, Sk)


TIDAL = DynamicMethod(
    name="tidal",
    paper="TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention "
          "(Yang et al., 2024)",
    summary="Full attention at token-selection layers (2 and middle) picking top-k positions; others reuse.",
    params=(
        Param("k", "int", 2048, 1, None, "positions selected per step"),
        Param("selection_layer", "int", 2, 0, None, "first token-selection layer (full attention)"),
        Param("reselection_layer", "int", -1, -1, None, "second selection layer; -1 = the middle layer"),
    ),
    kind="dynamic", phases=frozenset({"decode"}), needs_calibration=False, crossover=4096,
    crossover_why="decode only; below ~4k tokens the selected positions are most of the context",
    mask_mod=causal_envelope, kv_policy=lambda p, *, kv_len: KVPolicy.all(),
    select=tidal_select, attend=attend_by(tidal_select), granularity="token",
    decode=DecodeSelector(("k", "selection_layer", "reselection_layer"), tidal_decode, budget=lambda p: p["k"]),
)
