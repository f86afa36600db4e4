"""torch.compile(backend="lcpass"): the entry point, same outputs as lcpass.optimize, no graph breaks beyond
Inductor's, generate() with a compiled forward, and Inductor's attention mis-fusion kept away."""
from __future__ import annotations

import copy
import warnings
from importlib.metadata import entry_points

import pytest
import torch
from torch._dynamo.utils import counters

import lcpass
from lcpass.backend import GraphRecord, backend_options, lcpass_backend, model_site_name
from lcpass.plan import Plan
from lcpass.zoo import get_zoo_model
from lcpass.zoo.modules import AxisSoftmax

warnings.filterwarnings("ignore")

CAUSAL_LMS = ["llama-tiny", "llama-tiny-eager", "mistral-tiny", "qwen2-tiny", "qwen3-tiny", "phi3-tiny",
              "gemma2-tiny-eager", "gemma3-tiny", "gpt2-tiny", "gptneox-tiny"]
STREAM = dict(method="streaming", sink=2, window=5, dense_below=0)  # the window bites at 19 tokens
TOL = 1e-5


def _out(o):
    for attr in ("logits", "last_hidden_state"):
        if hasattr(o, attr):
            return getattr(o, attr)
    return o


def _run(model, inputs):
    with torch.no_grad():
        return _out(model(**inputs))


def _compiled(model, options, **kw):
    torch._dynamo.reset()
    return torch.compile(model, backend="lcpass", options=options, **kw)


def test_entry_point_resolves_by_name():
    eps = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "lcpass"]
    assert eps and eps[0].value == "lcpass.backend:lcpass_backend"
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("lcpass") is lcpass_backend


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_causal_lms_match_optimize_in_one_graph(name):
    """fullgraph=True: dynamo hands one graph, so the backend adds no graph break; every site rewritten."""
    z = get_zoo_model(name)
    opt = lcpass.optimize(copy.deepcopy(z.model), example_inputs=z.example_inputs, **STREAM)
    want = _run(opt, z.example_inputs)
    assert (want - _run(z.model, z.example_inputs)).abs().max().item() > 1e-3  # the method changes outputs
    rec: list[GraphRecord] = []
    c = _compiled(copy.deepcopy(z.model), dict(STREAM, inner="eager", record=rec), fullgraph=True)
    got = _run(c, z.example_inputs)
    assert (got - want).abs().max().item() <= TOL
    assert len(rec) == 1 and rec[0].rewritten == z.n_attention
    assert all(v == "sparse" for v in rec[0].lowering.values())
    assert not any(s.startswith("L.") for s in rec[0].sites)


def test_bert_matches_optimize_and_refuses_causal_methods():
    z = get_zoo_model("bert-tiny")
    want = _run(lcpass.optimize(copy.deepcopy(z.model), method="dense", example_inputs=z.example_inputs),
                z.example_inputs)
    rec: list[GraphRecord] = []
    got = _run(_compiled(copy.deepcopy(z.model), {"method": "dense", "inner": "eager", "record": rec},
                         fullgraph=True), z.example_inputs)
    assert torch.equal(got, want)
    assert len(rec[0].sites) == z.n_attention and rec[0].rewritten == 0
    with pytest.raises(Exception, match="bidirectional"):
        _run(_compiled(copy.deepcopy(z.model), dict(STREAM, inner="eager")), z.example_inputs)


def test_inductor_inner_same_graph_count_as_inductor():
    """With Inductor inside: same outputs as optimize, and exactly the graphs plain Inductor gets."""
    z = get_zoo_model("llama-tiny")
    want = _run(lcpass.optimize(copy.deepcopy(z.model), example_inputs=z.example_inputs, **STREAM),
                z.example_inputs)
    stats = {}
    for backend, options in (("lcpass", dict(STREAM)), ("inductor", None)):
        torch._dynamo.reset()
        counters.clear()
        got = _run(torch.compile(copy.deepcopy(z.model), backend=backend, options=options), z.example_inputs)
        stats[backend] = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
        if backend == "lcpass":
            assert (got - want).abs().max().item() <= TOL
    assert stats["lcpass"] == stats["inductor"] == (1, 0)


def test_generate_with_compiled_forward():
    z = get_zoo_model("llama-tiny")
    ids = z.example_inputs["input_ids"][:1, :6]
    opt = lcpass.optimize(copy.deepcopy(z.model), example_inputs=z.example_inputs, **STREAM)
    want = opt.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    m = copy.deepcopy(z.model)
    rec: list[GraphRecord] = []
    torch._dynamo.reset()
    counters.clear()
    m.forward = torch.compile(m.forward, backend="lcpass", options=dict(STREAM, inner="eager", record=rec))
    got = m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    assert not counters["graph_break"]
    assert len(rec) == 3  # prefill, first decode, decode with a symbolic KV length (FACTS.md)
    assert all(r.rewritten == z.n_attention for r in rec)


def test_head_axis_softmax_not_misfused():
    """softmax over the head axis of q·kᵀ, then @ v: Inductor's sfdp patterns turn it into SDPA (wrong);
    lcpass rejects it as attention and keeps those patterns off, so the result equals eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(AxisSoftmax(dim=1), AxisSoftmax(dim=1)).eval()
    x = torch.randn(2, 19, 64)
    with torch.no_grad():
        want = model(x)
        rec: list[GraphRecord] = []
        got = _compiled(model, {"method": "streaming", "record": rec})(x)
        torch._dynamo.reset()
        misfused = torch.compile(model, backend="inductor")(x)
    assert rec[0].sites == [] and any("not the key axis" in r for r in rec[0].rejected)
    assert (got - want).abs().max().item() <= 1e-5
    assert (misfused - want).abs().max().item() > 0.1  # the case the switch exists for


def test_plan_option_and_site_names(tmp_path):
    z = get_zoo_model("mistral-tiny")
    sites = lcpass.detect(z.model, z.example_inputs)[0][1].sites
    plan = Plan.uniform(sites, "streaming", sink=2, window=5).dense_layers(first=1)
    plan.save(tmp_path / "plan.json")
    want = _run(lcpass.optimize(copy.deepcopy(z.model), plan=plan, dense_below=0,
                                example_inputs=z.example_inputs), z.example_inputs)
    rec: list[GraphRecord] = []
    got = _run(_compiled(copy.deepcopy(z.model), {"plan": str(tmp_path / "plan.json"), "inner": "eager",
                                                  "dense_below": 0, "record": rec}), z.example_inputs)
    assert (got - want).abs().max().item() <= TOL
    assert rec[0].lowering == {"model.layers.0.self_attn": "dense", "model.layers.1.self_attn": "sparse"}


def test_bad_options():
    with pytest.raises(ValueError, match="unknown attention method 'nope'.*streaming"):
        backend_options({"method": "nope"})
    with pytest.raises(ValueError, match="exactly one of"):
        backend_options({})
    with pytest.raises(ValueError, match="inner='tvm'"):
        backend_options({"method": "dense", "inner": "tvm"})
    with pytest.raises(ValueError, match="window"):
        backend_options({"method": "streaming", "window": -1})
    # method parameters with a plan: the one check of Plan.request, naming the backend's own options
    with pytest.raises(ValueError, match=r"parameters \['dense_blow'\] go with options=\{'method'.*own options are "
                                         r"method, plan, inner, dense_below"):
        backend_options({"plan": Plan({}), "dense_blow": 4})
    assert model_site_name("L.args.0.model.layers.3.self_attn") == "model.layers.3.self_attn"


class _Causal(torch.nn.Module):
    """Causal attention with an optional extra keep-mask (the hand-built reference of a sparse plan)."""

    def __init__(self, keep=None):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.keep = keep

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        keep = torch.ones(n, n, dtype=torch.bool).tril() if self.keep is None else self.keep(n)
        s = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~keep, float("-inf"))
        return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, n, 16)


def test_the_compile_door_works_outside_no_grad_and_its_gradient_is_the_methods():
    """Parameters require grad, so AOTAutograd traces a backward even for inference: the planned op has one
    (the derivative of the method written densely). Output and input gradient equal those of the model with
    the streaming keep-mask written out, through autograd."""
    torch.manual_seed(0)
    model = _Causal()

    def streaming(n, sink=STREAM["sink"], window=STREAM["window"]):
        i = torch.arange(n)
        return (i[None, :] <= i[:, None]) & ((i[None, :] < sink) | (i[:, None] - i[None, :] < window))

    ref = copy.deepcopy(model)
    ref.keep = streaming
    compiled = torch.compile(copy.deepcopy(model), backend="lcpass", options=STREAM)
    x = torch.randn(2, 19, 16, requires_grad=True)
    out = compiled(x)
    out.square().sum().backward()
    got = x.grad.clone()
    x.grad = None
    want = ref(x)
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, x.grad, rtol=0, atol=1e-5)
