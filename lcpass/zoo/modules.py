"""Hand-written torch modules of the zoo (`lcpass.zoo`): attention spelled every way people write it,
plus softmaxes that are not attention.

Every module is plain torch and exports with `torch.export`. All but `NanoGPT` also trace with
`torch.fx.symbolic_trace`: shapes come from `unflatten`/`flatten`, and masks are built from the sequence
length with torch ops (`arange` comparisons, `full(-inf).triu(1)`, `generate_square_subsequent_mask`).
`NanoGPT` keeps nanoGPT's own spelling, a `tril` buffer sliced `[:, :, :T, :T]`, which symbolic_trace
cannot do (buffers are real tensors there, so slicing one by a Proxy length raises TypeError).
Shapes: hidden C = 64, H = 4 heads, D = 16; `B, S` from the inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

C, H, D, MAX_LEN, VOCAB = 64, 4, 16, 64, 128
SCALE = 1.0 / math.sqrt(D)


def _heads(t: torch.Tensor, heads: int = H) -> torch.Tensor:
    """[B, S, heads*D] -> [B, heads, S, D]."""
    return t.unflatten(-1, (heads, D)).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H*D]."""
    return t.transpose(1, 2).flatten(2)


def _causal_keep(s: int, device: torch.device) -> torch.Tensor:
    """[s, s] bool, True = keep (key index <= query index), from an arange comparison."""
    i = torch.arange(s, device=device)
    return i[:, None] >= i[None, :]


def _causal_additive(s: int, device: torch.device) -> torch.Tensor:
    """[s, s] float: 0 on and below the diagonal, -inf above."""
    return torch.full((s, s), float("-inf"), device=device).triu(1)


def _square_causal(s: int, device: torch.device) -> torch.Tensor:
    """nn.Transformer's float causal mask (0 / -inf), as users of nn.MultiheadAttention build it."""
    return nn.Transformer.generate_square_subsequent_mask(s, device=device)


class _QKV(nn.Module):
    """Separate q/k/v/o projections; `kv_heads` < H gives GQA/MQA."""

    def __init__(self, kv_heads: int = H) -> None:
        super().__init__()
        self.q = nn.Linear(C, H * D)
        self.k = nn.Linear(C, kv_heads * D)
        self.v = nn.Linear(C, kv_heads * D)
        self.o = nn.Linear(H * D, C)
        self.kv_heads = kv_heads


# ---------------------------------------------------------------------------------------- positives


class MHA(nn.Module):
    """nn.MultiheadAttention self-attention; optional causal float mask; returns output (and weights)."""

    def __init__(self, need_weights: bool, causal: bool = False, return_weights: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(C, H, dropout=0.0, batch_first=True)
        self.need_weights, self.causal, self.return_weights = need_weights, causal, return_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        mask = _square_causal(x.shape[1], x.device) if self.causal else None
        out, weights = self.attn(x, x, x, need_weights=self.need_weights, attn_mask=mask)
        return (out, weights) if self.return_weights else out


class Encoder(nn.Module):
    """nn.TransformerEncoder (2 layers) with a causal float mask and is_causal=True."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(C, H, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, mask=_square_causal(x.shape[1], x.device), is_causal=True)


class Decoder(nn.Module):
    """nn.TransformerDecoderLayer: causal self-attention on tgt, cross-attention to memory."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(C, H, 128, dropout=0.0, batch_first=True)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        mask = _square_causal(tgt.shape[1], tgt.device)
        return self.layer(tgt, memory, tgt_mask=mask, tgt_is_causal=True)


class NanoCausalSelfAttention(nn.Module):
    """nanoGPT's CausalSelfAttention (the non-flash branch), with the head size as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.attn_dropout = nn.Dropout(0.1)
        self.resid_dropout = nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(MAX_LEN, MAX_LEN)).view(1, 1, MAX_LEN, MAX_LEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = _heads(q), _heads(k), _heads(v)  # [B, H, T, D]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v  # [B, H, T, D]
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NanoBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), x + mlp(ln(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = NanoCausalSelfAttention()
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """A 2-block nanoGPT language model returning logits [B, T, VOCAB]."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, C), nn.Embedding(MAX_LEN, C)
        self.h = nn.ModuleList([NanoBlock(), NanoBlock()])
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(0, idx.shape[1], dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class EinsumAttn(_QKV):
    """einsum scores, torch.where causal mask, Tensor.softmax, einsum output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        q, k, v = _heads(self.q(x)), _heads(self.k(x)), _heads(self.v(x))
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * SCALE
        scores = torch.where(_causal_keep(s, x.device), scores, float("-inf"))
        p = scores.softmax(-1)
        return self.o(_merge(torch.einsum("bhqk,bhkd->bhqd", p, v)))


class BaddbmmAttn(_QKV):
    """3-D [B*H, S, D] layout: baddbmm(causal bias, q*scale, kᵀ), torch.softmax, torch.bmm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        q, k, v = (_heads(t).flatten(0, 1) for t in (self.q(x), self.k(x), self.v(x)))  # [B*H, S, D]
        scores = torch.baddbmm(_causal_additive(s, x.device), q * SCALE, k.transpose(1, 2))
        p = torch.softmax(scores, dim=-1)
        out = torch.bmm(p, v).unflatten(0, (-1, H))  # [B, H, S, D]
        return self.o(_merge(out))


class MQAAttn(_QKV):
    """One kv head expanded to H query heads; additive causal bias; softmax in float32."""

    def __init__(self) -> None:
        super().__init__(kv_heads=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        q = _heads(self.q(x))  # [B, H, S, D]
        k = _heads(self.k(x), 1).expand(-1, H, -1, -1)  # [B, 1, S, D] -> [B, H, S, D]
        v = _heads(self.v(x), 1).expand(-1, H, -1, -1)
        bias = torch.zeros((s, s), device=x.device).masked_fill(~_causal_keep(s, x.device), float("-inf"))
        scores = q @ k.transpose(-2, -1) * SCALE + bias
        p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o(_merge(p @ v))


class CrossAttn(_QKV):
    """q from x [B, Q, C], k/v from memory [B, K, C], Q != K; scale as a division; no mask."""

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q, k, v = _heads(self.q(x)), _heads(self.k(memory)), _heads(self.v(memory))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
        p = F.softmax(scores, dim=-1)
        return self.o(_merge(torch.matmul(p, v)))


class SqrtSplitScale(_QKV):
    """D**-0.25 multiplied into q and into k (as SDPA's decomposition does); no mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _heads(self.q(x)), _heads(self.k(x)), _heads(self.v(x))
        root = math.sqrt(SCALE)
        scores = (q * root) @ (k * root).transpose(-1, -2)
        return self.o(_merge(scores.softmax(dim=-1) @ v))


class DecomposedSoftmax(_QKV):
    """Softmax written out: s - amax, exp, / sum; additive causal bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        q, k, v = _heads(self.q(x)), _heads(self.k(x)), _heads(self.v(x))
        scores = (q @ k.transpose(-2, -1)) * SCALE + _causal_additive(s, x.device)
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        p = e / e.sum(-1, keepdim=True)
        return self.o(_merge(p @ v))


class SdpaGQA(_QKV):
    """F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) with 2 kv heads."""

    def __init__(self) -> None:
        super().__init__(kv_heads=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _heads(self.q(x)), _heads(self.k(x), 2), _heads(self.v(x), 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(_merge(out))


# ---------------------------------------------------------------------------------------- negatives


class ClassifierHead(nn.Module):
    """Mean-pooled features -> linear -> softmax over 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(C, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.fc(x.mean(1)), dim=-1)


class MoERouter(nn.Module):
    """Router softmax over 4 experts, top-2 gates, weighted sum of expert outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(C, 4)
        self.experts = nn.ModuleList([nn.Linear(C, C) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.router(x).softmax(dim=-1)  # [B, S, E]
        top_p, top_i = probs.topk(2, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # [B, S, E, C]
        return (outs * gates.unsqueeze(-1)).sum(-2)


class WeightScores(nn.Module):
    """softmax(x @ W) @ v with W a [C, 19] parameter: scores from a weight, not from keys."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(C, 19) / math.sqrt(C))
        self.v = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(x @ self.w, dim=-1)  # [B, S, 19]
        return p @ self.v(x)  # needs S == 19


class ProbsReused(_QKV):
    """Causal attention whose probabilities also feed the output (column sums, projected)."""

    def __init__(self) -> None:
        super().__init__()
        self.col = nn.Linear(H, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        q, k, v = _heads(self.q(x)), _heads(self.k(x)), _heads(self.v(x))
        scores = (q @ k.transpose(-2, -1)) * SCALE + _causal_additive(s, x.device)
        p = scores.softmax(-1)
        return self.o(_merge(p @ v)) + self.col(p.sum(-2).transpose(1, 2))


class AxisSoftmax(_QKV):
    """softmax of q·kᵀ over a wrong axis (`dim`), then @ v."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _heads(self.q(x)), _heads(self.k(x)), _heads(self.v(x))
        p = torch.softmax((q @ k.transpose(-2, -1)) * SCALE, dim=self.dim)
        return self.o(_merge(p @ v))


class GumbelSampler(nn.Module):
    """Gumbel-softmax over LM logits with a fixed noise buffer, then a soft embedding p @ E."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, C)
        self.mix = nn.Linear(C, C)
        self.lm_head = nn.Linear(C, VOCAB, bias=False)
        self.tau = 0.7
        u = torch.rand(VOCAB).clamp(1e-6, 1 - 1e-6)
        self.register_buffer("gumbel", -torch.log(-torch.log(u)), persistent=False)  # fixed noise: deterministic

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(torch.tanh(self.mix(self.emb(idx))))  # [B, S, V]
        p = F.softmax((logits + self.gumbel) / self.tau, dim=-1)
        return p @ self.emb.weight  # [B, S, C]


class AttentionMapOnly(_QKV):
    """softmax(q @ kᵀ * scale) returned as a map: no value matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = _heads(self.q(x)), _heads(self.k(x))
        return torch.softmax((q @ k.transpose(-2, -1)) * SCALE, dim=-1)
