"""Hand-written tiny transformers entries of the zoo (see :mod:`lcpass.zoo`): each a factory with the exact
sites one forward performs. The automatic architecture sweep (:mod:`lcpass.zoo.auto`) covers every other
architecture the installed transformers builds."""

from __future__ import annotations

from typing import Any

import torch

from lcpass.zoo.base import BATCH, HEAD_DIM, HEADS, HIDDEN, LAYERS, SEQ, VOCAB, WINDOW, ZooModel, _randn, _tokens, site


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


