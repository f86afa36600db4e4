"""The CPU block-sparse engine against the dense oracle, and proof that it skips work."""

from __future__ import annotations

import pytest
import torch

from lcpass.engine import (
    build_plan,
    dense_attention,
    reference_attention,
    run_plan,
    sparse_attention,
)
from lcpass.layout import build_layout, layout_from_selection
from lcpass.masks import (
    and_masks,
    block_diagonal_mask,
    causal_mask,
    dilated_window_mask,
    full_mask,
    mask_from_callable,
    per_head_mask,
    sink_mask,
    sliding_window_mask,
    streaming_mask,
    strided_mask,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
HQ = 8

MASKS = [
    causal_mask(),
    streaming_mask(4, 50),
    sliding_window_mask(70),
    and_masks(causal_mask(), strided_mask(3, [0, 1, 2, 0, 1, 2, 0, 1])),
    dilated_window_mask(20, 3),
    and_masks(causal_mask(), block_diagonal_mask(48, [0, 10, 24, 47, 5, 6, 7, 8])),
    per_head_mask([causal_mask(), sliding_window_mask(30), streaming_mask(3, 20), full_mask(),
                   sink_mask(7), causal_mask(), sliding_window_mask(1), dilated_window_mask(9, 2)]),
]

# (B, Hkv, Sq, Sk, block): prefill at lengths that are not block multiples, GQA, MQA, batch 2, decode
CASES = [
    (1, 2, 300, 300, 64),  # GQA 8/2
    (2, 1, 257, 257, 32),  # MQA, batch 2
    (1, 8, 200, 200, 64),  # MHA
    (1, 2, 1, 300, 64),  # decode, one query
    (2, 2, 3, 300, 64),  # decode, three queries
]


def qkv(B, Hkv, Sq, Sk, D=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    return q, k, v


def close(out, ref, dtype=torch.float32):
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("m", MASKS, ids=repr)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_Hkv{}_{}x{}_bs{}".format(*c))
def test_engine_matches_reference(m, case):
    B, Hkv, Sq, Sk, bs = case
    q, k, v = qkv(B, Hkv, Sq, Sk)
    lay = build_layout(m, HQ, Sq, Sk, bs)
    ref = reference_attention(q, k, v, m, scale=0.2)
    close(sparse_attention(q, k, v, lay, scale=0.2, dense_below=0), ref)  # block engine
    close(sparse_attention(q, k, v, lay, scale=0.2), ref)  # dense fallback below the crossover
    # split rows: full blocks unmasked, partial blocks merged by log-sum-exp
    close(run_plan(build_plan(lay, B, HQ, Hkv, fuse_max_full=0), q, k, v, scale=0.2), ref)


@pytest.mark.parametrize("m", [causal_mask(), streaming_mask(4, 50), sliding_window_mask(70)], ids=repr)
@pytest.mark.parametrize("Sq", [300, 1, 3])
def test_key_padding_left(m, Sq):
    B, Hkv, Sk = 2, 2, 300
    q, k, v = qkv(B, Hkv, Sq, Sk)
    keep = torch.ones(B, Sk, dtype=torch.bool)
    keep[0, :37] = False  # left padding inside a block
    keep[1, :130] = False  # left padding across two blocks
    lay = build_layout(m, HQ, Sq, Sk, 64)
    ref = reference_attention(q, k, v, m, scale=0.2, kv_keep=keep)
    close(sparse_attention(q, k, v, lay, scale=0.2, kv_keep=keep, dense_below=0), ref)
    close(sparse_attention(q, k, v, lay, scale=0.2, kv_keep=keep), ref)
    plan = build_plan(lay, B, HQ, Hkv, kv_keep=keep, fuse_max_full=0)
    close(run_plan(plan, q, k, v, scale=0.2), ref)


def test_rows_without_keys_are_zero_not_nan():
    B, Hkv, S = 2, 2, 300
    q, k, v = qkv(B, Hkv, S, S)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, :200] = False  # causal queries < 200 of batch 1 see nothing
    lay = build_layout(causal_mask(), HQ, S, S, 64)
    out = sparse_attention(q, k, v, lay, scale=0.2, kv_keep=keep, dense_below=0)
    assert torch.isfinite(out).all()
    assert out[1, :, :200].abs().max() == 0
    close(out, reference_attention(q, k, v, causal_mask(), scale=0.2, kv_keep=keep))
    out_dense = sparse_attention(q, k, v, lay, scale=0.2, kv_keep=keep)
    assert torch.isfinite(out_dense).all() and out_dense[1, :, :200].abs().max() == 0


def test_right_padding_and_mqa_decode():
    q, k, v = qkv(2, 1, 1, 300)
    keep = torch.ones(2, 300, dtype=torch.bool)
    keep[0, 250:] = False
    m = streaming_mask(4, 100)
    lay = build_layout(m, HQ, 1, 300, 64)
    out = sparse_attention(q, k, v, lay, scale=0.2, kv_keep=keep, dense_below=0)
    close(out, reference_attention(q, k, v, m, scale=0.2, kv_keep=keep))


@pytest.mark.parametrize("m", [causal_mask(), streaming_mask(4, 50)], ids=repr)
def test_bf16(m):
    q, k, v = qkv(1, 2, 300, 300, dtype=torch.bfloat16)
    lay = build_layout(m, HQ, 300, 300, 64)
    out = sparse_attention(q, k, v, lay, scale=0.2, dense_below=0)
    assert out.dtype == torch.bfloat16
    close(out, reference_attention(q, k, v, m, scale=0.2), torch.bfloat16)
    split = run_plan(build_plan(lay, 1, HQ, 2, fuse_max_full=0), q, k, v, scale=0.2)
    close(split, reference_attention(q, k, v, m, scale=0.2), torch.bfloat16)


def test_score_mod_softcap_and_head_bias():
    def score_mod(s, b, h, qi, ki):
        return 5.0 * torch.tanh(s / 5.0) - 0.01 * h * (qi - ki)

    m = streaming_mask(4, 60)
    q, k, v = qkv(2, 2, 300, 300)
    keep = torch.ones(2, 300, dtype=torch.bool)
    keep[1, :20] = False
    lay = build_layout(m, HQ, 300, 300, 64)
    ref = reference_attention(q, k, v, m, scale=0.2, score_mod=score_mod, kv_keep=keep)
    close(sparse_attention(q, k, v, lay, scale=0.2, score_mod=score_mod, kv_keep=keep, dense_below=0), ref)
    close(sparse_attention(q, k, v, lay, scale=0.2, score_mod=score_mod, kv_keep=keep), ref)


def test_mask_mod_override_applies_in_partial_blocks_only():
    # layout from the causal mask; the override narrows partial (diagonal) blocks, full blocks stay full
    q, k, v = qkv(1, 2, 256, 256)
    lay = build_layout(causal_mask(), HQ, 256, 256, 64)
    tri = and_masks(causal_mask(), sliding_window_mask(8))
    out = sparse_attention(q, k, v, lay, scale=0.2, mask_mod=tri, dense_below=0)
    d = lay.to_dense(tri)  # [1, H, S, S]
    assert not torch.equal(d, lay.to_dense())
    close(out, reference_attention(q, k, v, lambda b, h, qi, ki: d[0, h, qi, ki], scale=0.2))


def test_engine_skips_blocks_outside_the_layout():
    # decode: NaN in every key/value block the layout does not list; a dense pass would return NaN
    S, bs = 512, 64
    m = streaming_mask(64, 64)  # the sink block and the last two blocks
    q, k, v = qkv(2, 2, 3, S)
    lay = build_layout(m, HQ, 3, S, bs)
    part, full = lay.block_maps()
    used = (part | full)[0, 0, 0]  # [Mk]
    assert used.tolist() == [True, False, False, False, False, False, True, True]
    plan = build_plan(lay, 2, HQ, 2)
    assert plan.computed_blocks == 2 * 2 * 3  # B x kv-groups (4 q heads packed) x blocks
    ref = reference_attention(q, k, v, m, scale=0.2)
    kp, vp = k.clone(), v.clone()
    for j in (~used).nonzero().flatten().tolist():
        kp[:, :, j * bs:(j + 1) * bs] = float("nan")
        vp[:, :, j * bs:(j + 1) * bs] = float("nan")
    close(sparse_attention(q, kp, vp, lay, scale=0.2, dense_below=0), ref)
    with pytest.raises(AssertionError):  # the poison is real: dense attention over it is NaN
        close(sparse_attention(q, kp, vp, build_layout(causal_mask(), HQ, 3, S, bs), scale=0.2,
                               dense_below=0), ref)


def test_prefill_reads_only_listed_blocks_per_query_block():
    # diagonal-only layout: the last query block must not read the NaN keys before it
    S, bs = 512, 64
    sel = torch.arange(S // bs).view(1, 1, -1, 1).expand(1, HQ, -1, 1)
    diag = layout_from_selection(sel, q_len=S, kv_len=S, mask_mod=causal_mask(), block_size=bs)
    q, k, v = qkv(1, 2, S, S)
    kq = k.clone()
    kq[:, :, : S - bs] = float("nan")
    out = sparse_attention(q, kq, v, diag, scale=0.2, dense_below=0)
    assert torch.isfinite(out[:, :, S - bs:]).all()
    assert torch.isnan(out[:, :, :bs]).all()  # the other query blocks did read their poisoned block


def test_dense_shortcut_and_plan_structure():
    lay = build_layout(causal_mask(), HQ, 1024, 1024)
    assert build_plan(lay, 1, HQ, 2).dense == "causal"
    assert build_plan(build_layout(full_mask(), HQ, 1000, 1000), 1, HQ, 2).dense == "full"
    sw = build_layout(streaming_mask(128, 512), HQ, 4096, 4096)
    plan = build_plan(sw, 1, HQ, 2)
    assert plan.dense is None and plan.Ge == 4  # GQA heads share gathered KV
    kinds = {(b.kind, b.merge) for b in plan.buckets}
    assert ("masked", True) not in kinds  # rows with few full blocks run as one call
    assert len(plan.buckets) <= 12  # a few buckets, not one call per block or head
    split = build_plan(build_layout(sliding_window_mask(1000), HQ, 4096, 4096), 1, HQ, 2, fuse_max_full=0)
    assert any(b.segments for b in split.buckets)  # contiguous runs read through strided views
    assert {(b.kind, b.merge) for b in split.buckets} >= {("full", False), ("masked", True)}
    mixed = per_head_mask([causal_mask(), sliding_window_mask(256)] * 4)
    assert build_plan(build_layout(mixed, HQ, 1024, 1024), 1, HQ, 2).Ge == 1  # different maps


def test_coalesced_small_buckets():
    # ramp-up rows of a window have distinct block counts: they run as one padded masked bucket
    m = streaming_mask(4, 300)
    q, k, v = qkv(1, 2, 1024, 1024)
    lay = build_layout(m, HQ, 1024, 1024, 64)
    plan = build_plan(lay, 1, HQ, 2)
    empty = plan.bank.shape[0] - 1
    padded = [b for b in plan.buckets if b.kind == "masked" and bool((b.patterns == empty).any())]
    assert len(padded) == 1
    close(run_plan(plan, q, k, v, scale=0.2), reference_attention(q, k, v, m, scale=0.2))


def test_batch_dependent_layout():
    m = mask_from_callable(lambda b, h, q, kv: (kv <= q) & (kv >= 50 * b), "shifted_start")
    lay = build_layout(m, HQ, 300, 300, 64, batch=2)
    assert lay.batch == 2
    q, k, v = qkv(2, 2, 300, 300)
    close(sparse_attention(q, k, v, lay, scale=0.2, dense_below=0), reference_attention(q, k, v, m, scale=0.2))


def test_dense_attention_causal_is_bottom_right():
    q, k, v = qkv(1, 2, 5, 40)
    out = dense_attention(q, k, v, scale=0.2, is_causal=True)
    close(out, reference_attention(q, k, v, causal_mask(), scale=0.2))


@pytest.mark.parametrize("call, msg", [
    (lambda q, k, v, lay: sparse_attention(q, k, v[:, :, :100], lay, scale=1.0), "v"),
    (lambda q, k, v, lay: sparse_attention(q[:, :4], k, v, lay, scale=1.0), "heads"),
    (lambda q, k, v, lay: sparse_attention(q[:, :, :10], k, v, lay, scale=1.0), "q_len=300"),
    (lambda q, k, v, lay: sparse_attention(q, k, v, lay, scale=1.0,
                                           kv_keep=torch.ones(1, 10, dtype=torch.bool)), "kv_keep"),
    (lambda q, k, v, lay: sparse_attention(q, k[:, :1].expand(1, 3, 300, 32), v[:, :1].expand(1, 3, 300, 32),
                                           lay, scale=1.0), "divide"),
])
def test_errors(call, msg):
    q, k, v = qkv(1, 2, 300, 300)
    lay = build_layout(causal_mask(), HQ, 300, 300, 64)
    with pytest.raises(ValueError, match=msg):
        call(q, k, v, lay)
