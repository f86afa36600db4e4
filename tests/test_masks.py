"""mask_mod factories: element semantics, block classifiers, naming, hashing, errors."""

from __future__ import annotations

import pytest
import torch

from lcpass.masks import (
    MaskMod,
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


def dense(m: MaskMod, sq: int, sk: int, heads: int = H) -> torch.Tensor:
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    h = torch.arange(heads).view(1, -1, 1, 1)
    q = (torch.arange(sq) + sk - sq).view(1, 1, -1, 1)
    kv = torch.arange(sk).view(1, 1, 1, -1)
    return m(b, h, q, kv).expand(1, heads, sq, sk)


def visible(m: MaskMod, q: int, n: int, h: int = 0) -> list[int]:
    t = torch.tensor
    return [kv for kv in range(n) if bool(m(t(0), t(h), t(q), t(kv)))]


def test_sliding_window_counts_current_token_like_hf():
    # HF sliding_window=3: query 10 sees keys 8, 9, 10
    assert visible(sliding_window_mask(3), 10, 12) == [8, 9, 10]
    assert visible(sliding_window_mask(1), 5, 8) == [5]


def test_leaf_semantics():
    assert visible(causal_mask(), 3, 6) == [0, 1, 2, 3]
    assert visible(full_mask(), 1, 3) == [0, 1, 2]
    assert visible(sink_mask(2), 0, 5) == [0, 1]
    assert visible(streaming_mask(2, 2), 6, 8) == [0, 1, 5, 6]
    assert visible(streaming_mask(2, 2), 1, 8) == [0, 1]  # never past the query
    assert visible(strided_mask(3, 1), 0, 10) == [1, 4, 7]
    assert visible(dilated_window_mask(3, 2), 9, 12) == [5, 7, 9]
    assert visible(block_diagonal_mask(4), 5, 10) == [4, 5, 6, 7]
    assert visible(block_diagonal_mask(4, 1), 5, 10) == [3, 4, 5, 6]  # shifted groups


def test_per_head_parameters():
    m = sliding_window_mask([1, 2, 3, 4])
    assert [len(visible(m, 9, 10, h)) for h in range(4)] == [1, 2, 3, 4]
    s = strided_mask(4, torch.tensor([0, 1, 2, 3]))
    assert visible(s, 0, 8, 2) == [2, 6]
    p = per_head_mask([causal_mask(), sink_mask(1)])
    assert visible(p, 2, 4, 0) == [0, 1, 2] and visible(p, 2, 4, 1) == [0]
    assert m.n_heads == 4 and p.n_heads == 2 and causal_mask().n_heads is None


def test_and_or_combinators():
    m = and_masks(causal_mask(), or_masks(sink_mask(1), sliding_window_mask(2)))
    assert torch.equal(dense(m, 20, 20), dense(streaming_mask(1, 2), 20, 20))
    o = or_masks(strided_mask(5, 0), sliding_window_mask(2))
    assert visible(o, 7, 8) == [0, 5, 6, 7]
    assert and_masks(causal_mask()) == causal_mask()


def test_names_repr_and_hash_by_parameters():
    assert sliding_window_mask(64).__name__ == "sliding_window(64)"
    assert repr(streaming_mask(4, 1024)) == "streaming(sink=4, window=1024)"
    assert sliding_window_mask(64) == sliding_window_mask(64)
    assert sliding_window_mask(64) != sliding_window_mask(65)
    assert sliding_window_mask([1, 2]) == sliding_window_mask(torch.tensor([1, 2]))
    assert len({causal_mask(), causal_mask(), streaming_mask(4, 8), streaming_mask(4, 8)}) == 2
    fn = lambda b, h, q, kv: q >= kv  # noqa: E731
    assert mask_from_callable(fn, "c") == mask_from_callable(fn, "c")
    assert not mask_from_callable(fn, "c").has_block_classifier


LEAVES = [
    full_mask(), causal_mask(), sliding_window_mask(7), sliding_window_mask([1, 5, 9, 30]),
    sink_mask(3), strided_mask(3, [0, 1, 2, 1]), dilated_window_mask(4, [1, 2, 3, 5]),
    block_diagonal_mask(6, [0, 1, 3, 5]),
]


@pytest.mark.parametrize("m", LEAVES, ids=repr)
def test_leaf_block_classifiers_are_exact(m):
    # every block of a 40x40 grid at several tile sizes, against brute force
    d = dense(m, 40, 40)[0]  # [H, 40, 40]
    for bq, bk in [(1, 1), (3, 5), (8, 8), (7, 16)]:
        ql = torch.arange(0, 40, bq)
        kl = torch.arange(0, 40, bk)
        qh, kh = (ql + bq).clamp(max=40), (kl + bk).clamp(max=40)
        h = torch.arange(H).view(-1, 1, 1)
        t, f, e = m.classify(h, ql.view(1, -1, 1), qh.view(1, -1, 1), kl.view(1, 1, -1), kh.view(1, 1, -1))
        assert bool(e.all())
        for i, (a, b) in enumerate(zip(ql.tolist(), qh.tolist())):
            for j, (c, dd) in enumerate(zip(kl.tolist(), kh.tolist())):
                blk = d[:, a:b, c:dd]
                assert torch.equal(t.expand(H, len(ql), len(kl))[:, i, j], blk.flatten(1).any(1))
                assert torch.equal(f.expand(H, len(ql), len(kl))[:, i, j], blk.flatten(1).all(1))


def test_combinator_classifier_bounds():
    m = and_masks(causal_mask(), strided_mask(3, 1))
    h = torch.zeros(1, 1, 1, dtype=torch.long)
    lo = torch.arange(0, 32, 8).view(1, -1, 1)
    klo = torch.arange(0, 32, 8).view(1, 1, -1)
    t, f = m.block_mod(h, lo, lo + 8, klo, klo + 8)
    d = dense(m, 32, 32, 1)[0, 0].view(4, 8, 4, 8)
    assert bool((t | ~d.any(3).any(1)).all())  # touched is a superset
    assert bool((~f | d.all(3).all(1)).all())  # full is a subset


@pytest.mark.parametrize("make, msg", [
    (lambda: sliding_window_mask(0), "window=0"),
    (lambda: sliding_window_mask(-3), "window=-3"),
    (lambda: sink_mask(-1), "sink=-1"),
    (lambda: strided_mask(4, 4), "offset"),
    (lambda: dilated_window_mask(3, 0), "dilation"),
    (lambda: block_diagonal_mask(0), "group"),
    (lambda: sliding_window_mask([]), "empty"),
    (lambda: and_masks(causal_mask(), sliding_window_mask([1, 2]), sink_mask([1, 2, 3])), "heads"),
    (lambda: per_head_mask([sliding_window_mask([1, 2, 3])]), "per-head"),
])
def test_errors_name_the_parameter(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


def test_type_errors():
    with pytest.raises(TypeError, match="MaskMod"):
        and_masks(causal_mask(), lambda b, h, q, kv: q >= kv)
    with pytest.raises(TypeError, match="callable"):
        mask_from_callable(3, "x")
    with pytest.raises(TypeError, match="window"):
        sliding_window_mask(2.5)
