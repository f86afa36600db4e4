"""Method registry, static methods against the reference and the CPU engine, and `lcpass methods`."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from lcpass import masks as M
from lcpass.engine import reference_attention, sparse_attention
from lcpass.layout import build_layout
from lcpass.methods import (
    KVPolicy,
    Method,
    Param,
    compensated_attention,
    compress_kv,
    get_method,
    kv_head_policies,
    list_methods,
    method_names,
    register,
    shifted_sparse_attention,
    site_crossover,
    site_kv_policies,
    site_mask_mod,
    validate_params,
)
from lcpass.methods.longlora import LONGLORA
from lcpass.methods.s2 import s2_shard_mask
from lcpass.methods.streaming import STREAMING

B, HQ, HKV, N, D = 2, 8, 2, 200, 16  # awkward: N not a multiple of the block, GQA 8/2, batch 2
BLOCK = 64
SCALE = D**-0.5

STATIC_NAMES = ["dense", "causal", "streaming", "duo", "razor", "moa", "s2", "dilated", "longlora"]


def dense_mask(mask_mod, n_heads: int, q_len: int, kv_len: int) -> torch.Tensor:
    """[H, Sq, Sk] boolean mask of a mask_mod at absolute positions."""
    b = torch.zeros((), dtype=torch.long)
    h = torch.arange(n_heads)[:, None, None]
    q = torch.arange(kv_len - q_len, kv_len)[None, :, None]
    kv = torch.arange(kv_len)[None, None, :]
    return mask_mod(b, h, q, kv).expand(n_heads, q_len, kv_len)


def qkv(q_len: int = N, kv_len: int = N, seed: int = 0, dtype=torch.float32, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, q_len, D, generator=g, dtype=dtype)
    k = torch.randn(B, HKV, kv_len, D, generator=g, dtype=dtype)
    v = torch.randn(B, HKV, kv_len, D, generator=g, dtype=dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


# Small parameters that make every method genuinely sparse at N = 200.
SPARSE_SPECS = {
    "dense": [("dense", {})],
    "causal": [("causal", {})],
    "streaming": [("streaming", {"sink": 4, "window": 50})],
    "duo": [("duo", {"sink": 4, "recent": 40, "retrieval": h in (0, 5)}) for h in range(HQ)],
    "razor": [("razor", {"sink": 4, "threshold": 30, "retrieval": h == 3}) for h in range(HQ)],
    "moa": [("moa", {"alpha": 8.0 * (h + 1), "beta": 0.05 * (h % 3), "sink": 2}) for h in range(HQ)],
    "s2": [("s2", {"block_size": 16, "local_blocks": 2, "vert_stride": 4})],
    "dilated": [("dilated", {"window": 20, "dilation": 3})],
    "longlora": [("longlora", {"group_size": 64})],
}

# Parameters that cover the whole context: every windowed method must then equal causal attention.
COVERING_SPECS = {
    "streaming": [("streaming", {"sink": 0, "window": N})],
    "duo": [("duo", {"sink": 0, "recent": N, "retrieval": h % 2 == 0}) for h in range(HQ)],
    "razor": [("razor", {})],
    "moa": [("moa", {"alpha": float(N), "beta": 0.0, "sink": 0})],
    "moa_elastic": [("moa", {"alpha": 0.0, "beta": 1.0, "sink": 0})],
    "s2": [("s2", {"block_size": 16, "local_blocks": math.ceil(N / 16), "vert_stride": 4})],
    "dilated": [("dilated", {"window": N, "dilation": 1})],
    "longlora": [("longlora", {"group_size": 2 * N})],
}


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_is_explicit_ordered_and_complete():
    # the static methods come first, in this order; the dynamic ones follow (tests/test_dynamic_methods.py)
    static = [m.name for m in list_methods() if m.kind != "dynamic"]
    assert static == STATIC_NAMES and method_names()[: len(STATIC_NAMES)] == tuple(STATIC_NAMES)
    assert set(SPARSE_SPECS) == set(static)  # every static method is exercised below


def test_register_is_idempotent_and_refuses_conflicts():
    before = method_names()
    assert register(STREAMING) is STREAMING
    assert method_names() == before
    clash = Method(
        name="streaming", paper="x", summary="x", params=(), kind="static", phases=frozenset({"prefill"}),
        needs_calibration=False, crossover=0, mask_mod=lambda params, **kw: M.causal_mask(),
    )
    with pytest.raises(ValueError, match="already registered"):
        register(clash)
    assert get_method("streaming") is STREAMING


def test_get_method_unknown_lists_known():
    with pytest.raises(ValueError) as e:
        get_method("streamingllm")
    msg = str(e.value)
    assert "'streamingllm'" in msg
    for name in STATIC_NAMES:
        assert name in msg


@pytest.mark.parametrize("name", STATIC_NAMES)
def test_method_records_are_complete(name):
    m = get_method(name)
    assert m.paper and m.summary and m.crossover_why
    assert m.kind in ("dense", "static", "dynamic")
    assert m.phases and m.phases <= {"prefill", "decode", "kv"}
    assert all(p.doc for p in m.params)
    assert validate_params(name, {}) == m.defaults()
    mod = __import__(m.mask_mod.__module__, fromlist=["_"])
    if m.kind != "dense":
        assert "Paper:" in mod.__doc__  # each method module names its paper


def test_validate_params_names_parameter_value_and_range():
    with pytest.raises(ValueError) as e:
        validate_params("streaming", {"window": -5})
    msg = str(e.value)
    assert "streaming" in msg and "'window'" in msg and "-5" in msg and "window >= 1" in msg
    with pytest.raises(ValueError, match=r"beta.*0.0 <= beta <= 1.0"):
        validate_params("moa", {"beta": 1.5})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['windw'\].*'sink', 'window'"):
        validate_params("streaming", {"windw": 3})
    with pytest.raises(ValueError, match="not a bool"):
        validate_params("duo", {"retrieval": 1})
    with pytest.raises(ValueError, match="not an integer"):
        validate_params("streaming", {"window": 2.5})
    with pytest.raises(ValueError, match="not a number"):
        validate_params("streaming", {"window": True})
    assert validate_params("streaming", {"window": 64.0}) == {"sink": 4, "window": 64}
    assert isinstance(validate_params("moa", {"alpha": 3})["alpha"], float)


def test_site_mask_mod_collapses_when_heads_agree():
    one = site_mask_mod([("streaming", {"window": 32})], HQ, N, N)
    same = site_mask_mod([("streaming", {"window": 32})] * HQ, HQ, N, N)
    assert one == same == M.streaming_mask(4, 32)
    mixed = site_mask_mod(SPARSE_SPECS["duo"], HQ, N, N)
    assert mixed.__name__.startswith("per_head")
    # a per-head method never collapses: its heads differ even with equal params
    assert site_mask_mod(SPARSE_SPECS["s2"], HQ, N, N).__name__.startswith("per_head")
    with pytest.raises(ValueError, match="3 head specs for a site with 8 heads"):
        site_mask_mod([("causal", {})] * 3, HQ, N, N)


def test_site_crossover_is_the_largest_among_its_heads():
    assert site_crossover([("dense", {}), ("causal", {})], 2) == 0
    assert site_crossover([("dense", {}), ("streaming", {}), ("s2", {"vert_stride": 2})], 3) == 4096
    assert site_crossover([("duo", {})], 8) == get_method("duo").crossover == 2048


def test_mixed_methods_in_one_site_follow_each_head():
    specs = [
        ("causal", {}), ("streaming", {"sink": 2, "window": 10}), ("dilated", {"window": 5, "dilation": 4}),
        ("s2", {"block_size": 8, "local_blocks": 1, "vert_stride": 4}), ("moa", {"alpha": 30.0, "sink": 0}),
        ("longlora", {"group_size": 32}), ("duo", {"retrieval": True}), ("dense", {}),
    ]
    site = dense_mask(site_mask_mod(specs, HQ, N, N), HQ, N, N)
    for h, (name, params) in enumerate(specs):
        alone = get_method(name).mask_mod(validate_params(name, params), head=h, n_heads=HQ, q_len=N, kv_len=N)
        assert torch.equal(site[h], dense_mask(alone, 1, N, N)[0]), (h, name)


# ---------------------------------------------------------------------------------------------
# every static method: reference == CPU engine


@pytest.mark.parametrize("name", STATIC_NAMES)
@pytest.mark.parametrize("q_len", [N, 37])
def test_engine_matches_reference(name, q_len):
    mask = site_mask_mod(SPARSE_SPECS[name], HQ, q_len, N)
    q, k, v = qkv(q_len=q_len)
    ref = reference_attention(q, k, v, mask, scale=SCALE)
    layout = build_layout(mask, HQ, q_len, N, block_size=BLOCK)
    out = sparse_attention(q, k, v, layout, scale=SCALE, mask_mod=mask, dense_below=0)  # block engine
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if name not in ("dense", "causal", "razor"):  # the sparse methods really skip work at N = 200
        allowed = dense_mask(mask, HQ, q_len, N)
        causal = dense_mask(M.causal_mask(), 1, q_len, N)
        assert allowed.sum() < causal.sum() * HQ


@pytest.mark.parametrize("name", sorted(COVERING_SPECS))
def test_covering_parameters_equal_causal(name):
    mask = site_mask_mod(COVERING_SPECS[name], HQ, N, N)
    assert torch.equal(dense_mask(mask, HQ, N, N), dense_mask(M.causal_mask(), HQ, N, N))
    q, k, v = qkv(seed=1)
    torch.testing.assert_close(
        reference_attention(q, k, v, mask, scale=SCALE),
        reference_attention(q, k, v, M.causal_mask(), scale=SCALE),
        atol=1e-6, rtol=1e-6,
    )


# ---------------------------------------------------------------------------------------------
# S2-Attention


@pytest.mark.parametrize("n_heads,block_size,local_blocks,vert_stride", [(8, 16, 2, 4), (8, 7, 1, 8), (12, 10, 3, 5)])
def test_s2_heads_cover_the_context(n_heads, block_size, local_blocks, vert_stride):
    params = {"block_size": block_size, "local_blocks": local_blocks, "vert_stride": vert_stride}
    masks = dense_mask(site_mask_mod([("s2", params)], n_heads, N, N), n_heads, N, N)
    causal = dense_mask(M.causal_mask(), 1, N, N)[0]
    assert torch.equal(masks.any(dim=0), causal)  # union over heads == the whole causal context
    assert all(masks[h].sum() < causal.sum() for h in range(n_heads))  # each head alone is sparse
    # each head reads about 1/vert_stride of the remote blocks
    remote = causal & (torch.arange(N)[:, None] // block_size - torch.arange(N)[None, :] // block_size >= local_blocks)
    per_head = (masks & remote).sum(dim=(1, 2)).float() / remote.sum()
    assert per_head.max() < 2.0 / vert_stride


def test_s2_refuses_too_few_heads_and_masks_compare_by_value():
    with pytest.raises(ValueError, match="vert_stride=8 exceeds the site's 4 heads"):
        site_mask_mod([("s2", {"vert_stride": 8})], 4, N, N)
    assert s2_shard_mask(16, 2, 4, 1) == s2_shard_mask(16, 2, 4, 1) != s2_shard_mask(16, 2, 4, 2)
    assert hash(s2_shard_mask(16, 2, 4, 1)) == hash(s2_shard_mask(16, 2, 4, 1))


@pytest.mark.parametrize("block_size,local_blocks,vert_stride,layout_block", [(16, 2, 4, 64), (64, 3, 8, 48), (10, 1, 3, 32)])
@pytest.mark.parametrize("q_len", [300, 1])
def test_s2_block_classifier_gives_the_brute_force_layout(block_size, local_blocks, vert_stride, layout_block, q_len):
    n_heads, kv_len = 8, 300
    params = {"block_size": block_size, "local_blocks": local_blocks, "vert_stride": vert_stride}
    mask = site_mask_mod([("s2", params)], n_heads, q_len, kv_len)
    assert mask.has_block_classifier
    brute = M.mask_from_callable(lambda b, h, q, kv: mask(b, h, q, kv), "s2_brute")  # no classifier
    fast = build_layout(mask, n_heads, q_len, kv_len, block_size=layout_block)
    slow = build_layout(brute, n_heads, q_len, kv_len, block_size=layout_block)
    for a, b_ in zip(fast.block_maps(), slow.block_maps()):
        assert torch.equal(a, b_)


# ---------------------------------------------------------------------------------------------
# LongLoRA S²-Attn


def _paper_s2_attn(q, k, v, group_size, scale):
    """The LongLoRA paper's pseudo code, literally (causal in rolled order, wrapped last group)."""
    bsz, h, n, d = q.shape
    s = group_size // 2
    h0 = (h + 1) // 2
    k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))
    rolled = [torch.cat([t[:, :h0], t[:, h0:].roll(-s, dims=2)], 1).reshape(bsz, h, n // group_size, group_size, d) for t in (q, k, v)]
    scores = rolled[0] @ rolled[1].transpose(-1, -2) * scale
    tri = torch.ones(group_size, group_size, dtype=torch.bool).tril()
    out = torch.softmax(scores.masked_fill(~tri, float("-inf")), -1) @ rolled[2]
    out = out.reshape(bsz, h, n, d)
    return torch.cat([out[:, :h0], out[:, h0:].roll(s, dims=2)], 1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq,group_size", [(N, 64), (192, 48), (50, 7)])
def test_longlora_efficient_matches_mask_reference_with_gradients(causal, seq, group_size):
    q, k, v = qkv(q_len=seq, kv_len=seq, seed=2, grad=True)
    mask = site_mask_mod([("longlora", {"group_size": group_size, "causal": causal})], HQ, seq, seq)
    ref = reference_attention(q, k, v, mask, scale=SCALE)
    out = shifted_sparse_attention(q, k, v, group_size, SCALE, causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v))
    for a, b_ in zip(g_out, g_ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)


def test_longlora_shifts_half_the_heads_like_the_paper():
    g = 64
    masks = dense_mask(site_mask_mod([("longlora", {"group_size": g})], HQ, 256, 256), HQ, 256, 256)
    assert all(torch.equal(masks[h], masks[0]) for h in range(HQ // 2))
    assert all(torch.equal(masks[h], masks[HQ - 1]) for h in range(HQ // 2, HQ))
    assert not torch.equal(masks[0], masks[HQ - 1])
    assert masks[0, 63, 0] and not masks[0, 64, 63]  # unshifted: groups [0, 64), [64, 128)
    assert masks[HQ - 1, 95, 32] and not masks[HQ - 1, 32, 31]  # shifted by G/2: [32, 96)
    # identical to the paper's roll/reshape/roll-back except where its wrapped group leaks the future
    q, k, v = qkv(q_len=256, kv_len=256, seed=3)
    paper = _paper_s2_attn(q, k, v, g, SCALE)
    ours = shifted_sparse_attention(q, k, v, g, SCALE)
    torch.testing.assert_close(ours[:, : HQ // 2], paper[:, : HQ // 2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[:, HQ // 2 :, g // 2 :], paper[:, HQ // 2 :, g // 2 :], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours[:, HQ // 2 :, 1 : g // 2], paper[:, HQ // 2 :, 1 : g // 2])


# ---------------------------------------------------------------------------------------------
# RazorAttention


def _explicit_razor(q, k, v, sink, recent, scale):
    """Explicit construction: the dropped middle replaced by |D| copies of its mean, then causal attention."""
    sk, sq = k.shape[2], q.shape[2]
    dropped = sk - sink - recent
    k_hat = k[:, :, sink : sk - recent].mean(2, keepdim=True).expand(-1, -1, dropped, -1)
    v_hat = v[:, :, sink : sk - recent].mean(2, keepdim=True).expand(-1, -1, dropped, -1)
    k2 = torch.cat([k[:, :, :sink], k_hat, k[:, :, sk - recent :]], 2)
    v2 = torch.cat([v[:, :, :sink], v_hat, v[:, :, sk - recent :]], 2)
    return reference_attention(q, k2, v2, M.causal_mask(), scale=scale)  # same length: positions line up


@pytest.mark.parametrize("q_len", [1, 5])
def test_razor_compensated_attention_matches_explicit_construction(q_len):
    q, k, v = qkv(q_len=q_len, kv_len=N, seed=4)
    out = compensated_attention(q, k, v, sink=4, recent=30, scale=SCALE)
    torch.testing.assert_close(out, _explicit_razor(q, k, v, 4, 30, SCALE), atol=1e-5, rtol=1e-5)
    # the compensation is not a no-op: plain sinks + recent (no compensation token) differs
    plain = reference_attention(q, k, v, M.streaming_mask(4, 30), scale=SCALE)
    assert not torch.allclose(out, plain, atol=1e-3)


def test_razor_without_dropped_tokens_is_causal_attention():
    q, k, v = qkv(q_len=7, kv_len=N, seed=5)
    out = compensated_attention(q, k, v, sink=4, recent=N - 4, scale=SCALE)
    torch.testing.assert_close(out, reference_attention(q, k, v, M.causal_mask(), scale=SCALE), atol=1e-5, rtol=1e-5)


def test_razor_compress_kv_and_errors():
    _, k, v = qkv(seed=6)
    k2, v2, dropped = compress_kv(k, v, 4, 30)
    assert k2.shape == (B, HKV, 4 + 1 + 30, D) and dropped == N - 34
    torch.testing.assert_close(v2[:, :, 4], v[:, :, 4 : N - 30].mean(2))
    q, _, _ = qkv(q_len=40, seed=6)
    with pytest.raises(ValueError, match="40 queries exceed recent=30"):
        compensated_attention(q, k, v, sink=4, recent=30, scale=SCALE)


# ---------------------------------------------------------------------------------------------
# KV policies


def test_kv_policies_follow_the_papers():
    pol = site_kv_policies(SPARSE_SPECS["duo"], HQ, kv_len=1000)
    assert [p.kind for p in pol] == ["all" if h in (0, 5) else "sinks+recent" for h in range(HQ)]
    assert pol[1] == KVPolicy.sinks_recent(4, 40) and pol[1].kept(1000) == 44
    razor = site_kv_policies([("razor", {"threshold": 100, "ratio": 4.0})], 2, kv_len=1000)
    assert razor[0] == KVPolicy.compensated(4, 250) and razor[0].kept(1000) == 255
    assert site_kv_policies([("razor", {"threshold": 100, "ratio": 4.0})], 1, kv_len=200)[0].recent == 100
    assert site_kv_policies([("moa", {"alpha": 10.0, "beta": 0.5, "sink": 2})], 1, kv_len=100)[0] == KVPolicy.sinks_recent(2, 60)
    assert site_kv_policies([("dilated", {"window": 4, "dilation": 3})], 1, kv_len=100)[0].recent == 10
    assert {p.kind for p in site_kv_policies([("s2", {"vert_stride": 2}), ("longlora", {})], 2, 100)} == {"all"}
    # GQA: a KV head evicts only what all its query heads agree to drop
    kv = kv_head_policies(SPARSE_SPECS["duo"], HQ, HKV, kv_len=1000)  # retrieval heads 0 and 5
    assert kv == [KVPolicy.all(), KVPolicy.all()]
    kv = kv_head_policies([("duo", {"retrieval": h < 4}) for h in range(HQ)], HQ, HKV, kv_len=1000)
    assert kv == [KVPolicy.all(), KVPolicy.sinks_recent(64, 256)]
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=8"):
        kv_head_policies(SPARSE_SPECS["duo"], HQ, 3, kv_len=1000)
    with pytest.raises(ValueError, match="sink=-1 is negative"):
        KVPolicy("sinks+recent", sink=-1)


def test_param_range_text():
    assert Param("x", "int", 1, 0, 4).range_text() == "0 <= x <= 4"
    assert Param("x", "bool", True).range_text() == "true or false"


# ---------------------------------------------------------------------------------------------
# CLI


def test_methods_cli_table_lists_every_method(capsys):
    from lcpass.cli import methods_cmd

    parser = argparse.ArgumentParser(prog="lcpass")
    methods_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["methods"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for m in list_methods():
        assert m.name in out and str(m.crossover) in out
    assert "window=1020" in out and "StreamingLLM" in out and "prefill decode kv" in out


def test_methods_cli_json(capsys):
    from lcpass.cli import methods_cmd

    assert methods_cmd.run(argparse.Namespace(json=True)) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data][: len(STATIC_NAMES)] == STATIC_NAMES
    streaming = data[STATIC_NAMES.index("streaming")]
    assert streaming["params"][1] == {
        "name": "window", "type": "int", "default": 1020, "low": 1, "high": None,
        "doc": "recent tokens each query sees, itself included",
    }
    assert streaming["phases"] == ["prefill", "decode", "kv"] and streaming["needs_calibration"] is False
    assert data[STATIC_NAMES.index("duo")]["needs_calibration"] is True
    assert LONGLORA.name == data[len(STATIC_NAMES) - 1]["name"]
