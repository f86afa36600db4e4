"""``torch.library.opcheck`` on every lcpass custom op: schema, autograd registration, fake kernel
(shapes *and strides* equal the real kernel's, which Inductor asserts) and AOT dispatch, with contiguous
and permuted (transposed-view) q/k/v, fp32 and bf16, with and without a mask."""
from __future__ import annotations

import pytest
import torch

import lcpass  # noqa: F401  (registers the ops)
from lcpass.kv.functional import kv_bound  # noqa: F401  (registers lcpass::kv_bound)
from lcpass.lower import spec_json
from lcpass.plan import HeadSpec

B, H, HKV, S, D = 2, 4, 2, 13, 8
TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _qkv(layout: str, dtype: torch.dtype, grad: bool):
    g = torch.Generator().manual_seed(0)
    if layout == "contiguous":
        q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (H, HKV, HKV))
    else:  # [B, S, H, D] projections viewed as [B, H, S, D], as GPT-2/BERT-style code hands them over
        q, k, v = (torch.randn(B, S, h, D, generator=g).transpose(1, 2) for h in (H, HKV, HKV))
    return tuple(t.to(dtype).requires_grad_(grad) for t in (q, k, v))


def _mask(with_mask: bool):
    if not with_mask:
        return None
    m = torch.ones(B, 1, 1, S, dtype=torch.bool)
    m[1, ..., :3] = False  # left padding on row 1
    return m


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_attention_op(layout, dtype, with_mask):
    q, k, v = _qkv(layout, dtype, grad=dtype == torch.float32)
    args = (q, k, v, _mask(with_mask), D ** -0.5, not with_mask, -1, 0.0, 0.0, "site", "matmul")
    torch.library.opcheck(torch.ops.lcpass.attention.default, args, test_utils=TESTS)


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_planned_attention_op(layout, dtype, with_mask):
    q, k, v = _qkv(layout, dtype, grad=dtype == torch.float32)
    spec = spec_json([HeadSpec("streaming", {"sink": 1, "window": 4})], dense_below=0)
    kind = "causal+padding" if with_mask else "causal"
    args = (q, k, v, _mask(with_mask), D ** -0.5, True, -1, 0.0, 0.0, "site", kind, spec)
    torch.library.opcheck(torch.ops.lcpass.planned_attention.default, args, test_utils=TESTS)


def test_kv_bound_op():
    for x in (torch.randn(B, HKV, S, D), torch.randn(B, S, HKV, D).transpose(1, 2)):
        torch.library.opcheck(torch.ops.lcpass.kv_bound.default, (x, 2, 5), test_utils=TESTS[:3])


@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_planned_attention_backward_op(layout):
    """The backward op's kernel runs ``torch.func.vjp``, which opcheck's cross-checking dispatch modes cannot
    host (functorch wrappers there have no storage); its fake kernel is checked against the real one by
    hand instead (shapes, strides, dtypes), and the gradients against autograd through SDPA."""
    import lcpass.grad  # noqa: F401  (registers lcpass::planned_attention_backward)
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _qkv(layout, torch.float32, grad=False)
    spec = spec_json([HeadSpec("streaming", {"sink": 1, "window": 4})], dense_below=0)
    grad = torch.randn(B, H, S, D)
    rest = (None, D ** -0.5, True, -1, 0.0, 0.0, "site", "causal", spec)
    op = torch.ops.lcpass.planned_attention_backward.default
    real = op(grad, q, k, v, *rest)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(t) for t in (grad, q, k, v)), *rest)
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
    # oracle: autograd through SDPA with StreamingLLM's mask written out as a dense bool tensor
    from lcpass.masks import streaming_mask

    i = torch.arange(S)
    keep = streaming_mask(1, 4)(torch.tensor(0), torch.tensor(0), i[:, None], i[None, :])
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, attn_mask=keep, scale=D ** -0.5,
                                                     enable_gqa=True).backward(grad)
    for want, got in zip((qr.grad, kr.grad, vr.grad), real):
        assert torch.allclose(want, got, atol=1e-5)
