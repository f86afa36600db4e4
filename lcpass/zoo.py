"""The model zoo: tiny random-weight models whose attention sites are known exactly.

Every entry is a plain factory returning a `ZooModel`: the module (eval, fp32, deterministic: each factory
seeds torch itself), keyword example inputs, the exact number of attention computations one forward performs
(`n_attention` = expected canonical sites) and, in forward execution order, what each site must be
detected as (`expected`, built by `site()`). Nothing is downloaded: transformers models are built from
configs.

Registries (explicit and ordered; no auto-discovery):
    ZOO       name -> factory, models with attention (transformers tiny configs, then hand-written torch).
    NEGATIVE  name -> factory, models with a softmax that is NOT attention (n_attention == 0); the detector
              must reject every softmax, and its reason must contain `reason_contains`.

Naming: transformers entries are `<family>-tiny` (attn_implementation="sdpa") and `<family>-tiny-eager`
(attn_implementation="eager"); Gemma2 only supports eager (softcapping), so it is `gemma2-tiny-eager` only.

Site expectation keys (see `site()`):
    mask      what the scores are masked with, the logical kind the detector must recover:
              "none" (full, bidirectional), "causal", "sliding" (causal + window), "padding" (key padding,
              bidirectional), "causal+padding", "bias" (an additive float tensor that must be kept: T5's
              learned relative position bias, or T5 cross-attention's all-zero bias), "causal+bias".
    window    for "sliding": HF `sliding_window` semantics, key j is kept for query i iff 0 <= i - j < window
              (window keys including the query's own position); else None.
    hq, hkv   query and key/value heads (hkv divides hq; 1 = MQA).
    head_dim  D of q/k/v.
    softcap   tanh soft-capping of the scores (Gemma2's attn_logit_softcapping), else None.
    cross     True when keys/values come from another sequence (encoder-decoder cross-attention).
    scale     the softmax scale actually applied to q·kᵀ (T5: 1.0; Gemma: query_pre_attn_scalar**-0.5).

Example:
    >>> from lcpass.zoo import get_zoo_model
    >>> z = get_zoo_model("mistral-tiny")
    >>> z.n_attention, z.expected[0]["mask"], z.expected[0]["window"]
    (2, 'sliding', 8)
    >>> logits = z.model(**z.example_inputs).logits
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lcpass import zoo_modules as _m

__all__ = [
    "ZooModel",
    "ZOO",
    "TRANSFORMERS_ZOO",
    "TORCH_ZOO",
    "NEGATIVE",
    "MASK_KINDS",
    "site",
    "zoo_names",
    "negative_names",
    "get_zoo_model",
    "UnknownZooModelError",
]

MASK_KINDS = ("none", "causal", "sliding", "padding", "causal+padding", "bias", "causal+bias")

# Shared tiny shapes: hidden 64 = 4 heads x 16, two layers, lengths that are not multiples of 8.
HIDDEN, HEADS, HEAD_DIM, LAYERS, VOCAB = 64, 4, 16, 2, 128
BATCH, SEQ = 2, 19
WINDOW = 8


@dataclass
class ZooModel:
    """One zoo entry, ready to run: `model(**example_inputs)`.

    Attributes:
        name: registry name.
        model: the module, eval mode, fp32, deterministic weights.
        example_inputs: keyword arguments of one forward.
        n_attention: attention computations in one forward (= canonical sites the detector must produce).
        expected: one `site()` dict per attention computation, in forward execution order.
        causal_lm: the model is a causal language model (supports decode / generate).
        family: model family ("llama", "t5", "torch", ...).
        attn_impl: transformers attn_implementation ("sdpa" / "eager"), None for hand-written models.
        export_ok: torch.export.export(model, (), example_inputs, strict=False) succeeds.
        fx_ok: torch.fx.symbolic_trace(model) succeeds (False for every transformers v5 model).
        reason_contains: negatives only: words the detector's rejection reason must contain.
        notes: what is special about the entry (how it traces, what it returns).
    """

    name: str
    model: nn.Module
    example_inputs: dict[str, Any]
    n_attention: int
    expected: list[dict[str, Any]]
    causal_lm: bool
    family: str
    attn_impl: str | None
    export_ok: bool = True
    fx_ok: bool = False
    reason_contains: str | None = None
    notes: str = ""


class UnknownZooModelError(ValueError):
    """A zoo name that is in neither registry."""


def site(
    mask: str,
    hq: int = HEADS,
    hkv: int | None = None,
    head_dim: int = HEAD_DIM,
    *,
    window: int | None = None,
    softcap: float | None = None,
    cross: bool = False,
    scale: float | None = None,
) -> dict[str, Any]:
    """One attention site's expectation (see the module docstring for the keys).

    `hkv` defaults to `hq`, `scale` to `head_dim ** -0.5`.

    Example:
        >>> site("sliding", 4, 2, window=8)["scale"]
        0.25
    """
    if mask not in MASK_KINDS:
        raise ValueError(f"site(mask={mask!r}): unknown mask kind; use one of {MASK_KINDS}")
    if (mask == "sliding") != (window is not None):
        raise ValueError(f"site(mask={mask!r}, window={window!r}): a window goes with mask='sliding' only")
    hkv = hq if hkv is None else hkv
    if hq % hkv:
        raise ValueError(f"site(hq={hq}, hkv={hkv}): hkv must divide hq")
    return dict(
        mask=mask,
        window=window,
        hq=hq,
        hkv=hkv,
        head_dim=head_dim,
        softcap=softcap,
        cross=cross,
        scale=head_dim**-0.5 if scale is None else float(scale),
    )


def _tokens(batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen)


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen)


# ------------------------------------------------------------------------------------ transformers


def _hf(
    name: str,
    family: str,
    attn: str,
    config_cls: str,
    model_cls: str,
    config: dict[str, Any],
    inputs: dict[str, Any],
    expected: list[dict[str, Any]],
    causal_lm: bool,
    notes: str = "",
) -> ZooModel:
    """Build a transformers model from a fresh config (never shared: from_config mutates it)."""
    import transformers

    # config.use_cache=False: a plain forward returns no DynamicCache/EncoderDecoderCache, which torch.export
    # rejects as an output ("not a known type ... register a pytree"); generate() still uses a cache.
    cfg = getattr(transformers, config_cls)(**config, use_cache=False, attn_implementation=attn)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).to(torch.float32).eval()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    return ZooModel(
        name=name,
        model=model,
        example_inputs=inputs,
        n_attention=len(expected),
        expected=expected,
        causal_lm=causal_lm,
        family=family,
        attn_impl=attn,
        export_ok=True,
        fx_ok=False,
        notes=notes,
    )


def _decoder_cfg(**extra: Any) -> dict[str, Any]:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(extra)
    return base


def _llama(attn: str) -> ZooModel:
    return _hf(
        f"llama-tiny{'-eager' if attn == 'eager' else ''}", "llama", attn, "LlamaConfig", "LlamaForCausalLM",
        _decoder_cfg(), {"input_ids": _tokens()}, [site("causal", 4, 2)] * LAYERS, True,
        "GQA 4:2; sdpa without attention_mask: is_causal=True, enable_gqa=True",
    )


def llama_tiny() -> ZooModel:
    """Llama, sdpa, GQA 4:2, causal."""
    return _llama("sdpa")


def llama_tiny_eager() -> ZooModel:
    """Llama, eager (matmul/mul/add mask/softmax/matmul, repeat_kv), GQA 4:2, causal."""
    return _llama("eager")


def llama_tiny_padded() -> ZooModel:
    """Llama, sdpa, left-padded batch: a bool [B,1,Q,K] causal+padding mask and repeat_kv (no enable_gqa)."""
    ids = _tokens()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return _hf(
        "llama-tiny-padded", "llama", "sdpa", "LlamaConfig", "LlamaForCausalLM", _decoder_cfg(),
        {"input_ids": ids, "attention_mask": mask}, [site("causal+padding", 4, 2)] * LAYERS, True,
        "row 1 left-padded by 5 tokens; sdpa gets a bool mask, so GQA appears as repeat_kv",
    )


def _mistral(attn: str) -> ZooModel:
    return _hf(
        f"mistral-tiny{'-eager' if attn == 'eager' else ''}", "mistral", attn, "MistralConfig",
        "MistralForCausalLM", _decoder_cfg(sliding_window=WINDOW), {"input_ids": _tokens()},
        [site("sliding", 4, 2, window=WINDOW)] * LAYERS, True,
        f"sliding_window={WINDOW} < seq {SEQ}: a bool sliding mask is passed, GQA via repeat_kv",
    )


def mistral_tiny() -> ZooModel:
    """Mistral, sdpa, GQA 4:2, sliding window 8 on every layer."""
    return _mistral("sdpa")


def mistral_tiny_eager() -> ZooModel:
    """Mistral, eager, GQA 4:2, sliding window 8 on every layer."""
    return _mistral("eager")


def _qwen(family: str, attn: str) -> ZooModel:
    cls = "Qwen2" if family == "qwen2" else "Qwen3"
    return _hf(
        f"{family}-tiny{'-eager' if attn == 'eager' else ''}", family, attn, f"{cls}Config",
        f"{cls}ForCausalLM", _decoder_cfg(), {"input_ids": _tokens()}, [site("causal", 4, 2)] * LAYERS, True,
        "qkv biases" if family == "qwen2" else "QK-norm (RMSNorm on q and k per head) before RoPE",
    )


def qwen2_tiny() -> ZooModel:
    """Qwen2, sdpa, GQA 4:2, causal, q/k/v biases."""
    return _qwen("qwen2", "sdpa")


def qwen2_tiny_eager() -> ZooModel:
    """Qwen2, eager."""
    return _qwen("qwen2", "eager")


def qwen3_tiny() -> ZooModel:
    """Qwen3, sdpa, GQA 4:2, causal, QK-norm."""
    return _qwen("qwen3", "sdpa")


def qwen3_tiny_eager() -> ZooModel:
    """Qwen3, eager."""
    return _qwen("qwen3", "eager")


def _phi3(attn: str) -> ZooModel:
    cfg = _decoder_cfg(num_key_value_heads=HEADS, pad_token_id=0)
    cfg.pop("head_dim")
    return _hf(
        f"phi3-tiny{'-eager' if attn == 'eager' else ''}", "phi3", attn, "Phi3Config", "Phi3ForCausalLM",
        cfg, {"input_ids": _tokens()}, [site("causal", 4, 4)] * LAYERS, True,
        "fused qkv_proj split by slicing; MHA (4 kv heads)",
    )


def phi3_tiny() -> ZooModel:
    """Phi3, sdpa, fused qkv projection, 4 heads, causal."""
    return _phi3("sdpa")


def phi3_tiny_eager() -> ZooModel:
    """Phi3, eager."""
    return _phi3("eager")


def gemma2_tiny_eager() -> ZooModel:
    """Gemma2 (eager only: sdpa cannot softcap): softcap 50, alternating sliding (8) / full layers."""
    scalar = 256
    return _hf(
        "gemma2-tiny-eager", "gemma2", "eager", "Gemma2Config", "Gemma2ForCausalLM",
        _decoder_cfg(sliding_window=WINDOW, attn_logit_softcapping=50.0, query_pre_attn_scalar=scalar,
                     layer_types=["sliding_attention", "full_attention"]),
        {"input_ids": _tokens()},
        [site("sliding", 4, 2, window=WINDOW, softcap=50.0, scale=scalar**-0.5),
         site("causal", 4, 2, softcap=50.0, scale=scalar**-0.5)],
        True, "softcap spelled div -> tanh -> mul on the scores; scale = query_pre_attn_scalar**-0.5",
    )


def _gemma3(attn: str) -> ZooModel:
    scalar = 32
    return _hf(
        f"gemma3-tiny{'-eager' if attn == 'eager' else ''}", "gemma3", attn, "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        _decoder_cfg(num_key_value_heads=1, sliding_window=WINDOW, query_pre_attn_scalar=scalar,
                     layer_types=["sliding_attention", "full_attention"]),
        {"input_ids": _tokens()},
        [site("sliding", 4, 1, window=WINDOW, scale=scalar**-0.5), site("causal", 4, 1, scale=scalar**-0.5)],
        True, "MQA; layer 0 sliding (bool mask, repeat_kv), layer 1 full (is_causal, enable_gqa) in sdpa",
    )


def gemma3_tiny() -> ZooModel:
    """Gemma3 text, sdpa, MQA (1 kv head), QK-norm, layer_types = [sliding 8, full]."""
    return _gemma3("sdpa")


def gemma3_tiny_eager() -> ZooModel:
    """Gemma3 text, eager."""
    return _gemma3("eager")


def _gpt2(attn: str) -> ZooModel:
    cfg = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
               bos_token_id=1, eos_token_id=2)
    return _hf(
        f"gpt2-tiny{'-eager' if attn == 'eager' else ''}", "gpt2", attn, "GPT2Config", "GPT2LMHeadModel",
        cfg, {"input_ids": _tokens()}, [site("causal")] * LAYERS, True, "fused c_attn (Conv1D) split",
    )


def gpt2_tiny() -> ZooModel:
    """GPT-2, sdpa, 4 heads, causal."""
    return _gpt2("sdpa")


def gpt2_tiny_eager() -> ZooModel:
    """GPT-2, eager."""
    return _gpt2("eager")


def _gptneox(attn: str) -> ZooModel:
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=128, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    return _hf(
        f"gptneox-tiny{'-eager' if attn == 'eager' else ''}", "gpt_neox", attn, "GPTNeoXConfig",
        "GPTNeoXForCausalLM", cfg, {"input_ids": _tokens()}, [site("causal")] * LAYERS, True,
        "fused query_key_value; partial rotary (rotary_pct 0.25)",
    )


def gptneox_tiny() -> ZooModel:
    """GPT-NeoX, sdpa, 4 heads, causal."""
    return _gptneox("sdpa")


def gptneox_tiny_eager() -> ZooModel:
    """GPT-NeoX, eager."""
    return _gptneox("eager")


def _bert(attn: str) -> ZooModel:
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=128, max_position_embeddings=64, pad_token_id=0)
    ids = _tokens()
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return _hf(
        f"bert-tiny{'-eager' if attn == 'eager' else ''}", "bert", attn, "BertConfig", "BertModel", cfg,
        {"input_ids": ids, "attention_mask": mask}, [site("padding")] * LAYERS, False,
        "encoder; row 1 right-padded by 4 tokens: a key-padding mask, no causal mask may be imposed",
    )


def bert_tiny() -> ZooModel:
    """BERT encoder, sdpa, 4 heads, key padding mask."""
    return _bert("sdpa")


def bert_tiny_eager() -> ZooModel:
    """BERT encoder, eager."""
    return _bert("eager")


def _vit(attn: str) -> ZooModel:
    cfg = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, intermediate_size=128)
    return _hf(
        f"vit-tiny{'-eager' if attn == 'eager' else ''}", "vit", attn, "ViTConfig", "ViTModel", cfg,
        {"pixel_values": _randn(BATCH, 3, 16, 16)}, [site("none")] * LAYERS, False,
        "16 patches + CLS = 17 tokens; no mask at all",
    )


def vit_tiny() -> ZooModel:
    """ViT encoder, sdpa, 17 tokens, no mask."""
    return _vit("sdpa")


def vit_tiny_eager() -> ZooModel:
    """ViT encoder, eager."""
    return _vit("eager")


def _t5(attn: str) -> ZooModel:
    cfg = dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HEAD_DIM, d_ff=128, num_layers=LAYERS,
               num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8,
               relative_attention_max_distance=32, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    enc, dec = site("bias", scale=1.0), site("causal+bias", scale=1.0)
    # cross-attention adds an all-zero bias built from shapes only: it carries no information, so the
    # detector must drop it ("none"); with an encoder attention_mask it would be "padding".
    cross = site("none", cross=True, scale=1.0)
    return _hf(
        f"t5-tiny{'-eager' if attn == 'eager' else ''}", "t5", attn, "T5Config", "T5ForConditionalGeneration",
        cfg, {"input_ids": _tokens(seq=SEQ), "decoder_input_ids": _tokens(seq=11, seed=2)},
        [enc, enc, dec, cross, dec, cross], False,
        "encoder 19 tokens, decoder 11; scale 1.0; learned relative bias added to the scores (per head); "
        "cross-attention adds an all-zero [1,H,Q,K] bias tensor (no information: detected as 'none')",
    )


def t5_tiny() -> ZooModel:
    """T5 encoder-decoder, sdpa: 2 encoder self, 2 x (decoder self + cross)."""
    return _t5("sdpa")


def t5_tiny_eager() -> ZooModel:
    """T5 encoder-decoder, eager."""
    return _t5("eager")


# ------------------------------------------------------------------------------- hand-written torch

def _torch(name: str, model: nn.Module, inputs: dict[str, Any], expected: list[dict[str, Any]], *,
           fx_ok: bool = True, export_ok: bool = True, causal_lm: bool = False, notes: str = "",
           reason: str | None = None) -> ZooModel:
    return ZooModel(
        name=name, model=model.eval(), example_inputs=inputs, n_attention=len(expected), expected=expected,
        causal_lm=causal_lm, family="torch", attn_impl=None, export_ok=export_ok, fx_ok=fx_ok,
        reason_contains=reason, notes=notes,
    )


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


# ---------------------------------------------------------------------------------------- registry

TRANSFORMERS_ZOO: dict[str, Callable[[], ZooModel]] = {
    "llama-tiny": llama_tiny,
    "llama-tiny-eager": llama_tiny_eager,
    "llama-tiny-padded": llama_tiny_padded,
    "mistral-tiny": mistral_tiny,
    "mistral-tiny-eager": mistral_tiny_eager,
    "qwen2-tiny": qwen2_tiny,
    "qwen2-tiny-eager": qwen2_tiny_eager,
    "qwen3-tiny": qwen3_tiny,
    "qwen3-tiny-eager": qwen3_tiny_eager,
    "phi3-tiny": phi3_tiny,
    "phi3-tiny-eager": phi3_tiny_eager,
    "gemma2-tiny-eager": gemma2_tiny_eager,
    "gemma3-tiny": gemma3_tiny,
    "gemma3-tiny-eager": gemma3_tiny_eager,
    "gpt2-tiny": gpt2_tiny,
    "gpt2-tiny-eager": gpt2_tiny_eager,
    "gptneox-tiny": gptneox_tiny,
    "gptneox-tiny-eager": gptneox_tiny_eager,
    "bert-tiny": bert_tiny,
    "bert-tiny-eager": bert_tiny_eager,
    "vit-tiny": vit_tiny,
    "vit-tiny-eager": vit_tiny_eager,
    "t5-tiny": t5_tiny,
    "t5-tiny-eager": t5_tiny_eager,
}

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

ZOO: dict[str, Callable[[], ZooModel]] = {**TRANSFORMERS_ZOO, **TORCH_ZOO}

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


def zoo_names(source: str | None = None) -> list[str]:
    """Names in ZOO in registry order; `source` = "transformers" or "torch" selects one half."""
    if source is None:
        return list(ZOO)
    if source == "transformers":
        return list(TRANSFORMERS_ZOO)
    if source == "torch":
        return list(TORCH_ZOO)
    raise ValueError(f"zoo_names(source={source!r}): use None, 'transformers' or 'torch'")


def negative_names() -> list[str]:
    """Names in NEGATIVE, in registry order."""
    return list(NEGATIVE)


def get_zoo_model(name: str) -> ZooModel:
    """Build the entry `name` from ZOO or NEGATIVE (a fresh, deterministic model each call).

    Raises:
        UnknownZooModelError: the name is in neither registry (the message lists the known names).
    """
    factory = ZOO.get(name) or NEGATIVE.get(name)
    if factory is None:
        raise UnknownZooModelError(
            f"unknown zoo model {name!r}; known: {', '.join(ZOO)}; negatives: {', '.join(NEGATIVE)}"
        )
    return factory()
