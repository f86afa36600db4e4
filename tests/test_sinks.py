"""Learned attention sinks (gpt-oss): one extra logit per head joins each row's softmax and its probability
is dropped before ``@ v``. Detected structurally (``cat([scores, sink], -1)`` -> softmax -> ``[..., :-1]``),
carried by the canonical op's ``sinks``, and applied by every method from its log-sum-exp:
``out * sigmoid(lse - sink)``.

The oracles are written out here in the eager formulation (a concatenated column, a softmax, a dropped
column) or are the model's own code (transformers' gpt-oss through the dispatch-mode oracle).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lcpass
from lcpass.engine import sparse_attention
from lcpass.engine.reference import reference_attention
from lcpass.layout import build_layout
from lcpass.lower import PLANNED_OP, spec_json
from lcpass.masks import causal_mask, streaming_mask
from lcpass.capture import capture
from lcpass.patterns import canonicalize
from lcpass.patterns.op import reference

SINK, WINDOW = 2, 8
STREAM = dict(method="streaming", sink=SINK, window=WINDOW, dense_below=0)


def _eager(q, k, v, keep, sinks, scale):
    """The gpt-oss formulation, written out: [B, Hq, Sq, Sk] keep (True = attend), sinks [Hq]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    col = sinks.double().reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
    c = torch.cat([s, col], -1)
    p = torch.softmax(c - c.max(-1, keepdim=True).values, -1)[..., :-1]
    return (p @ v.double()).to(q.dtype)


def _streaming_keep(sq, sk, sink=SINK, window=WINDOW):
    i = torch.arange(sk - sq, sk)[:, None]
    j = torch.arange(sk)[None, :]
    return (j <= i) & ((j < sink) | (i - j < window))


# ----------------------------------------------------------------------------- the op and the engine
@pytest.mark.parametrize("shape", [(2, 4, 2, 37, 37, 16, 16), (1, 4, 1, 23, 50, 8, 12), (3, 2, 2, 5, 5, 8, 8)])
def test_reference_with_sinks_is_the_eager_formulation(shape):
    b, hq, hkv, sq, sk, dk, dv = shape
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(b, hq, sq, dk, generator=g), torch.randn(b, hkv, sk, dk, generator=g)
    v, sinks = torch.randn(b, hkv, sk, dv, generator=g), torch.randn(hq, generator=g) * 2
    keep = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    got = reference(q, k, v, None, 0.3, True, -1, 0.0, 0.0, sinks.reshape(1, -1, 1, 1))
    torch.testing.assert_close(got, _eager(q, k, v, keep, sinks, 0.3), rtol=0, atol=1e-5)
    # a row that sees no key gives the sink all the probability: zeros, as eager does
    none = torch.zeros(b, 1, sq, sk, dtype=torch.bool)
    none[..., 1:, :] = True
    got = reference(q, k, v, none, 0.3, False, -1, 0.0, 0.0, sinks.reshape(1, -1, 1, 1))
    assert bool((got[:, :, 0] == 0).all())
    torch.testing.assert_close(got[:, :, 1:], _eager(q, k, v, none.expand(b, hq, sq, sk), sinks, 0.3)[:, :, 1:],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 2, 300, 300, 16, 16), (2, 4, 1, 17, 530, 16, 24), (2, 4, 4, 261, 261, 8, 8)])
@pytest.mark.parametrize("padded", [False, True])
def test_engine_log_sum_exp_matches_the_reference(shape, padded):
    b, hq, hkv, sq, sk, dk, dv = shape
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(b, hq, sq, dk, generator=g), torch.randn(b, hkv, sk, dk, generator=g), \
        torch.randn(b, hkv, sk, dv, generator=g)
    kv_keep = None
    if padded:
        kv_keep = torch.ones(b, sk, dtype=torch.bool)
        kv_keep[-1, :7] = False
    for mask in (streaming_mask(4, 64), causal_mask()):
        lay = build_layout(mask, hq, sq, sk)
        out, lse = sparse_attention(q, k, v, lay, scale=0.25, kv_keep=kv_keep, dense_below=0, return_lse=True)
        ro, rl = reference_attention(q, k, v, mask, scale=0.25, kv_keep=kv_keep, return_lse=True)
        torch.testing.assert_close(out, ro, rtol=0, atol=2e-5)
        torch.testing.assert_close(lse, rl, rtol=0, atol=2e-5)


@pytest.mark.parametrize("padding", [False, True])
def test_planned_streaming_with_sinks_is_the_hand_built_reference(padding):
    """The planned op (CPU engine) against the eager formulation on the streaming mask, GQA, Sq < Sk, and
    left padding (each row runs alone on its real keys)."""
    b, hq, hkv, sq, sk, d = 2, 4, 2, 29, 45, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hkv, sk, d, generator=g), \
        torch.randn(b, hkv, sk, d, generator=g)
    sinks = torch.randn(hq, generator=g) * 2
    spec = spec_json([("streaming", {"sink": SINK, "window": WINDOW})], dense_below=0)
    mask, kind = None, "causal"
    want = _eager(q, k, v, _streaming_keep(sq, sk).expand(b, hq, sq, sk), sinks, 0.25)
    if padding:
        pad = 5
        mask = torch.ones(b, 1, sq, sk, dtype=torch.bool).tril(sk - sq)
        mask[1, ..., :pad] = False
        kind = "causal+padding"
        row = _eager(q[1:, :, :], k[1:, :, pad:], v[1:, :, pad:], _streaming_keep(sq, sk - pad).expand(1, hq, sq, sk - pad),
                     sinks, 0.25)
        want = torch.cat([want[:1], row])
    got = PLANNED_OP(q, k, v, mask, 0.25, True, -1, 0.0, 0.0, "l0", kind, spec, sinks.reshape(1, -1, 1, 1))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- a hand-written module
class SinkAttention(torch.nn.Module):
    """gpt-oss's eager attention written independently: GQA by repeat_interleave, causal by masked_fill,
    learned sinks by a concatenated column, the row maximum subtracted, the column dropped; or
    (``form="lse"``, Granite-SWA's spelling) the output scaled by ``sigmoid(logsumexp(s) - sink)``. The
    values carry a constant factor (MiMo's ``v_scale``), which must stay on the output."""

    def __init__(self, d=32, h=4, hkv=2, keep=None, form="column"):
        super().__init__()
        self.h, self.hkv, self.dh, self.keep, self.form = h, hkv, d // h, keep, form
        self.q, self.o = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.k, self.v = torch.nn.Linear(d, hkv * self.dh), torch.nn.Linear(d, hkv * self.dh)
        self.sinks = torch.nn.Parameter(torch.randn(h) * 2)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(b, n, self.hkv, self.dh).transpose(1, 2).repeat_interleave(self.h // self.hkv, 1)
        v = self.v(x).view(b, n, self.hkv, self.dh).transpose(1, 2).repeat_interleave(self.h // self.hkv, 1) * 0.7
        s = q @ k.transpose(-1, -2) / self.dh ** 0.5
        keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril() if self.keep is None else self.keep(n)
        s = s.masked_fill(~keep, float("-inf"))
        if self.form == "lse":
            scale = torch.sigmoid(torch.logsumexp(s, dim=-1) - self.sinks.view(1, -1, 1))
            out = (torch.softmax(s, dim=-1) @ v) * scale.unsqueeze(-1)
            return self.o(out.transpose(1, 2).reshape(b, n, -1))
        c = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(b, -1, n, -1)], dim=-1)
        c = c - c.max(dim=-1, keepdim=True).values
        p = torch.softmax(c, dim=-1)[..., :-1]
        return self.o((p @ v).transpose(1, 2).reshape(b, n, -1))


def _model(form="column"):
    torch.manual_seed(0)
    model = SinkAttention(form=form).eval()
    streaming = copy.deepcopy(model)
    streaming.keep = lambda n: _streaming_keep(n, n)  # the hand-built reference of the streaming plan
    return model, streaming


FORMS = ["column", "lse"]


@pytest.mark.parametrize("form", FORMS)
def test_sinks_are_detected_as_one_site(form):
    model, _ = _model(form)
    x = torch.randn(2, 37, 32)
    cap = capture(model, (x,))
    det = canonicalize(cap.gm, cap.flat_inputs, cap.param_placeholders)
    assert len(det.sites) == 1 and det.sites[0].sinks and det.sites[0].is_causal


@pytest.mark.parametrize("form", FORMS)
def test_every_door_gives_eager_and_the_hand_built_reference(form):
    model, streaming = _model(form)
    x, fresh = torch.randn(2, 37, 32), torch.randn(2, 30, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = lcpass.optimize(copy.deepcopy(model), method="dense", example_inputs=(x,))
        opt = lcpass.optimize(copy.deepcopy(model), example_inputs=(x,), **STREAM)
        for inp in (x, fresh):
            torch.testing.assert_close(dense(inp), model(inp), rtol=0, atol=1e-5)
            torch.testing.assert_close(opt(inp), streaming(inp), rtol=0, atol=1e-5)
        assert (opt(x) - model(x)).abs().max() > 1e-2  # the method really applies
        compiled = torch.compile(copy.deepcopy(model), backend="lcpass", options=STREAM)
        torch.testing.assert_close(compiled(x), streaming(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_the_onnx_door_carries_sinks(tmp_path, form):
    import onnxruntime as ort

    from lcpass.export import export

    model, streaming = _model(form)
    x = torch.randn(2, 37, 32)
    for plan, oracle in (({"method": "dense"}, model), (STREAM, streaming)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export(copy.deepcopy(model), (x,), tmp_path / "m.onnx", **plan)
        sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
        name = sess.get_inputs()[0].name
        for n in (37, 20):
            xn = torch.randn(2, n, 32)
            got = torch.from_numpy(sess.run(None, {name: xn.numpy()})[0])
            with torch.no_grad():
                torch.testing.assert_close(got, oracle(xn), rtol=0, atol=1e-4)


def test_verify_checks_sink_sites():
    model, _ = _model()
    x = torch.randn(2, 37, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = lcpass.optimize(copy.deepcopy(model), example_inputs=(x,), verify=True, **STREAM)
    rep = opt.lcpass_report.verify
    assert list(rep) == ["attention"] and not rep.failed and rep["attention"] < 1e-5


# ----------------------------------------------------------------------------- what is not a sink
class NotASink(torch.nn.Module):
    """Columns concatenated to the scores that are not one sink logit per row dropped after the softmax: two
    columns, a column kept (a key with its own value), the first column dropped instead of the last."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.sinks = torch.nn.Parameter(torch.randn(2))

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2)
        b, h, n, _ = s.shape
        col = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, n, 1)
        if self.how == "two-columns":
            col = torch.cat([col, col], -1)
        p = torch.softmax(torch.cat([s, col], -1), -1)
        if self.how == "kept":
            return p @ torch.cat([v, v[:, :, :1]], 2)
        if self.how == "first-dropped":
            return p[..., 1:] @ v
        return p[..., :-col.shape[-1]] @ v


@pytest.mark.parametrize("how", ["two-columns", "kept", "first-dropped"])
def test_what_is_not_a_sink_is_left_alone(how):
    q = k = v = torch.randn(1, 2, 6, 4)
    model = NotASink(how)
    cap = capture(model, (q, k, v))
    det = canonicalize(cap.gm, cap.flat_inputs, cap.param_placeholders)
    assert not det.sites and det.rejected, det.rejected


# ----------------------------------------------------------------------------- transformers' gpt-oss
def test_gpt_oss_is_found_and_kept_exact_and_streams_like_its_own_code():
    """The tiny gpt-oss: two sites with sinks; dense keeps the logits; streaming equals the model's own
    eager attention with only the mask changed (the dispatch-mode oracle)."""
    _hf_sinks("gpt_oss")


def test_granite_swa_sinks_from_the_log_sum_exp():
    """Granite-SWA spells the same sink as out * sigmoid(logsumexp(s) - sink): same checks."""
    _hf_sinks("granite_swa")


def _hf_sinks(model_type):
    from lcpass.oracle import attention_calls, masked_forward
    from lcpass.zoo.auto import architectures, build

    arch = next(a for a in architectures() if a.model_type == model_type)
    tiny = build(arch, "eager")
    model, inputs = tiny.model.eval(), tiny.inputs
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0, 2.0)  # the init is zeros-like small; make the sinks matter
        want = model(**inputs).logits
        calls, _ = attention_calls(model, inputs)
        sk = calls[0].shape[-1]
        ref = masked_forward(model, inputs, {c.index: (lambda q_, k_, h_: _streaming_keep(q_, k_)[None])
                                             for c in calls})
    assert [c.shape[-1] for c in calls] == [sk] * len(calls) == [inputs["input_ids"].shape[1]] * 2
    found = lcpass.inspect(model, inputs)
    assert [s.sinks for s in found.sites] == [True, True], found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = lcpass.optimize(copy.deepcopy(model), method="dense")
        opt = lcpass.optimize(copy.deepcopy(model), **STREAM)
    assert [s.site for s in opt.lcpass_report.sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    with torch.no_grad():
        torch.testing.assert_close(dense(**inputs).logits, want, rtol=0, atol=1e-5)
        got = opt(**inputs).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert (got - want).abs().max() > 1e-3
