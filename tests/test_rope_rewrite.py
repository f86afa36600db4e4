"""Entropy-ABF through lcpass.optimize: the RoPE base rewrite (lcpass.rope) plus the logit-scale score_mod.

The oracle is a model built by hand: the same weights with ``config.rope_parameters["rope_theta"]`` set to
the new base, run through an attention function that applies the logit scale
``max(1, log(pos + 1) / log(trained_length))`` explicitly (eager math, no lcpass code).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lcpass
from lcpass.rope import RopeRewriteError, infer_rope_base, rope_inv_freq, set_rope_base

ABF = 500000.0
T = 8  # trained_length: small so that the logit scale is active within the test sequences


def _abf_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager causal attention with the entropy-aware logit scale at absolute positions (no padding)."""
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    sq, sk = query.shape[2], k.shape[2]
    s = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    pos = torch.arange(sk - sq, sk, dtype=torch.float32)
    lam = torch.clamp(torch.log1p(pos) * (1.0 / math.log(T)), min=1.0)
    s = s * lam[:, None]
    causal = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    return (p @ v).transpose(1, 2).contiguous(), p


def _reference(model: nn.Module, base: float) -> nn.Module:
    """The same model rebuilt from its config with rope_theta = base, the hand-written ABF attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("abf_reference", _abf_reference_attention)
    AttentionMaskInterface.register("abf_reference", ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"])
    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = {**cfg.rope_parameters, "rope_theta": base}
    cfg._attn_implementation = "abf_reference"
    ref = type(model)(cfg).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def _rotary(model: nn.Module) -> nn.Module:
    return model.model.rotary_emb


def _check_hf(model: nn.Module, ids: torch.Tensor, old_base: float, dtype: torch.dtype) -> None:
    model.to(dtype)
    d = 2 * _rotary(model).inv_freq.numel()
    assert infer_rope_base(_rotary(model).inv_freq) == pytest.approx(old_base, rel=1e-3)
    ref = _reference(model, ABF).to(dtype)
    with torch.no_grad():
        before = model(ids).logits
        out = lcpass.optimize(model, method="entropy_abf", trained_length=T)
        # optimize rewrites transformers models in place (same object, like the attention switch)
        assert out is model
        got = out(ids).logits
        want = ref(ids).logits
    rot = _rotary(model)
    want_freq = 1.0 / ABF ** (torch.arange(0, d, 2, dtype=torch.float) / d)
    assert torch.equal(rot.inv_freq, want_freq.to(dtype))
    assert torch.equal(rot.inv_freq, _rotary(ref).inv_freq)
    assert torch.equal(rot.original_inv_freq, rot.inv_freq)
    assert model.config.rope_parameters["rope_theta"] == ABF
    assert (got - want).abs().max() < 1e-5
    assert (got - before).abs().max() > 1e-3  # the rewrite changed the model


def test_llama_tiny_entropy_abf_rewrites_rope_and_matches_hand_built_reference():
    from lcpass.zoo import get_zoo_model

    z = get_zoo_model("llama-tiny")
    _check_hf(z.model, z.example_inputs["input_ids"], 10000.0, torch.float32)


@pytest.mark.slow
def test_smollm2_entropy_abf_rewrites_rope_and_matches_hand_built_reference():
    from lcpass.zoo.pretrained import load_smollm2

    model, tok = load_smollm2()
    ids = tok("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt").input_ids[:, :48]
    _check_hf(model, ids, 100000.0, torch.float32)


def test_abf_base_zero_keeps_rope_and_larger_base_is_kept():
    from lcpass.zoo import get_zoo_model

    z = get_zoo_model("llama-tiny")
    inv = z.model.model.rotary_emb.inv_freq.clone()
    lcpass.optimize(z.model, method="entropy_abf", trained_length=T, abf_base=0.0)
    assert torch.equal(z.model.model.rotary_emb.inv_freq, inv)
    z = get_zoo_model("gemma3-tiny")  # per-layer-type RoPE: sliding 1e4 -> 5e5, full 1e6 stays
    rot = z.model.model.rotary_emb
    full = rot.full_attention_inv_freq.clone()
    sites = set_rope_base(z.model, ABF)
    assert {s.where for s in sites} == {"model.rotary_emb.full_attention_inv_freq",
                                        "model.rotary_emb.sliding_attention_inv_freq"}
    assert torch.equal(rot.full_attention_inv_freq, full)
    assert torch.equal(rot.sliding_attention_inv_freq, rope_inv_freq(ABF, 16))
    assert z.model.config.rope_parameters["sliding_attention"]["rope_theta"] == ABF


def test_errors_name_the_model_and_the_fix():
    from lcpass.zoo import get_zoo_model

    z = get_zoo_model("gpt2-tiny")  # learned positions: no rotary embedding
    with pytest.raises(RopeRewriteError, match=r"no rotary embedding found in GPT2LMHeadModel.*abf_base=0"):
        lcpass.optimize(z.model, method="entropy_abf")
    from transformers import LlamaForCausalLM

    cfg = get_zoo_model("llama-tiny").model.config
    cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model = LlamaForCausalLM(cfg).eval()
    with pytest.raises(RopeRewriteError, match=r"LlamaForCausalLM: model.rotary_emb.inv_freq uses "
                                               r"rope_type='linear'.*abf_base=0"):
        lcpass.optimize(model, method="entropy_abf")
    assert torch.equal(model.model.rotary_emb.inv_freq, rope_inv_freq(10000.0, 16) / 2)  # untouched


# ---------------------------------------------------------------------------------------------
# plain modules: the captured graph is rewritten, the original module is not


class _RopeAttention(nn.Module):
    """Single-layer causal attention with RoPE: frequencies as a buffer or computed in forward."""

    def __init__(self, base: float, computed: bool, d: int = 16, h: int = 2):
        super().__init__()
        self.base, self.computed, self.d, self.h = base, computed, d, h
        self.qkv = nn.Linear(d * h, 3 * d * h)
        self.register_buffer("inv_freq", rope_inv_freq(base, d), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        if self.computed:
            inv = 1.0 / (self.base ** (torch.arange(0, self.d, 2, dtype=torch.float) / self.d))
        else:
            inv = self.inv_freq
        freqs = torch.outer(torch.arange(S, dtype=torch.float), inv)
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos(), emb.sin()

        def rot(t):
            t1, t2 = t[..., : self.d // 2], t[..., self.d // 2:]
            return t * cos + torch.cat([-t2, t1], -1) * sin

        a = torch.softmax((rot(q) @ rot(k).transpose(-1, -2)) * self.d ** -0.5
                          + torch.full((S, S), float("-inf")).triu(1), -1)
        return (a @ v).transpose(1, 2).reshape(B, S, -1)


class _AbfRopeAttention(_RopeAttention):
    """Reference: the same layer with base ABF and the logit scale written out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        freqs = torch.outer(torch.arange(S, dtype=torch.float), rope_inv_freq(ABF, self.d))
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos(), emb.sin()

        def rot(t):
            t1, t2 = t[..., : self.d // 2], t[..., self.d // 2:]
            return t * cos + torch.cat([-t2, t1], -1) * sin

        lam = torch.clamp(torch.log1p(torch.arange(S, dtype=torch.float)) / math.log(T), min=1.0)[:, None]
        s = (rot(q) @ rot(k).transpose(-1, -2)) * self.d ** -0.5 * lam
        a = torch.softmax(s + torch.full((S, S), float("-inf")).triu(1), -1)
        return (a @ v).transpose(1, 2).reshape(B, S, -1)


@pytest.mark.parametrize("computed", [False, True], ids=["buffer", "computed"])
def test_plain_module_graph_rewrite(computed):
    torch.manual_seed(0)
    m = _RopeAttention(10000.0, computed).eval()
    ref = _AbfRopeAttention(10000.0, computed).eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        before = m(x)
        out = lcpass.optimize(m, method="entropy_abf", trained_length=T, example_inputs=(x,))
        got = out(x)
        want = ref(x)
        assert (got - want).abs().max() < 1e-5
        assert (got - before).abs().max() > 1e-3  # the rewrite changed the result
        assert torch.equal(m(x), before)  # the original module is unchanged
    assert torch.equal(m.inv_freq, rope_inv_freq(10000.0, 16))
    assert isinstance(out, lcpass.OptimizedModule)


def test_plain_module_without_rope_is_refused():
    from lcpass.zoo import get_zoo_model

    z = get_zoo_model("sdpa-gqa")
    with pytest.raises(RopeRewriteError, match=r"no rotary embedding found in .*cos/sin.*abf_base=0"):
        lcpass.optimize(z.model, method="entropy_abf", example_inputs=z.example_inputs)


def test_compile_backend_and_export_apply_the_rope_base_too(tmp_path):
    """torch.compile(backend="lcpass") (dynamo lifts inv_freq to a graph input) and lcpass.export (torch
    format) give the hand-built reference's logits, as optimize does — not the logit scaling alone."""
    from lcpass.zoo import get_zoo_model

    z = get_zoo_model("llama-tiny")
    ids = z.example_inputs["input_ids"]
    ref = _reference(z.model, ABF)
    with torch.no_grad():
        want = ref(ids).logits
        torch._dynamo.reset()
        comp = torch.compile(copy.deepcopy(z.model), backend="lcpass",
                             options={"method": "entropy_abf", "trained_length": T, "inner": "eager"})
        got = comp(ids).logits
    assert (got - want).abs().max() < 1e-5
    assert infer_rope_base(_rotary(z.model).inv_freq) == pytest.approx(10000.0, rel=1e-3)  # model untouched
    res = lcpass.export(copy.deepcopy(z.model), {"input_ids": ids}, tmp_path / "abf.pt2", format="torch",
                        method="entropy_abf", trained_length=T)
    prog = torch.export.load(str(res.path)).module()
    with torch.no_grad():
        out = prog(input_ids=ids)
    logits = out["logits"] if isinstance(out, dict) else out[0]
    assert (logits - want).abs().max() < 1e-5
