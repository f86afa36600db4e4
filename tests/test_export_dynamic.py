"""ONNX export of the block top-k dynamic methods (Quest, Landmark, training-free SeerAttention gate): the
selection in standard ops feeding ONNX ``Attention`` as a bool mask, matching the CPU engine within 1e-4
(the function body alone on awkward shapes; llama-tiny and SmolLM2 end to end, at a length that is a
multiple of the block and one that is not, on both sides of the crossover), and the refusals."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import lcpass
from lcpass.export import export
from lcpass.lower import planned_attention_impl, spec_json
from lcpass.onnx import DOMAIN, OPSET, AttentionFunction, ONNXExportError, function_proto
from lcpass.onnx.dynamic import onnx_methods
from lcpass.plan import HeadSpec, Plan, SitePlan
from lcpass.zoo import get_zoo_model

warnings.filterwarnings("ignore")
TOL = 1e-4
SELECTION_OPS = {"ai.onnx.TopK", "ai.onnx.ReduceMax", "ai.onnx.MatMul", "ai.onnx.Gather", "ai.onnx.Attention"}


def _function_session(fn: AttentionFunction, batch: int) -> ort.InferenceSession:
    """A one-node model calling the lcpass function of ``fn`` with symbolic sequence lengths."""
    node = helper.make_node(fn.name, ["q", "k", "v"], ["y"], domain=DOMAIN)
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, h, s, fn.head_dim])
           for n, h, s in (("q", fn.n_heads, "sq"), ("k", fn.n_kv_heads, "sk"), ("v", fn.n_kv_heads, "sk"))]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, fn.n_heads, "sq", fn.head_dim])
    graph = helper.make_graph([node], "g", ins, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                              functions=[function_proto(fn)])
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString())


CASES = [
    ("quest", {"page_size": 16, "token_budget": 32, "sink_pages": 0}, 4, 2),
    ("quest", {"page_size": 16, "token_budget": 80, "sink_pages": 1, "local_pages": 2, "share_kv_heads": False}, 4, 2),
    ("quest", {"page_size": 16, "token_budget": 48, "sink_pages": 1}, 6, 1),  # MQA
    ("landmark", {"block_size": 16, "topk": 2, "sink_blocks": 0}, 4, 2),
    ("landmark", {"block_size": 32, "topk": 2, "sink_blocks": 0, "share_kv_heads": False}, 2, 2),
    ("seer", {"block_size": 16, "topk": 3, "sink_blocks": 1}, 4, 2),
    ("seer", {"block_size": 16, "threshold": 0.2, "sink_blocks": 0, "share_kv_heads": False}, 4, 2),
]


@pytest.mark.parametrize("method,params,hq,hkv", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_function_body_matches_the_engine(method, params, hq, hkv):
    """The lcpass function alone vs planned_attention on random q/k/v (distinct scores): lengths a multiple
    of the block and not, fewer queries than keys, batch 2, GQA/MQA, shared and per-head selection."""
    d, batch = 16, 2
    spec = spec_json([HeadSpec(method, params)] * hq, 0)
    dense = spec_json([HeadSpec("dense", {})] * hq)
    fn = AttentionFunction(True, hq, hkv, d, d ** -0.5, True, -1, 0.0, "none", "causal", spec, True)
    sess = _function_session(fn, batch)
    gen = torch.Generator().manual_seed(0)
    bites = 0.0
    for sq, sk in ((96, 96), (83, 83), (70, 83)):
        q = torch.randn(batch, hq, sq, d, generator=gen)
        k, v = (torch.randn(batch, hkv, sk, d, generator=gen) for _ in range(2))
        args = (None, d ** -0.5, True, -1, 0.0, 0.0, "site", "causal")
        want = planned_attention_impl(q, k, v, *args, spec)
        got = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
        assert np.abs(got - want.numpy()).max() <= TOL, (sq, sk, np.abs(got - want.numpy()).max())
        bites = max(bites, float((want - planned_attention_impl(q, k, v, *args, dense)).abs().max()))
    assert bites > 1e-2  # the selection really drops blocks at these lengths


def test_function_body_runs_dense_below_the_crossover():
    d, spec = 16, spec_json([HeadSpec("quest", {"page_size": 16, "token_budget": 32, "sink_pages": 0})] * 4, 60)
    sess = _function_session(AttentionFunction(True, 4, 2, d, 0.25, True, -1, 0.0, "none", "causal", spec, True), 1)
    gen = torch.Generator().manual_seed(1)
    for n, selects in ((64, True), (57, False)):
        q, k, v = torch.randn(1, 4, n, d, generator=gen), *(torch.randn(1, 2, n, d, generator=gen) for _ in range(2))
        got = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
        causal = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                                  v.repeat_interleave(2, 1), is_causal=True, scale=0.25)
        assert (np.abs(got - causal.numpy()).max() > 1e-2) == selects, n


def _ops(model: onnx.ModelProto) -> set[str]:
    called = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    return {f"{n.domain or 'ai.onnx'}.{n.op_type}" for f in model.functions if f.name in called for n in f.node}


def _export_and_compare(model, ids, path, plan_kw, lengths):
    """Export with a dynamic sequence axis, run onnxruntime at each length, compare with lcpass.optimize."""
    res = export(copy.deepcopy(model), {"input_ids": ids}, path, **plan_kw)
    ref = lcpass.optimize(copy.deepcopy(model), example_inputs={"input_ids": ids}, **plan_kw)
    sess = ort.InferenceSession(str(path))
    errs, bite = [], []
    for n in lengths:
        with torch.no_grad():
            want = ref(input_ids=ids[:, :n]).logits.numpy()
            dense = model(input_ids=ids[:, :n]).logits.numpy()
        got = sess.run(None, {"input_ids": ids[:, :n].numpy()})[0]
        assert got.shape == want.shape
        errs.append(float(np.abs(got - want).max()))
        bite.append(float(np.abs(want - dense).max()))
    assert max(errs) <= TOL, (lengths, errs)
    assert SELECTION_OPS <= _ops(res.program)
    return errs, bite


@pytest.mark.parametrize("method,params", [
    ("quest", {"page_size": 16, "token_budget": 32, "sink_pages": 0}),
    ("landmark", {"block_size": 16, "topk": 2, "sink_blocks": 0}),
])
def test_llama_tiny_dynamic(tmp_path, method, params):
    """Random-init llama-tiny (GQA 4:2, 64 positions): 64 tokens (4 blocks) and 57 (not a multiple)."""
    z = get_zoo_model("llama-tiny")
    ids = torch.randint(3, z.model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    _, bite = _export_and_compare(z.model, ids, tmp_path / "m.onnx",
                                  {"method": method, "dense_below": 0, **params}, (64, 57))
    assert min(bite) > 1e-3  # the selection changes the logits at both lengths


def test_llama_tiny_quest_both_sides_of_the_crossover(tmp_path):
    """dense_below=48: 64 tokens select, 41 run exactly causal (the graph switches on the length)."""
    z = get_zoo_model("llama-tiny")
    ids = torch.randint(3, z.model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    kw = {"method": "quest", "page_size": 16, "token_budget": 32, "sink_pages": 0}
    _, bite = _export_and_compare(z.model, ids, tmp_path / "m.onnx", {**kw, "dense_below": 48}, (64, 41))
    assert bite[0] > 1e-3 and bite[1] == 0.0
    # and at 41 tokens the selection would have bitten: the switch is what keeps it exact
    sel = lcpass.optimize(copy.deepcopy(z.model), example_inputs={"input_ids": ids}, dense_below=0, **kw)
    with torch.no_grad():
        assert (sel(input_ids=ids[:, :41]).logits - z.model(input_ids=ids[:, :41]).logits).abs().max() > 1e-3


@pytest.mark.slow
def test_smollm2_quest_and_seer(tmp_path):
    """The real model (9 q / 3 kv heads, 30 layers): Quest on layers 0-14, the training-free SeerAttention
    gate on 15-29, at 96 tokens (6 blocks) and 83; sink and local blocks forced, budget above them."""
    from lcpass.zoo.pretrained import load_smollm2

    model, tok = load_smollm2()
    ids = tok("The quick brown fox jumps over the lazy dog; a long story begins here. " * 12,
              return_tensors="pt")["input_ids"][:, :96]
    assert ids.shape[1] == 96
    names = [s.name for s in lcpass.detect(model, {"input_ids": ids})[0][1].sites]
    plan = Plan({**{n: SitePlan.same("quest", page_size=16, token_budget=48, sink_pages=1) for n in names[:15]},
                 **{n: SitePlan.same("seer", block_size=16, topk=3, sink_blocks=1) for n in names[15:]}})
    _, bite = _export_and_compare(model, ids, tmp_path / "smol.onnx", {"plan": plan, "dense_below": 0}, (96, 83))
    assert min(bite) > 1e-3


def test_unsupported_dynamic_methods_are_refused_by_name(tmp_path):
    spec = spec_json([HeadSpec("tokenselect", {})], 0)
    fn = AttentionFunction(True, 4, 2, 16, 0.25, True, -1, 0.0, "none", "causal", spec, True)
    with pytest.raises(ONNXExportError, match=r"\['tokenselect'\] have no ONNX lowering.*'quest'.*format='torch'"):
        function_proto(fn)
    mixed = spec_json([HeadSpec("quest", {}), HeadSpec("dense", {})] * 2, 0)
    with pytest.raises(ONNXExportError, match="mix methods"):
        function_proto(AttentionFunction(True, 4, 2, 16, 0.25, True, -1, 0.0, "none", "causal", mixed, True))
    z = get_zoo_model("llama-tiny")
    with pytest.raises(ValueError, match=r"site model\.layers\.0\.self_attn: dynamic .*\['hip'\].*quest"):
        export(z.model, z.example_inputs, tmp_path / "m.onnx", method="hip", dense_below=0)
    padded = get_zoo_model("llama-tiny-padded")
    with pytest.raises(ValueError, match="padding mask"):
        export(padded.model, padded.example_inputs, tmp_path / "p.onnx", method="quest", dense_below=0)
    assert onnx_methods() == ("quest", "seer", "landmark")  # read from the records, in table order


def test_seer_with_a_learned_gate_is_refused(tmp_path):
    """The graph computes the training-free gate; a learned one in the site's state must not export silently."""
    from lcpass.lower import site_state
    from lcpass.methods.dynamic import SeerGate

    z = get_zoo_model("llama-tiny")
    site = lcpass.detect(z.model, z.example_inputs)[0][1].sites[0].name
    state = site_state(site)
    state["gate"] = SeerGate(torch.randn(4, 16, 8), torch.randn(2, 48, 8))
    try:
        with pytest.raises(ValueError, match=rf"site {site}: seer with a learned gate"):
            export(z.model, z.example_inputs, tmp_path / "g.onnx", method="seer", block_size=16, dense_below=0)
    finally:
        state.pop("gate")
