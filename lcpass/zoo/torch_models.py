"""The model zoo's hand-written torch entries (no transformers) and its negatives (softmaxes that are
not attention); registered in :mod:`lcpass.zoo` as ``TORCH_ZOO`` and ``NEGATIVE``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lcpass.zoo import modules as _m
from lcpass.zoo.base import BATCH, HIDDEN, LAYERS, SEQ, ZooModel, _randn, _tokens, site
from lcpass.zoo.base import torch_entry as _torch

__all__ = ["TORCH_ZOO", "NEGATIVE"]


def mha() -> ZooModel:
    """nn.MultiheadAttention, need_weights=False, no mask; returns the output only."""
    torch.manual_seed(0)
    return _torch("mha", _m.MHA(need_weights=False), {"x": _randn(BATCH, SEQ, HIDDEN)}, [site("none")],
                  notes="fx: one opaque call_module leaf; export: SDPA")


def mha_weights() -> ZooModel:
    """nn.MultiheadAttention, need_weights=True with a causal float mask; returns the output only."""
    torch.manual_seed(0)
    return _torch("mha-weights", _m.MHA(need_weights=True, causal=True), {"x": _randn(BATCH, SEQ, HIDDEN)},
                  [site("causal")],
                  notes="weights are computed but NOT returned; export keeps their dead view -> mean chain "
                        "(0 users), so softmax has 2 users but only bmm is live; export: "
                        "baddbmm(mask, q*scale, kᵀ) -> softmax -> bmm over [B*H, S, D]")


def transformer_encoder() -> ZooModel:
    """nn.TransformerEncoder, 2 layers, causal float mask + is_causal=True."""
    torch.manual_seed(0)
    return _torch("transformer-encoder", _m.Encoder(), {"x": _randn(BATCH, SEQ, HIDDEN)},
                  [site("causal")] * LAYERS, notes="fx: opaque call_module; export: SDPA per layer")


def transformer_decoder() -> ZooModel:
    """nn.TransformerDecoderLayer: causal self-attention (11 tokens) + cross-attention to 17 memory tokens."""
    torch.manual_seed(0)
    return _torch("transformer-decoder", _m.Decoder(),
                  {"tgt": _randn(BATCH, 11, HIDDEN), "memory": _randn(BATCH, 17, HIDDEN, seed=2)},
                  [site("causal"), site("none", cross=True)], notes="fx: opaque call_module")


def nanogpt() -> ZooModel:
    """nanoGPT: explicit q @ kᵀ * (1/sqrt(d)), masked_fill(tril == 0, -inf), softmax, dropout, @ v."""
    torch.manual_seed(0)
    return _torch("nanogpt", _m.NanoGPT(), {"idx": _tokens()}, [site("causal")] * LAYERS, causal_lm=True,
                  fx_ok=False,
                  notes="2 blocks, fused c_attn split; tril buffer sliced [:, :, :T, :T]: symbolic_trace "
                        "fails (a buffer is a real tensor there, sliced by a Proxy); export is fine")


def einsum_attn() -> ZooModel:
    """einsum('bhqd,bhkd->bhqk') * scale, where(tril, s, -inf), softmax, einsum('bhqk,bhkd->bhqd')."""
    torch.manual_seed(0)
    return _torch("einsum-attn", _m.EinsumAttn(), {"x": _randn(BATCH, SEQ, HIDDEN)}, [site("causal")])


def baddbmm_attn() -> ZooModel:
    """3-D [B*H, S, D]: baddbmm(additive causal mask, q*scale, kᵀ), softmax, bmm."""
    torch.manual_seed(0)
    return _torch("baddbmm-attn", _m.BaddbmmAttn(), {"x": _randn(BATCH, SEQ, HIDDEN)}, [site("causal")])


def mqa_attn() -> ZooModel:
    """One kv head expanded to 4 query heads, scores + additive causal bias."""
    torch.manual_seed(0)
    return _torch("mqa-attn", _m.MQAAttn(), {"x": _randn(BATCH, SEQ, HIDDEN)}, [site("causal", 4, 1)])


def cross_attn() -> ZooModel:
    """Cross attention: 13 queries over 21 keys, scale as a division, no mask."""
    torch.manual_seed(0)
    return _torch("cross-attn", _m.CrossAttn(),
                  {"x": _randn(BATCH, 13, HIDDEN), "memory": _randn(BATCH, 21, HIDDEN, seed=2)},
                  [site("none", cross=True)])


def sqrt_split_scale() -> ZooModel:
    """Scale d**-0.25 multiplied into q and into k separately; no mask."""
    torch.manual_seed(0)
    return _torch("sqrt-split-scale", _m.SqrtSplitScale(), {"x": _randn(BATCH, SEQ, HIDDEN)}, [site("none")])


def decomposed_softmax() -> ZooModel:
    """Softmax by hand: x - amax, exp, / sum; additive causal mask."""
    torch.manual_seed(0)
    return _torch("decomposed-softmax", _m.DecomposedSoftmax(), {"x": _randn(BATCH, SEQ, HIDDEN)},
                  [site("causal")])


def sdpa_gqa() -> ZooModel:
    """F.scaled_dot_product_attention(is_causal=True, enable_gqa=True), 4 q heads over 2 kv heads."""
    torch.manual_seed(0)
    return _torch("sdpa-gqa", _m.SdpaGQA(), {"x": _randn(BATCH, SEQ, HIDDEN)}, [site("causal", 4, 2)])


# ---------------------------------------------------------------------------------------- negatives


def _neg(name: str, model: nn.Module, inputs: dict[str, Any], reason: str, notes: str) -> ZooModel:
    return _torch(name, model, inputs, [], reason=reason, notes=notes)


def neg_classifier_head() -> ZooModel:
    """Pooled features -> linear -> softmax over classes, returned."""
    torch.manual_seed(0)
    return _neg("classifier-head", _m.ClassifierHead(), {"x": _randn(BATCH, SEQ, HIDDEN)}, "not a matmul",
                "softmax input is a linear layer (activation x weight), not q @ kᵀ")


def neg_moe_router() -> ZooModel:
    """MoE router: softmax over experts of a linear, top-2, weighted sum of expert outputs."""
    torch.manual_seed(0)
    return _neg("moe-router", _m.MoERouter(), {"x": _randn(BATCH, SEQ, HIDDEN)}, "not a matmul",
                "softmax(router(x)) over 4 experts; probabilities gate expert MLP outputs")


def neg_weight_scores() -> ZooModel:
    """softmax(x @ W) @ v: the scores are a matmul with a parameter, not with keys."""
    torch.manual_seed(0)
    return _neg("weight-scores", _m.WeightScores(), {"x": _randn(BATCH, SEQ, HIDDEN)}, "parameter",
                "scores = x @ W with W an nn.Parameter [64, 19]; then probabilities @ v")


def neg_probs_reused() -> ZooModel:
    """Causal attention whose probabilities are also summed into the output."""
    torch.manual_seed(0)
    return _neg("probs-reused", _m.ProbsReused(), {"x": _randn(BATCH, SEQ, HIDDEN)},
                "probabilities used elsewhere", "out = p @ v + p.sum(-2) projected: p has two users")


def neg_mha_weights_returned() -> ZooModel:
    """nn.MultiheadAttention with need_weights=True returning (output, weights): probabilities escape."""
    torch.manual_seed(0)
    return _neg("mha-weights-returned", _m.MHA(need_weights=True, causal=True, return_weights=True),
                {"x": _randn(BATCH, SEQ, HIDDEN)}, "probabilities used elsewhere",
                "the head-averaged attention weights are a graph output")


def neg_head_axis_softmax() -> ZooModel:
    """softmax over the head axis (dim=1) of q·kᵀ, then @ v (the Inductor mis-fusion case)."""
    torch.manual_seed(0)
    return _neg("head-axis-softmax", _m.AxisSoftmax(dim=1), {"x": _randn(BATCH, SEQ, HIDDEN)},
                "not the key axis", "softmax(q @ kᵀ * scale, dim=1) @ v")


def neg_query_axis_softmax() -> ZooModel:
    """softmax over the query axis (dim=-2) of q·kᵀ, then @ v."""
    torch.manual_seed(0)
    return _neg("query-axis-softmax", _m.AxisSoftmax(dim=-2), {"x": _randn(BATCH, SEQ, HIDDEN)},
                "not the key axis", "softmax(q @ kᵀ * scale, dim=-2) @ v")


def neg_gumbel_sampler() -> ZooModel:
    """Gumbel/temperature softmax of LM logits (fixed noise buffer), soft-embedding @ E: not attention."""
    torch.manual_seed(0)
    return _neg("gumbel-sampler", _m.GumbelSampler(), {"idx": _tokens()}, "not a matmul",
                "softmax((lm_head(h) + gumbel) / tau) @ embedding.weight")


def neg_attention_map_only() -> ZooModel:
    """q @ kᵀ -> softmax, returned as an attention map: no value matmul follows."""
    torch.manual_seed(0)
    return _neg("attention-map-only", _m.AttentionMapOnly(), {"x": _randn(BATCH, SEQ, HIDDEN)},
                "no value matmul", "softmax(q @ kᵀ) is the output; nothing multiplies it by v")


# ---------------------------------------------------------------------------------------- registries

TORCH_ZOO: dict[str, Callable[[], ZooModel]] = {
    "mha": mha,
    "mha-weights": mha_weights,
    "transformer-encoder": transformer_encoder,
    "transformer-decoder": transformer_decoder,
    "nanogpt": nanogpt,
    "einsum-attn": einsum_attn,
    "baddbmm-attn": baddbmm_attn,
    "mqa-attn": mqa_attn,
    "cross-attn": cross_attn,
    "sqrt-split-scale": sqrt_split_scale,
    "decomposed-softmax": decomposed_softmax,
    "sdpa-gqa": sdpa_gqa,
}

NEGATIVE: dict[str, Callable[[], ZooModel]] = {
    "classifier-head": neg_classifier_head,
    "moe-router": neg_moe_router,
    "weight-scores": neg_weight_scores,
    "probs-reused": neg_probs_reused,
    "mha-weights-returned": neg_mha_weights_returned,
    "head-axis-softmax": neg_head_axis_softmax,
    "query-axis-softmax": neg_query_axis_softmax,
    "gumbel-sampler": neg_gumbel_sampler,
    "attention-map-only": neg_attention_map_only,
}
