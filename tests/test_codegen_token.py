"""Token-granular generated kernels (TokenSelection) under TRITON_INTERPRET=1 against the reference.

The reference is dense attention masked by the same selection (``TokenSelection.to_dense``, or the
listed keys & causal). Tiny shapes, fp32 at 1e-4: N = 200 / 136 (not multiples of the 64-query
block), GQA 4:1 and MQA, batch 2, lists padded with -1 (fewer selected than the budget), prefill and
decode, the lowering's backend="triton" path, and ``layout_from_topk`` staying on the scores' device.
GPU tier: tests/test_codegen_gpu.py.
"""

from __future__ import annotations

import os
import warnings

os.environ["TRITON_INTERPRET"] = "1"  # before triton compiles anything in this process

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lcpass import codegen  # noqa: E402
from lcpass import masks as M  # noqa: E402
from lcpass.codegen import AttentionSpec  # noqa: E402
from lcpass.engine import reference_attention  # noqa: E402
from lcpass.layout import layout_from_selection, layout_from_topk  # noqa: E402
from lcpass.methods import validate_params  # noqa: E402
from lcpass.methods.dynamic import TokenSelection, run_selection, tokenselect_select  # noqa: E402

D, TOL = 32, 1e-4
SC = D ** -0.5


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LCPASS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lcpass-cache"))


def _qkv(B, Hq, Hkv, Sq, Sk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Sq, D, generator=g), torch.randn(B, Hkv, Sk, D, generator=g),
            torch.randn(B, Hkv, Sk, D, generator=g))


def _masked_ref(q, k, v, mask, kv_keep=None):
    """Dense attention under an element mask Bool[B, Hq, Sq, Sk] (queries are the last Sq keys)."""
    off = k.shape[2] - q.shape[2]
    mm = M.mask_from_callable(lambda b, h, qi, ki: mask[b, h, qi - off, ki], "selection")
    return reference_attention(q, k, v, mm, scale=SC, kv_keep=kv_keep)


def _unique_lists(shape, high, n_used, seed):
    """Distinct positions in [0, high) per row, -1 after the first n_used slots (padded lists)."""
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.tensor(shape[:-1]).prod())
    idx = torch.stack([torch.randperm(high, generator=g)[: shape[-1]] for _ in range(rows)])
    idx = idx.view(*shape)
    idx[..., n_used:] = -1
    return idx


def _listed(idx, n_heads, kv_len):
    """Bool[B, Hq, ..., Sk]: which keys a per-KV-head list [B, Hkv, ..., K] holds."""
    hit = torch.zeros(*idx.shape[:-1], kv_len + 1, dtype=torch.bool)
    hit.scatter_(-1, torch.where(idx < 0, kv_len, idx), True)
    return hit[..., :kv_len].repeat_interleave(n_heads // idx.shape[1], 1)


# ------------------------------------------------------------------------------------------------
# prefill


def test_tokenselect_prefill_gqa_matches_reference():
    # GQA 4:1, batch 2, N = 200: query blocks of 64 with a ragged last block of 8
    B, Hq, Hkv, N = 2, 8, 2, 200
    q, k, v = _qkv(B, Hq, Hkv, N, N, seed=1)
    p = validate_params("tokenselect", {"k": 24, "n_sink": 4, "n_local": 8, "block_size": 64})
    sel = tokenselect_select(q, k, params=p, state=None, mask_mod=None)
    idx = sel.indices.clone()
    assert idx.shape == (B, Hkv, 4, 36) and bool((idx[:, :, 0] < 0).all())  # block 0: no past
    idx[1, 0, 2, 20:] = -1  # fewer selected than the budget
    idx[0, 1, 3, ::3] = -1  # holes in the middle of a list
    sel = TokenSelection(idx, 64, N, N)
    out = codegen.token_attention(q, k, v, idx, block_q=64, scale=SC, tiles=(64, 32))
    ref = _masked_ref(q, k, v, sel.to_dense(Hq))
    assert (out - ref).abs().max().item() < TOL
    # the lowering's entry point runs the same kernels and agrees with the CPU token path
    got = codegen.selection_attention(q, k, v, sel, scale=SC)
    assert (got - run_selection(q, k, v, sel, scale=SC)).abs().max().item() < TOL


def test_token_prefill_mqa_causal_by_position_and_padding():
    # MQA, batch 2, N = 136, sub-tiled query blocks (32-row tiles in 64-query blocks), lists over the
    # WHOLE sequence (keys after a query must be masked by position), no local block, key padding
    B, Hq, Hkv, N, bq = 2, 4, 1, 136, 64
    q, k, v = _qkv(B, Hq, Hkv, N, N, seed=2)
    idx = _unique_lists((B, Hkv, 3, 40), N, 30, seed=3)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, -16:] = False
    out = codegen.token_attention(q, k, v, idx, block_q=bq, scale=SC, local=False, kv_keep=keep,
                                  tiles=(32, 32))
    listed = _listed(idx, Hq, N).repeat_interleave(bq, 2)[:, :, :N]
    mask = listed & torch.ones(N, N, dtype=torch.bool).tril()
    ref = _masked_ref(q, k, v, mask, kv_keep=keep)
    assert (out - ref).abs().max().item() < TOL
    # queries whose listed keys all lie in their future see nothing: zeros, never NaN
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("heads,sq", [((8, 2), 1), ((4, 1), 3)])
def test_token_decode_matches_reference(heads, sq):
    # split-KV over gathered lists (3 splits, 16 keys a step), GQA group packed in one tile; Sq = 3
    # (speculative step) lists keys after the first queries: the causal predicate drops them
    Hq, Hkv = heads
    B, N = 2, 200
    q, k, v = _qkv(B, Hq, Hkv, sq, N, seed=4 + sq)
    idx = _unique_lists((B, Hkv, 48), N, 41, seed=6)
    idx[0, 0, 10:] = -1  # a short list
    out = codegen.token_decode_attention(q, k, v, idx, scale=SC, n_splits=3, block_n=16)
    qpos = torch.arange(N - sq, N)
    mask = _listed(idx, Hq, N)[:, :, None, :] & (torch.arange(N)[None, :] <= qpos[:, None])
    ref = _masked_ref(q, k, v, mask)
    assert (out - ref).abs().max().item() < TOL


def test_gather_decode_is_a_drop_in_for_kv_gather_attend():
    from lcpass.kv.select import gather_attend

    B, h, G, L = 2, 2, 4, 200
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, h, G, D, generator=g)
    k, v = torch.randn(B, h, L, D, generator=g), torch.randn(B, h, L, D, generator=g)
    pos = torch.arange(L).expand(B, L).clone()
    pos[1, :30] = -1  # empty (left-padded) slots of batch 1
    idx = _unique_lists((B, h, 40), L, 33, seed=8)
    ar = torch.arange(40)
    idx[1, 1] = torch.where(ar < 30, ar, -1)  # batch 1, head 1: only empty slots 0..29: zeros
    got = codegen.gather_decode(q, k, v, pos, idx, SC, n_splits=2, block_n=16)
    want = gather_attend(q, k, v, pos, idx, SC)
    assert (got - want).abs().max().item() < TOL
    assert got[1, 1].abs().max().item() == 0.0


def test_token_scores_match_the_kv_soft_vote():
    # two-pass generated scoring (split max/sum-exp, then per-key votes) against the KV cache's
    # torch scoring: GQA group of 4 with empty slots, and MQA with Sq = 3 rows per head
    from lcpass.methods.dynamic.decode import head_probs as _head_probs

    B, h, G, L = 2, 2, 4, 200
    g = torch.Generator().manual_seed(14)
    q, k = torch.randn(B, h, G, D, generator=g), torch.randn(B, h, L, D, generator=g)
    pos = torch.arange(L).expand(B, L).clone()
    pos[1, :30] = -1
    got = codegen.token_scores(q.reshape(B, h * G, 1, D), k, scale=SC, kv_keep=pos >= 0, n_splits=3,
                               block_n=32)
    want = _head_probs(q, k, (pos >= 0)[:, None, None, :], SC)
    assert got.shape == (B, h, L) and (got - want).abs().max().item() < 1e-5
    assert got[1, :, :30].abs().max().item() == 0.0
    q2, k2 = torch.randn(B, 4, 3, D, generator=g), torch.randn(B, 1, L, D, generator=g)
    want2 = torch.softmax(q2 @ k2.transpose(-1, -2) * SC, -1).sum((1, 2))[:, None]
    assert (codegen.token_scores(q2, k2, scale=SC) - want2).abs().max().item() < 1e-5


def test_tokenselect_decode_selection_runs_the_decode_kernel(monkeypatch):
    B, Hq, Hkv, N = 2, 8, 2, 200
    q, k, v = _qkv(B, Hq, Hkv, 1, N, seed=9)
    p = validate_params("tokenselect", {"k": 24, "n_sink": 4, "n_local": 8, "block_size": 64})
    sel = tokenselect_select(q, k, params=p, state=None, mask_mod=None)
    assert sel.indices.shape[2] == 1
    launched = []
    real = codegen.token.token_decode_attention
    monkeypatch.setattr(codegen.token, "token_decode_attention",
                        lambda *a, **kw: launched.append(1) or real(*a, **kw))
    got = codegen.selection_attention(q, k, v, sel, scale=SC)
    assert launched
    assert (got - _masked_ref(q, k, v, sel.to_dense(Hq))).abs().max().item() < TOL


def test_unsupported_token_block_falls_back_with_a_warning():
    q, k, v = _qkv(1, 4, 1, 80, 80, seed=10)
    idx = _unique_lists((1, 1, 2, 8), 40, 8, seed=11).clamp(max=39)  # block 0 lists nothing valid
    idx[:, :, 0] = -1
    sel = TokenSelection(idx, 40, 80, 80)  # 40-query blocks: no power-of-two tile divides them
    with pytest.warns(UserWarning, match="falling back to the CPU token path.*block_q=40"):
        got = codegen.selection_attention(q, k, v, sel, scale=SC)
    assert (got - _masked_ref(q, k, v, sel.to_dense(4))).abs().max().item() < TOL


def test_lowering_backend_triton_runs_tokenselect(monkeypatch):
    from lcpass import lower

    B, Hq, Hkv, N = 1, 4, 1, 128
    q, k, v = _qkv(B, Hq, Hkv, N, N, seed=12)
    params = {"k": 16, "n_sink": 2, "n_local": 4, "block_size": 64}
    run = dict(scale=SC, is_causal=True, window=-1, softcap=0.0, kv_keep=None)
    calls = []
    real = codegen.selection_attention
    monkeypatch.setattr(codegen, "selection_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the CPU path
        tri = lower._run_specs(q, k, v, spec=lower.spec_json([("tokenselect", params)], 0, "triton"),
                               site="tok-triton", **run)
    cpu = lower._run_specs(q, k, v, spec=lower.spec_json([("tokenselect", params)], 0, "cpu"),
                           site="tok-cpu", **run)
    assert calls == [1]
    assert (tri - cpu).abs().max().item() < TOL


# ------------------------------------------------------------------------------------------------
# generated source


def _token_src(template, **options):
    from lcpass.codegen.api import _spec

    opts = tuple(sorted(options.items()))
    sparse, tiles = ((64, 32), (32, 32)) if template == "attn_fwd" else ((16, 32), (16, 32))
    return codegen.render(_spec(template, D, 4, torch.float32, sparse, M.causal_mask(), None,
                                layout="token", tiles=tiles, options=opts))


def test_token_source_gathers_and_masks_only_the_diagonal():
    src = _token_src("attn_fwd", local=True, mask_tokens=False)
    assert "tl.load(KV_IDX + idx_off + tok" in src and "LOCAL = tl.constexpr(True)" in src
    sel_part = src[src.index("# ---- selected tokens"):src.index("# ---- local block")]
    local = src[src.index("# ---- local block"):]
    assert "mask_mod hole" not in sel_part  # listed keys lie before the block: no predicate
    assert local.count("mask_mod hole") == 1  # only the diagonal tiles of the local block
    assert src.lstrip().startswith('"""') and "Notation" in src[:3000]
    masked = _token_src("attn_fwd", local=False, mask_tokens=True)
    assert "# ---- local block" not in masked and masked.count("mask_mod hole") == 1
    dec = _token_src("attn_decode", mask_tokens=False)
    assert "tl.load(FULL_IDX + idx_off + tok" in dec and "mask_mod hole" not in dec
    assert "def attn_decode_merge(" in dec
    with pytest.raises(codegen.UnsupportedSpec, match="needs the options"):
        _token_src("attn_decode")


def test_token_kernels_are_cached_per_spec():
    from lcpass.codegen.cache import STATS

    q, k, v = _qkv(1, 4, 1, 1, 64, seed=13)
    idx = torch.tensor([[[0, 5, 63]]])
    codegen.token_decode_attention(q, k, v, idx, scale=SC, block_n=16)
    renders = STATS["renders"] + STATS["imports"]
    codegen.token_decode_attention(q, k, v, idx.flip(-1), scale=SC, block_n=16)  # new data, same spec
    assert STATS["renders"] + STATS["imports"] == renders
    assert codegen.available(AttentionSpec(head_dim=D, device="cpu"))[0]


# ------------------------------------------------------------------------------------------------
# layout_from_topk on the scores' device


def _old_layout_from_topk(scores, k, *, q_len, kv_len, mask_mod, block_size):
    """The previous implementation (block maps on the CPU, then layout_from_selection)."""
    from lcpass.layout import build_layout

    mk = scores.shape[-1]
    part, full = build_layout(mask_mod, scores.shape[1], q_len, kv_len, block_size).block_maps()
    s = scores.cpu().float().masked_fill(~(part | full), float("-inf"))
    top = s.topk(min(k, mk), dim=-1)
    sel = torch.where(torch.isfinite(top.values), top.indices, -1)
    return layout_from_selection(sel, q_len=q_len, kv_len=kv_len, mask_mod=mask_mod,
                                 block_size=block_size)


@pytest.mark.parametrize("seed", range(6))
def test_layout_from_topk_device_path_equals_the_old_one(seed):
    g = torch.Generator().manual_seed(seed)
    bs = [(64, 64), (32, 64), (64, 32)][seed % 3]
    q_len = int(torch.randint(1, 300, (1,), generator=g))
    kv_len = q_len + int(torch.randint(0, 200, (1,), generator=g))
    mm = [M.causal_mask(), M.sliding_window_mask(70), M.streaming_mask(4, 50)][seed % 3]
    B, H = (1, 3) if seed % 2 else (2, 2)
    mq, mk = -(-q_len // bs[0]), -(-kv_len // bs[1])
    if seed < 3:  # ties everywhere: a handful of distinct values
        scores = torch.randint(0, 3, (B, H, mq, mk), generator=g).float()
    else:
        scores = torch.randn(B, H, mq, mk, generator=g)
    for kk in (1, 2, mk + 3):  # mk + 3: more than the touched blocks (padded top-k)
        new = layout_from_topk(scores, kk, q_len=q_len, kv_len=kv_len, mask_mod=mm, block_size=bs)
        old = _old_layout_from_topk(scores, kk, q_len=q_len, kv_len=kv_len, mask_mod=mm, block_size=bs)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(new, name), getattr(old, name)), (seed, kk, name)


def test_layout_from_topk_needs_no_host_sync():
    # meta tensors have no data: any .cpu(), .item() or Python loop over values would fail
    s = torch.randn(2, 4, 4, 4, device="meta")
    lay = layout_from_topk(s, 2, q_len=250, kv_len=250, mask_mod=M.causal_mask(), block_size=64)
    assert lay.kv_indices.device.type == "meta" and lay.full_kv_num_blocks.shape == (2, 4, 4)
