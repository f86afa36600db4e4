"""BlockLayout: build_layout equals the dense oracle on awkward sizes; conversions; constructors."""

from __future__ import annotations

import warnings

import pytest
import torch

from lcpass.engine import reference_attention
from lcpass.layout import (
    BlockLayout,
    build_layout,
    layout_from_dense,
    layout_from_selection,
    layout_from_topk,
)
from lcpass.masks import (
    and_masks,
    block_diagonal_mask,
    causal_mask,
    dilated_window_mask,
    full_mask,
    mask_from_callable,
    or_masks,
    per_head_mask,
    sink_mask,
    sliding_window_mask,
    streaming_mask,
    strided_mask,
)

H = 4


def dense(m, sq: int, sk: int, heads: int = H, batch: int = 1) -> torch.Tensor:
    b = torch.arange(batch).view(-1, 1, 1, 1)
    h = torch.arange(heads).view(1, -1, 1, 1)
    q = (torch.arange(sq) + sk - sq).view(1, 1, -1, 1)
    kv = torch.arange(sk).view(1, 1, 1, -1)
    return m(b, h, q, kv).expand(batch, heads, sq, sk)


def _every_third(b, h, q, kv):
    return ((q - kv) % 3 == 0) & (kv <= q)


MASKS = [
    full_mask(), causal_mask(), sliding_window_mask(37), sliding_window_mask([1, 20, 64, 100]),
    sink_mask(5), streaming_mask(4, 50), strided_mask(5, [0, 1, 2, 4]),
    and_masks(causal_mask(), strided_mask(3, 1)), dilated_window_mask(10, 3),
    dilated_window_mask([4, 5, 6, 7], [1, 2, 3, 4]),
    and_masks(causal_mask(), block_diagonal_mask(48, [0, 10, 24, 47])),
    per_head_mask([causal_mask(), sliding_window_mask(30), streaming_mask(3, 20), full_mask()]),
    or_masks(strided_mask(7, 0), sliding_window_mask(17)),
    mask_from_callable(_every_third, "every_third"),
]
SIZES = [(200, 200), (257, 257), (1, 300), (3, 300), (100, 257)]


@pytest.mark.parametrize("m", MASKS, ids=repr)
def test_build_layout_equals_dense_oracle(m):
    for sq, sk in SIZES:
        d = dense(m, sq, sk)
        for bs in (16, 32, 64, (32, 16)):
            lay = build_layout(m, H, sq, sk, bs)
            ref = layout_from_dense(d, bs)
            for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
                assert torch.equal(getattr(lay, name), getattr(ref, name)), (name, sq, sk, bs)
            assert torch.equal(lay.to_dense(), d)


@pytest.mark.parametrize("m", [streaming_mask(4, 50), per_head_mask([causal_mask(), sink_mask(9),
                                                                       strided_mask(4, 1), full_mask()])],
                         ids=repr)
def test_layout_from_dense_lists_touched_and_covered_blocks(m):
    # the oracle itself, block by block: partial = touched but not covered, full = covered
    for (sq, sk), (bq, bk) in [((257, 257), (32, 32)), ((3, 300), (64, 16))]:
        d = dense(m, sq, sk)
        part, full = layout_from_dense(d, (bq, bk)).block_maps()
        for i in range(part.shape[2]):
            for j in range(part.shape[3]):
                blk = d[0, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].flatten(1)
                assert torch.equal(full[0, :, i, j], blk.all(1))
                assert torch.equal(part[0, :, i, j], blk.any(1) & ~blk.all(1))


def test_layout_fields_and_dtypes():
    lay = build_layout(causal_mask(), 2, 300, 300, 128)
    assert lay.block_size == (128, 128) and (lay.q_len, lay.kv_len) == (300, 300)
    assert lay.kv_indices.dtype == torch.int32 and lay.full_kv_num_blocks.dtype == torch.int32
    assert lay.kv_num_blocks.tolist() == [[[1, 1, 1], [1, 1, 1]]]
    assert lay.full_kv_num_blocks.tolist() == [[[0, 1, 2], [0, 1, 2]]]
    assert lay.full_kv_indices[0, 0, 2, :2].tolist() == [0, 1]
    assert lay.mask_mod == causal_mask()


def test_build_layout_is_cached_per_parameters():
    a = build_layout(streaming_mask(4, 64), 8, 1000, 1000, 64)
    assert build_layout(streaming_mask(4, 64), 8, 1000, 1000, 64) is a
    assert build_layout(streaming_mask(4, 65), 8, 1000, 1000, 64) is not a
    assert build_layout(streaming_mask(4, 64), 8, 1000, 1000, 32) is not a


def test_density():
    assert build_layout(causal_mask(), 2, 512, 512, 128).density("causal") == 1.0
    assert build_layout(full_mask(), 2, 512, 512, 128).density() == 1.0
    assert build_layout(causal_mask(), 1, 512, 512, 128).density() == 10 / 16
    sw = build_layout(sliding_window_mask(128), 1, 1024, 1024, 128)  # diagonal + one block back
    assert sw.density("causal") == pytest.approx(15 / 36)
    assert sw.num_computed_blocks() == 15
    with pytest.raises(ValueError, match="relative_to"):
        sw.density("dense")


def test_long_layout_builds_in_block_time():
    # O(blocks): 64k positions x 8 heads would be 3.4e10 mask elements densely
    lay = build_layout(streaming_mask(4, 4096), 8, 65536, 65536, 128)
    assert lay.kv_indices.shape == (1, 8, 512, 512)
    assert 0.1 < lay.density("causal") < 0.14


def test_batch_dependent_callable_mask():
    m = mask_from_callable(lambda b, h, q, kv: (kv <= q) & (kv >= 8 * b), "shifted_start")
    lay = build_layout(m, 2, 40, 40, 8, batch=3)
    assert lay.batch == 3
    assert torch.equal(lay.to_dense(), dense(m, 40, 40, heads=2, batch=3))


def test_to_block_mask_matches_flex_eager():
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    m = streaming_mask(3, 40)
    for sq, sk in [(200, 200), (3, 200)]:
        lay = build_layout(m, 2, sq, sk, 64)
        bm = lay.to_block_mask()
        part, full = lay.block_maps()
        got = bm.to_dense()  # block-level union
        assert torch.equal(got.bool(), (part | full))
        q = torch.randn(1, 2, sq, 16)
        k = torch.randn(1, 2, sk, 16)
        v = torch.randn(1, 2, sk, 16)
        with warnings.catch_warnings():  # eager flex warns (once) that it is not compiled
            warnings.simplefilter("ignore")
            out = flex_attention(q, k, v, block_mask=bm, scale=0.25)
        ref = reference_attention(q, k, v, m, scale=0.25)
        assert torch.allclose(out, ref, atol=1e-5)


def test_layout_from_selection_and_topk():
    sel = torch.tensor([[[[0, -1, -1], [1, 0, 1], [2, 0, -1]]]])  # B=1, H=1, Mq=3
    lay = layout_from_selection(sel, q_len=300, kv_len=300, mask_mod=causal_mask(), block_size=128)
    part, full = lay.block_maps()
    assert part[0, 0].nonzero().tolist() == [[0, 0], [1, 1], [2, 2]]  # diagonal: partial
    assert full[0, 0].nonzero().tolist() == [[1, 0], [2, 0]]  # below: full; duplicates merged
    scores = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 2, 4, 4)
    top = layout_from_topk(scores, 2, q_len=512, kv_len=512, mask_mod=causal_mask(), block_size=128)
    # the highest-scoring touched blocks: the diagonal and the one before it (causal restricts)
    p, f = top.block_maps()
    assert (p | f)[0, 0].nonzero().tolist() == [[0, 0], [1, 0], [1, 1], [2, 1], [2, 2], [3, 2], [3, 3]]


@pytest.mark.parametrize("call, err, msg", [
    (lambda: build_layout(causal_mask(), 2, 10, 5), ValueError, "q_len=10"),
    (lambda: build_layout(causal_mask(), 2, 10, 10, 0), ValueError, "block_size"),
    (lambda: build_layout(sliding_window_mask([1, 2, 3]), 2, 10, 10), ValueError, "3 heads"),
    (lambda: build_layout(lambda b, h, q, kv: q >= kv, 2, 10, 10), TypeError, "mask_from_callable"),
    (lambda: layout_from_dense(torch.ones(2, 5, 5, dtype=torch.bool)), ValueError, "Bool"),
    (lambda: layout_from_selection(torch.zeros(1, 1, 2, 1, dtype=torch.long), q_len=300, kv_len=300,
                                   mask_mod=causal_mask(), block_size=128), ValueError, "expected"),
    (lambda: layout_from_topk(torch.zeros(1, 1, 3, 3), 0, q_len=300, kv_len=300,
                              mask_mod=causal_mask(), block_size=128), ValueError, "k=0"),
])
def test_errors(call, err, msg):
    with pytest.raises(err, match=msg):
        call()


def test_blocklayout_validates_shapes():
    lay = build_layout(causal_mask(), 1, 300, 300, 128)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        BlockLayout(lay.kv_num_blocks[:, :, :2], lay.kv_indices, lay.full_kv_num_blocks,
                    lay.full_kv_indices, (128, 128), 300, 300, causal_mask())
