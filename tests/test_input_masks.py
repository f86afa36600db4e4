"""A mask that is a forward input (or built from one) is data: what its example value happens to look
like must never become structure (``is_causal`` / ``window``) in the rewritten model.

The oracle is eager PyTorch on *fresh* masks, not the example the graph was captured with.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import lcpass

B, H, S, D = 2, 2, 12, 8


class UserMaskAttention(torch.nn.Module):
    """Attention whose whole mask is the caller's (bool ``[S, S]`` / ``[B, 1, S, S]`` or additive float)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, H, D).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) * D ** -0.5
        if self.how == "where":
            s = torch.where(mask, s, float("-inf"))
        elif self.how == "masked_fill":
            s = s.masked_fill(~mask, float("-inf"))
        else:  # additive float mask
            s = s + mask
        return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], H * D)


class PaddedCausalAttention(torch.nn.Module):
    """The transformers spelling: causal from shapes, combined with a ``[B, S]`` padding input."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)

    def forward(self, x, attention_mask):
        n = x.shape[1]
        q, k, v = self.qkv(x).view(x.shape[0], n, 3, H, D).permute(2, 0, 3, 1, 4)
        i = torch.arange(n)
        keep = (i[None, :] <= i[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(x.shape[0], n, H * D)


def _causal(shape) -> torch.Tensor:
    return torch.ones(S, S, dtype=torch.bool).tril().expand(shape)


def _fresh(shape, gen) -> torch.Tensor:
    """A random mask that is not causal (each row keeps at least its own key)."""
    m = torch.rand(*shape, S, S, generator=gen) < 0.5
    return m | torch.eye(S, dtype=torch.bool)


def _input(how: str):
    return (lambda m: torch.zeros(m.shape).masked_fill(~m, float("-inf"))) if how == "additive" else (lambda m: m)


@pytest.mark.parametrize("how", ["where", "masked_fill", "additive"])
@pytest.mark.parametrize("shape", [(), (B, 1)])
def test_a_user_mask_that_looks_causal_stays_data(how, shape):
    torch.manual_seed(0)
    model = UserMaskAttention(how).eval()
    x = torch.randn(B, S, H * D)
    to_input = _input(how)
    example = to_input(_causal((*shape, S, S)))
    sites = lcpass.inspect(model, (x, example)).sites
    assert len(sites) == 1
    # causal on the example only: a claim checked on every call, never structure in the canonical op
    assert sites[0].mask == "causal?+padding", sites[0].mask
    dense = lcpass.optimize(model, method="dense", example_inputs=(x, example))
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        m = to_input(_fresh(shape, gen))
        xx = torch.randn(B, S, H * D, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(dense(xx, m), model(xx, m), rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", ["where", "additive"])
def test_a_sparse_plan_on_a_checked_mask_runs_exactly_when_the_claim_fails(how):
    """StreamingLLM planned on a site that was causal on the example: a fresh non-causal mask runs exact
    dense attention (with a warning), a fresh causal mask with padding runs the method."""
    torch.manual_seed(0)
    model = UserMaskAttention(how).eval()
    x = torch.randn(B, S, H * D)
    to_input = _input(how)
    opt = lcpass.optimize(model, method="streaming", sink=1, window=3, dense_below=0,
                          example_inputs=(x, to_input(_causal((B, 1, S, S)))))
    gen = torch.Generator().manual_seed(2)
    m = to_input(_fresh((B, 1), gen))
    with torch.no_grad(), pytest.warns(UserWarning, match="not causal as the example"):
        torch.testing.assert_close(opt(x, m), model(x, m), rtol=0, atol=1e-5)
    # causal with the last two keys of row 1 padded: the method, on the valid keys only
    keep = _causal((B, 1, S, S)).clone()
    keep[1, :, :, -2:] = False
    stream = torch.zeros(S, S, dtype=torch.bool)
    i = torch.arange(S)
    stream = (i[None, :] <= i[:, None]) & ((i[None, :] < 1) | (i[None, :] > i[:, None] - 3))
    want_keep = keep & stream
    with torch.no_grad():
        got = opt(x, to_input(keep))
        want = model(x, to_input(want_keep))
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, : S - 2], want[1, : S - 2], rtol=0, atol=1e-5)


def test_padding_input_keeps_the_structural_causal_mask():
    """Causality built from shapes is structure even when combined with an input: detected as causal,
    and exact for any padding the caller passes later."""
    torch.manual_seed(0)
    model = PaddedCausalAttention().eval()
    x = torch.randn(B, S, H * D)
    ones = torch.ones(B, S, dtype=torch.long)
    sites = lcpass.inspect(model, (x, ones)).sites
    assert len(sites) == 1 and sites[0].is_causal
    opt = lcpass.optimize(model, method="dense", example_inputs=(x, ones))
    pad = ones.clone()
    pad[0, :3] = 0  # left padding on the first row
    with torch.no_grad():
        torch.testing.assert_close(opt(x, pad), model(x, pad), rtol=0, atol=1e-5)


def test_the_compile_door_keeps_a_user_mask_exact():
    """The same rule reaches torch.compile(backend="lcpass") (detection is shared by every door)."""
    torch.manual_seed(0)
    model = UserMaskAttention("where").eval()
    x = torch.randn(B, S, H * D)
    compiled = torch.compile(model, backend="lcpass", options={"method": "dense"})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, _causal((S, S))), model(x, _causal((S, S))), rtol=0, atol=1e-5)
        for _ in range(2):
            m = _fresh((), gen)
            torch.testing.assert_close(compiled(x, m), model(x, m), rtol=0, atol=1e-5)


def test_the_onnx_door_checks_the_claim_too(tmp_path):
    """onnxruntime runs the same check: a fresh non-causal mask gives eager's answer, a causal one with
    padding gives the method's, as lcpass.optimize does."""
    import onnxruntime as ort

    from lcpass.export import export

    torch.manual_seed(0)
    model = UserMaskAttention("where").eval()
    x = torch.randn(B, S, H * D)
    inputs = {"x": x, "mask": _causal((B, 1, S, S)).clone()}
    plan = dict(method="streaming", sink=1, window=3, dense_below=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, inputs, tmp_path / "m.onnx", dynamic_seq=False, **plan)
        opt = lcpass.optimize(model, example_inputs=inputs, **plan)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    names = [i.name for i in sess.get_inputs()]
    padded = _causal((B, 1, S, S)).clone()
    padded[1, :, :, -2:] = False
    fresh = _fresh((B, 1), torch.Generator().manual_seed(3))
    for m, rows in ((fresh, S), (padded, S - 2)):
        feed = {k: v.numpy() for k, v in {"x": x, "mask": m}.items() if k in names}
        got = torch.from_numpy(sess.run(None, feed)[0])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = opt(x, m)
        torch.testing.assert_close(got[:, :rows], want[:, :rows], rtol=0, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in
                                   {"x": x, "mask": fresh}.items() if k in names})[0]), model(x, fresh),
                                   rtol=0, atol=1e-4)


def test_a_4d_mask_input_exports_with_a_dynamic_length(tmp_path):
    """dynamic_seq=True: the sequence length is every dim of that size ([B, S, D] activations, a [B, 1, S, S]
    mask), not dim 1 of every input (the mask's dim 1 is 1). onnxruntime at two lengths, fresh masks, eager."""
    import onnxruntime as ort

    from lcpass.export import export

    torch.manual_seed(0)
    model = UserMaskAttention("where").eval()
    x = torch.randn(B, S, H * D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, {"x": x, "mask": _causal((B, 1, S, S)).clone()}, tmp_path / "m.onnx", method="dense")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    gen = torch.Generator().manual_seed(5)
    for n in (S, S - 5):
        xn = torch.randn(B, n, H * D, generator=gen)
        mn = (torch.rand(B, 1, n, n, generator=gen) < 0.5) | torch.eye(n, dtype=torch.bool)
        got = torch.from_numpy(sess.run(None, {"x": xn.numpy(), "mask": mn.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, model(xn, mn), rtol=0, atol=1e-5)


def test_verify_runs_on_a_2d_mask_input():
    """optimize(verify=True) with a caller's [S, S] mask (and positional inputs) checks the site."""
    torch.manual_seed(0)
    model = UserMaskAttention("where").eval()
    x = torch.randn(B, S, H * D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = lcpass.optimize(model, method="streaming", sink=1, window=3, dense_below=0,
                              example_inputs=(x, _causal((S, S)).clone()), verify=True)
    rep = opt.lcpass_report.verify
    assert list(rep) == ["attention"] and not rep.failed and rep["attention"] < 1e-5


class TwoMasks(torch.nn.Module):
    """Reads only its first mask input: an example passing one tensor as both must not merge them
    (torch.export keeps the last of the aliased placeholders)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)

    def forward(self, x, mask, unused):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, H, D).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        s = s.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
        return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], H * D)


def _holes(gen) -> torch.Tensor:
    m = (torch.rand(B, S, generator=gen) < 0.7).long()
    m[:, 0] = 1
    return m


def test_one_tensor_passed_as_two_inputs_stays_two_inputs(tmp_path):
    """torch.export merges aliased example inputs into one placeholder; capture un-aliases them, so the
    optimized model reads the argument the model reads on later calls with distinct tensors."""
    torch.manual_seed(0)
    model = TwoMasks().eval()
    gen = torch.Generator().manual_seed(3)
    x, m = torch.randn(B, S, H * D), _holes(gen)
    opt = lcpass.optimize(model, method="dense", example_inputs=(x, m, m))
    mask, other = _holes(gen), _holes(gen)
    with torch.no_grad():
        torch.testing.assert_close(opt(x, mask, other), model(x, mask, other), rtol=0, atol=1e-5)
    res = lcpass.export(model, (x, m, m), tmp_path / "m.pt2", format="torch", method="dense")
    with torch.no_grad():
        torch.testing.assert_close(res.program.module()(x, mask, other), model(x, mask, other), rtol=0, atol=1e-5)


def test_a_padding_mask_broadcast_over_queries_is_not_read_as_causal():
    """A [B, 1, 1, S] keep mask with holes is padding; read as one query row it looked "causal"."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    x, m = torch.randn(B, S, H * D), _holes(gen)
    sites = lcpass.inspect(TwoMasks().eval(), (x, m, m.clone())).sites
    assert [s.mask for s in sites] == ["padding"] and not sites[0].is_causal
