"""Attention whose key and value head dims differ (MLA: DeepSeek-V2/V3, keys qk_nope + qk_rope, values
v_head_dim): the canonical op, the CPU engine, the planned op for every method, the generated kernels
(interpreter), ONNX and the compressed KV cache, each against the plain-PyTorch reference."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

import lcpass
from lcpass.engine import sparse_attention
from lcpass.engine.reference import reference_attention
from lcpass.layout import build_layout
from lcpass.lower import PLANNED_OP, site_mask, spec_json
from lcpass.masks import causal_mask, streaming_mask
from lcpass.patterns import reference
from lcpass.plan import HeadSpec

DK, DV = 24, 16


def _qkv(b=2, hq=4, hkv=2, s=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, s, DK, generator=g), torch.randn(b, hkv, s, DK, generator=g),
            torch.randn(b, hkv, s, DV, generator=g))


@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_engine_matches_reference(hkv):
    q, k, v = _qkv(hkv=hkv)
    mm = streaming_mask(3, 20)
    lay = build_layout(mm, 4, 77, 77, (16, 16))
    out = sparse_attention(q, k, v, lay, scale=0.2, dense_below=0)
    assert out.shape == (2, 4, 77, DV)
    torch.testing.assert_close(out, reference_attention(q, k, v, mm, scale=0.2), rtol=0, atol=1e-5)
    keep = torch.ones(2, 77, dtype=torch.bool)
    keep[1, :5] = False  # left padding
    out = sparse_attention(q, k, v, lay, scale=0.2, dense_below=0, kv_keep=keep)
    torch.testing.assert_close(out, reference_attention(q, k, v, mm, scale=0.2, kv_keep=keep), rtol=0, atol=1e-5)


def test_canonical_reference_matches_sdpa():
    q, k, v = _qkv(hkv=4)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(reference(q, k, v, None, DK ** -0.5, True), want, rtol=0, atol=1e-6)


METHODS = [("streaming", {"sink": 4, "window": 32}), ("duo", {"sink": 4, "recent": 16}), ("moa", {"alpha": 20.0}),
           ("s2", {"block_size": 16, "local_blocks": 2, "vert_stride": 4}), ("dilated", {"window": 20}),
           ("razor", {"sink": 4, "threshold": 20}),
           ("quest", {"token_budget": 64, "page_size": 16}), ("tokenselect", {"k": 32, "block_size": 16}),
           ("seer", {"block_size": 16, "topk": 3}), ("hip", {"k": 32, "block_size_q": 16, "block_size_k": 8}),
           ("landmark", {"block_size": 16, "topk": 3}), ("cca", {"group_size": 8, "local_window": 16}),
           ("squeezed", {}), ("longheads", {}), ("routing", {}), ("hyper", {})]


@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
def test_planned_op_every_method(method, params):
    """Dk != Dv gives what the same method gives on v zero-padded to Dk (its first Dv columns), and for the
    static methods exactly the masked reference."""
    q, k, v = _qkv(s=150)
    spec = spec_json([HeadSpec(method, params)], dense_below=0)
    out = PLANNED_OP(q, k, v, None, 0.2, True, -1, 0.0, 0.0, f"mla/{method}", "none", spec)
    assert out.shape == (2, 4, 150, DV)
    padded = PLANNED_OP(q, k, F.pad(v, (0, DK - DV)), None, 0.2, True, -1, 0.0, 0.0, f"mla-pad/{method}", "none",
                        spec)
    torch.testing.assert_close(out, padded[..., :DV], rtol=0, atol=1e-5)
    from lcpass.methods import get_method

    if get_method(method).kind == "static" and method != "razor":
        mm = site_mask(spec, 4, 150, 150, True, -1)
        torch.testing.assert_close(out, reference_attention(q, k, v, mm, scale=0.2), rtol=0, atol=1e-5)


def test_generated_kernels_under_the_interpreter():
    from lcpass import codegen

    q, k, v = _qkv(s=40)
    mm = streaming_mask(3, 12)
    lay = build_layout(mm, 4, 40, 40, (16, 16))
    out = codegen.attention(q, k, v, lay, scale=0.2)
    torch.testing.assert_close(out, reference_attention(q, k, v, mm, scale=0.2), rtol=0, atol=1e-4)
    q1 = q[:, :, -1:].contiguous()
    lay1 = build_layout(causal_mask(), 4, 1, 40, (16, 16))
    out1 = codegen.decode_attention(q1, k, v, lay1, scale=0.2)
    torch.testing.assert_close(out1, reference_attention(q1, k, v, causal_mask(), scale=0.2), rtol=0, atol=1e-4)


class _MLAish(torch.nn.Module):
    """Hand-written attention with keys of 24 and values of 16 per head, GQA 4:2."""

    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(32, 4 * DK), torch.nn.Linear(32, 2 * DK)
        self.v, self.o = torch.nn.Linear(32, 2 * DV), torch.nn.Linear(4 * DV, 32)

    def forward(self, x):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, 4, DK).transpose(1, 2)
        k = self.k(x).view(B, S, 2, DK).transpose(1, 2)
        v = self.v(x).view(B, S, 2, DV).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(o.transpose(1, 2).reshape(B, S, 4 * DV))


@pytest.mark.parametrize("method,params", [("streaming", {"sink": 2, "window": 8}),
                                           ("quest", {"token_budget": 32, "page_size": 16})])
def test_onnx_matches_torch(method, params):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = _MLAish().eval()
    x = torch.randn(2, 70, 32)
    path = os.path.join(tempfile.mkdtemp(), "mla.onnx")
    lcpass.export(m, (x,), path, format="onnx", method=method, dense_below=0, **params)
    sess = ort.InferenceSession(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    om = lcpass.optimize(m, method=method, dense_below=0, example_inputs=(x,), **params)
    with torch.no_grad():
        want = om(x)
    assert abs(got - want.numpy()).max() < 1e-4


def test_compressed_cache_keeps_k_and_v_at_their_own_dims():
    """A streaming plan on Dk != Dv: the cache evicts K and V together, holds each at its own head dim,
    and a decode step over the kept slots equals the reference over the full KV with the method's mask."""
    from lcpass.hf import SiteRuntime, layer_binding
    from lcpass.kv.attend import attend_layer
    from lcpass.kv.cache import CompressedCache

    q, k, v = _qkv(b=1, s=41)
    spec = spec_json([HeadSpec("streaming", {"sink": 2, "window": 8})], dense_below=0)
    rt = SiteRuntime("layer", spec, False, True, -1, 0.2, 0.0, "causal")
    cache = CompressedCache()
    cache.update(k[:, :, :40], v[:, :, :40], 0)
    binding, specs = layer_binding(rt, q, k, 40)
    cache.check_plan(binding.site, binding.heads_key, binding.label, 4)
    cache.layers[0].bind(binding, specs, None)
    cache.update(k[:, :, 40:], v[:, :, 40:], 0)
    layer = cache.layers[0]
    layer.evict()
    g = layer.groups[0]
    assert (g.keys.shape[-1], g.values.shape[-1], g.length) == (DK, DV, 10)
    out = attend_layer(layer, q[:, :, 40:], 0.2)
    want = reference_attention(q[:, :, 40:], k, v, streaming_mask(2, 8), scale=0.2)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    assert cache.dense_nbytes() == 41 * 2 * (DK + DV) * 4


def test_latent_kv_model_generates_and_says_its_cache_is_kept_whole():
    """DeepSeek-V2 in transformers caches the MLA latent, not per-head K/V: the attention function only
    ever sees K/V expanded from it, so lcpass keeps that cache whole and says so; the plan still runs."""
    from lcpass.zoo.auto import architectures, build

    tiny = build(next(a for a in architectures() if a.model_type == "deepseek_v2"))
    m = lcpass.optimize(tiny.model, method="streaming", sink=2, window=6, dense_below=0,
                        example_inputs=tiny.inputs)
    assert "kept whole" in m.lcpass_report.kv
    assert all(s.kv_fraction == 1.0 for s in m.lcpass_report.sites)
    ids = tiny.inputs["input_ids"][:1]
    out = m.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape[-1] == ids.shape[-1] + 4
