"""lcpass.optimize: same class, same outputs where the method covers everything, and exactly the
reference-masked model where it does not; plans, bad input, plain modules, SmolLM2."""
from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import lcpass
from lcpass.patterns.op import reference
from lcpass.plan import Plan
from lcpass.zoo import get_zoo_model

warnings.filterwarnings("ignore")

CAUSAL_LMS = ["llama-tiny", "llama-tiny-eager", "mistral-tiny", "qwen2-tiny", "qwen3-tiny", "phi3-tiny",
              "gemma2-tiny-eager", "gemma3-tiny", "gpt2-tiny", "gptneox-tiny"]
TOL = 1e-5


def _out(o):
    for attr in ("logits", "last_hidden_state"):
        if hasattr(o, attr):
            return getattr(o, attr)
    return o[0] if isinstance(o, (tuple, list)) else o


def _run(model, inputs):
    with torch.no_grad():
        return _out(model(**inputs))


# An independent oracle: the model's attention replaced by plain masked softmax with the StreamingLLM
# mask written out here (causal, and key < sink or within the window), on top of the layer's own
# sliding window and softcap.
SINK, WINDOW = 2, 5


def _streaming_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    sq, sk = query.shape[2], key.shape[2]
    q_pos = torch.arange(sk - sq, sk)[:, None]
    kv = torch.arange(sk)[None, :]
    keep = (kv <= q_pos) & ((kv < SINK) | (q_pos - kv < WINDOW))
    own = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if own:
        keep &= q_pos - kv < own
    out = reference(query, key, value, keep, scaling, False, -1, kwargs.get("softcap") or 0.0)
    return out.transpose(1, 2).contiguous(), None


def _reference_model(model, impl):
    AttentionInterface.register("test_streaming_ref", _streaming_reference)
    AttentionMaskInterface.register("test_streaming_ref", ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[impl])
    ref = copy.deepcopy(model)
    for mod in ref.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "test_streaming_ref"
    return ref


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_causal_lms(name):
    z = get_zoo_model(name)
    want = _run(z.model, z.example_inputs)
    cls = type(z.model)
    impl = z.model.config._attn_implementation
    ref_model = _reference_model(z.model, impl)

    dense = lcpass.optimize(copy.deepcopy(z.model), method="dense", example_inputs=z.example_inputs)
    assert type(dense) is cls and torch.equal(_run(dense, z.example_inputs), want)

    wide = lcpass.optimize(copy.deepcopy(z.model), method="streaming", sink=4, window=64, dense_below=0,
                           example_inputs=z.example_inputs)
    assert wide.lcpass_report.rewritten == z.n_attention
    assert (_run(wide, z.example_inputs) - want).abs().max().item() <= TOL

    small = lcpass.optimize(copy.deepcopy(z.model), method="streaming", sink=SINK, window=WINDOW, dense_below=0,
                            example_inputs=z.example_inputs)
    got = _run(small, z.example_inputs)
    assert (got - want).abs().max().item() > 1e-3  # the window really bites at 19 tokens
    assert (got - _run(ref_model, z.example_inputs)).abs().max().item() <= TOL
    assert type(small) is cls
    gen = small.generate(z.example_inputs["input_ids"][:1, :6], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 10)


def test_padded_batch_rows_match_unbatched():
    """Left padding: each row of a batch equals its own unpadded run (positions that are real tokens)."""
    z = get_zoo_model("llama-tiny")
    m = lcpass.optimize(z.model, method="streaming", sink=SINK, window=WINDOW, dense_below=0,
                        example_inputs=z.example_inputs)
    ids = z.example_inputs["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    batched = _run(m, {"input_ids": ids, "attention_mask": mask})
    for row, start in ((0, 0), (1, 5)):
        solo = _run(m, {"input_ids": ids[row:row + 1, start:]})
        assert (batched[row, start:] - solo[0]).abs().max().item() <= 1e-4


def test_save_pretrained_and_plan_file(tmp_path):
    z = get_zoo_model("qwen2-tiny")
    m = lcpass.optimize(z.model, method="streaming", sink=4, window=8, example_inputs=z.example_inputs)
    m.save_pretrained(tmp_path / "saved")
    reloaded = type(z.model).from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded.lm_head.weight, m.lm_head.weight)

    found = lcpass.detect(get_zoo_model("qwen2-tiny").model, z.example_inputs)[0][1]
    plan = Plan.uniform(found.sites, "streaming", sink=SINK, window=WINDOW)
    plan.save(tmp_path / "plan.json")
    a = lcpass.optimize(get_zoo_model("qwen2-tiny").model, plan=str(tmp_path / "plan.json"), dense_below=0,
                        example_inputs=z.example_inputs)
    b = lcpass.optimize(get_zoo_model("qwen2-tiny").model, method="streaming", sink=SINK, window=WINDOW,
                        dense_below=0, example_inputs=z.example_inputs)
    assert torch.equal(_run(a, z.example_inputs), _run(b, z.example_inputs))
    assert a.lcpass_plan == plan and b.lcpass_plan.sites == plan.sites  # the plan each model runs
    other = get_zoo_model("gemma3-tiny")
    with pytest.raises(ValueError, match="plan was made for"):
        lcpass.optimize(other.model, plan=str(tmp_path / "plan.json"), example_inputs=other.example_inputs)


@pytest.mark.parametrize("name", ["nanogpt", "mha", "transformer-encoder", "einsum-attn", "baddbmm-attn"])
def test_plain_modules_keep_their_forward(name):
    z = get_zoo_model(name)
    want = _run(z.model, z.example_inputs)
    m = lcpass.optimize(copy.deepcopy(z.model), method="dense", example_inputs=z.example_inputs)
    assert isinstance(m, lcpass.OptimizedModule)
    assert inspect.signature(m.forward).parameters.keys() == inspect.signature(z.model.forward).parameters.keys() \
        or m._signature == inspect.signature(z.model.forward)
    assert (_run(m, z.example_inputs) - want).abs().max().item() <= TOL
    if z.expected[0]["mask"] == "causal":
        s = lcpass.optimize(copy.deepcopy(z.model), method="streaming", sink=4, window=64, dense_below=0,
                            example_inputs=z.example_inputs)
        assert s.lcpass_report.rewritten == z.n_attention
        assert list(s.lcpass_plan.sites) == [r.site for r in s.lcpass_report.sites]
        assert (_run(s, z.example_inputs) - want).abs().max().item() <= TOL


def test_bad_input():
    z = get_zoo_model("llama-tiny")
    with pytest.raises(ValueError, match="unknown attention method 'nope'.*streaming"):
        lcpass.optimize(z.model, method="nope", example_inputs=z.example_inputs)
    with pytest.raises(ValueError, match="window"):
        lcpass.optimize(z.model, method="streaming", window=-3, example_inputs=z.example_inputs)
    with pytest.raises(ValueError, match="exactly one of"):
        lcpass.optimize(z.model, example_inputs=z.example_inputs)
    with pytest.raises(ValueError, match="backend"):
        lcpass.optimize(z.model, method="dense", backend="tpu", example_inputs=z.example_inputs)
    neg = get_zoo_model("classifier-head")
    with pytest.warns(UserWarning, match="no attention found"):
        same = lcpass.optimize(neg.model, method="streaming", example_inputs=neg.example_inputs)
    assert same is neg.model


def test_report_counts_work_and_kv():
    z = get_zoo_model("llama-tiny")
    m = lcpass.optimize(z.model, method="streaming", sink=64, window=1024, example_inputs=z.example_inputs,
                        report_len=8192)
    rep = m.lcpass_report
    assert rep.rewritten == 2
    # sinks + 1024-window over 8192 causal tokens: roughly 2 * 1088 / 8192 of the causal tiles
    assert 0.15 < rep.attention_flops_ratio < 0.35
    assert rep.kv_bytes_ratio == pytest.approx((64 + 1024) / 8192, rel=0.05)


@pytest.mark.slow
def test_smollm2_streaming():
    from lcpass.zoo.pretrained import load_smollm2

    model, tok = load_smollm2()
    text = open("/usr/share/common-licenses/GPL-3").read()[:3000]
    ids = tok(text, return_tensors="pt")["input_ids"][:, :160]
    want = _run(model, {"input_ids": ids})
    ref_model = _reference_model(model, "sdpa")
    wide = lcpass.optimize(copy.deepcopy(model), method="streaming", sink=4, window=256, dense_below=0,
                           example_inputs={"input_ids": ids[:, :32]})
    assert isinstance(wide, type(model)) and wide.lcpass_report.rewritten == 30
    assert (_run(wide, {"input_ids": ids}) - want).abs().max().item() <= 1e-4
    small = lcpass.optimize(copy.deepcopy(model), method="streaming", sink=SINK, window=WINDOW, dense_below=0,
                            example_inputs={"input_ids": ids[:, :32]})
    assert (_run(small, {"input_ids": ids}) - _run(ref_model, {"input_ids": ids})).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method,params", [
    ("quest", {"token_budget": 64, "page_size": 16}),
    ("tokenselect", {"k": 64, "block_size": 16}),
    ("hip", {"k": 64, "block_size_q": 16, "block_size_k": 16}),
])
def test_dynamic_methods_through_optimize(method, params):
    """Budgets covering all 19 tokens: the content-selected model equals the dense one; a small budget
    really changes the output and stays finite."""
    z = get_zoo_model("llama-tiny")
    want = _run(z.model, z.example_inputs)
    m = lcpass.optimize(copy.deepcopy(z.model), method=method, dense_below=0, example_inputs=z.example_inputs,
                        **params)
    assert m.lcpass_report.rewritten == 2
    assert (_run(m, z.example_inputs) - want).abs().max().item() <= TOL
    small = {key: (4 if key in ("token_budget", "k") else value) for key, value in params.items()}
    if method == "quest":
        small = {"token_budget": 16, "page_size": 16, "sink_pages": 0}
    if method == "hip":
        small = {"k": 4, "block_size_q": 16, "block_size_k": 2, "sink": 1}
    m = lcpass.optimize(copy.deepcopy(z.model), method=method, dense_below=0, example_inputs=z.example_inputs,
                        **small)
    got = _run(m, z.example_inputs)
    assert torch.isfinite(got).all() and (got - want).abs().max().item() > 1e-4


def test_triton_backend_generated_kernels():
    """backend='triton' runs the generated kernels (under TRITON_INTERPRET here) and matches the CPU engine."""
    z = get_zoo_model("llama-tiny")
    cpu = lcpass.optimize(copy.deepcopy(z.model), method="streaming", sink=SINK, window=WINDOW, dense_below=0,
                          backend="cpu", example_inputs=z.example_inputs)
    tri = lcpass.optimize(copy.deepcopy(z.model), method="streaming", sink=SINK, window=WINDOW, dense_below=0,
                          backend="triton", example_inputs=z.example_inputs)
    calls = []
    import lcpass.codegen as cg

    real = cg.attention_or_fallback

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    cg.attention_or_fallback = spy
    try:
        got = _run(tri, z.example_inputs)
    finally:
        cg.attention_or_fallback = real
    assert len(calls) == z.n_attention
    assert (got - _run(cpu, z.example_inputs)).abs().max().item() <= 1e-4


def test_verify_reports_every_rewritten_site():
    z = get_zoo_model("mistral-tiny")
    m = lcpass.optimize(z.model, method="streaming", sink=SINK, window=WINDOW, dense_below=0, verify=True,
                        example_inputs=z.example_inputs)
    errors = m.lcpass_report.verify
    assert set(errors) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert all(0 <= e <= 1e-5 for e in errors.values()) and not errors.failed


def test_plain_module_runs_at_other_lengths():
    """A lowered plain module was captured with a symbolic sequence length: other lengths run too."""
    z = get_zoo_model("einsum-attn")
    m = lcpass.optimize(copy.deepcopy(z.model), method="streaming", sink=4, window=64, dense_below=0,
                        example_inputs=z.example_inputs)
    (name, x), = z.example_inputs.items()
    for n in (7, 25):
        inputs = {name: x[:, :n] if n <= x.shape[1] else torch.cat([x, x], 1)[:, :n]}
        assert (_run(m, inputs) - _run(z.model, inputs)).abs().max().item() <= TOL


class _ChannelsFirst(torch.nn.Module):
    """SqueezeBERT's layout: the sequence is the last axis of a [B, C, S] input (1x1 convs)."""

    def __init__(self, fixed: int = 0):
        super().__init__()
        self.qkv = torch.nn.Conv1d(16, 48, 1)
        self.fixed = fixed  # > 0: a hard-coded length, so torch.export cannot make the sequence symbolic

    def forward(self, x):
        b, _, n = x.shape
        q, k, v = self.qkv(x).view(b, 3, 2, 8, self.fixed or n).permute(1, 0, 2, 4, 3)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.permute(0, 1, 3, 2).reshape(b, 16, self.fixed or n)


def test_plain_module_with_the_sequence_on_a_later_axis_runs_at_other_lengths():
    torch.manual_seed(0)
    model = _ChannelsFirst().eval()
    m = lcpass.optimize(model, method="dense", example_inputs=(torch.randn(2, 16, 10),))
    for n in (7, 23):
        x = torch.randn(2, 16, n)
        with torch.no_grad():
            assert (m(x) - model(x)).abs().max().item() <= TOL
    fixed = _ChannelsFirst(fixed=10).eval()
    s = lcpass.optimize(fixed, method="dense", example_inputs=(torch.randn(2, 16, 10),))
    with pytest.raises(ValueError, match="input 'x' has size 12 at dim 2, where the captured graph is specialised "
                                         "to the example's 10 .* optimize again with example inputs"):
        s(torch.randn(2, 16, 12))
    # a batch of 1 is always specialised by torch.export: the error names the batch dim, not a guard
    one = lcpass.optimize(model, method="dense", example_inputs=(torch.randn(1, 16, 10),))
    with pytest.raises(ValueError, match="input 'x' has size 3 at dim 0, .* example's 1"):
        one(torch.randn(3, 16, 10))


class _SdpaLayer(torch.nn.Module):
    """GPT-2 / ViT-style code: transposed q/k/v views into SDPA, dropout written out as in training code."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        p = 0.1 if self.training else 0.0
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return out.transpose(1, 2).reshape(b, n, 16)


def test_the_lowered_graph_runs_only_the_planned_attention():
    """The attention a site replaced is gone from the lowered graph (torch marks SDPA random, so a plain
    dead-code pass keeps it and every call would pay dense attention next to the method); the compile
    door lowers the same way, and eval-mode dropout spelled F.dropout(..., training=False) is no dropout."""
    x = torch.randn(2, 40, 16)
    model = _SdpaLayer().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = lcpass.optimize(model, method="streaming", sink=1, window=8, dense_below=0, example_inputs=(x,))
    targets = [str(n.target) for n in opt.graph_module.graph.nodes if n.op == "call_function"]
    assert "lcpass.planned_attention.default" in targets
    assert not [t for t in targets if "scaled_dot_product" in t or "dropout" in t], targets

    class Eval(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
            s = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
            p = torch.nn.functional.dropout(torch.softmax(s, -1), 0.3, training=self.training)
            return (p @ v).transpose(1, 2).reshape(b, n, 16)

    ev = Eval().eval()
    compiled = torch.compile(ev, backend="lcpass", options={"method": "dense", "inner": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ev(x), rtol=0, atol=1e-5)


def test_two_optimized_models_never_share_dynamic_state():
    """Squeezed Attention keeps its key-cluster index in the site's state (built on the first call). Two models
    with the same layer names but other weights: each, optimized and run next to the other, gives what it
    gives alone in a fresh process state (each optimize call seeds its own state namespace)."""
    from lcpass import lower

    z = get_zoo_model("llama-tiny")
    other = copy.deepcopy(z.model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.std().clamp(min=0.02))
    kw = dict(method="squeezed", n_clusters=4, n_coarse=2, budget=0.3, block_size=4, dense_below=0,
              example_inputs=z.example_inputs)

    def alone(model):
        saved = dict(lower._STATES)
        lower._STATES.clear()
        try:
            return _run(lcpass.optimize(copy.deepcopy(model), **kw), z.example_inputs)
        finally:
            lower._STATES.clear()
            lower._STATES.update(saved)

    want_a, want_b = alone(z.model), alone(other)
    a = lcpass.optimize(copy.deepcopy(z.model), **kw)
    b = lcpass.optimize(copy.deepcopy(other), **kw)  # its probe forward runs B's layers in this process
    torch.testing.assert_close(_run(a, z.example_inputs), want_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(_run(b, z.example_inputs), want_b, rtol=0, atol=1e-6)
