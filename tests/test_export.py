"""lcpass.export: ONNX models onnxruntime runs at two sequence lengths and that match PyTorch (dense,
streaming, DuoAttention; llama-tiny, bert-tiny, SmolLM2), the lcpass functions / contrib op present, the
torch.export format round-tripping through save/load in a fresh process, and bad input."""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lcpass
from lcpass.export import export
from lcpass.onnx import DOMAIN, MS_DOMAIN, AttentionFunction, function_proto, pure_sliding_window
from lcpass.lower import spec_json
from lcpass.plan import HeadSpec, Plan, SitePlan
from lcpass.zoo import get_zoo_model

warnings.filterwarnings("ignore")
TOL = 1e-4


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _torch_out(model, inputs):
    with torch.no_grad():
        return _out(model(**inputs)).numpy()


def _lcpass_functions(path) -> tuple[set[str], set[str]]:
    """(lcpass functions the graph calls, op types inside their bodies as domain.op)."""
    m = onnx.load(str(path))
    called = {n.op_type for n in m.graph.node if n.domain == DOMAIN}
    inner = {f"{n.domain or 'ai.onnx'}.{n.op_type}" for f in m.functions if f.name in called for n in f.node}
    assert {f.name for f in m.functions if f.domain == DOMAIN} >= called  # bodies attached after export
    return called, inner


def _check_onnx(model, plan_kw, inputs, path, lengths, n_functions):
    """Export, then compare onnxruntime with lcpass.optimize (same plan) at each sequence length."""
    res = export(copy.deepcopy(model), inputs, path, **plan_kw)
    ref = lcpass.optimize(copy.deepcopy(model), example_inputs=inputs, **plan_kw)
    sess = ort.InferenceSession(str(path))
    names = [i.name for i in sess.get_inputs()]
    assert names == res.input_names
    for n in lengths:
        cut = {k: v[:, :n] for k, v in inputs.items()}
        got = sess.run(None, {k: v.numpy() for k, v in cut.items() if k in names})[0]
        want = _torch_out(ref, cut)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOL, (n, np.abs(got - want).max())
    called, inner = _lcpass_functions(path)
    assert len(called) == n_functions
    return res, called, inner, ref


def test_llama_dense(tmp_path):
    z = get_zoo_model("llama-tiny")
    res, called, inner, _ = _check_onnx(z.model, {"method": "dense"}, z.example_inputs, tmp_path / "m.onnx",
                                        (19, 11), 1)
    assert set(res.lowering.values()) == {"dense"}
    assert "ai.onnx.Attention" in inner


def test_llama_streaming_and_duo_sites_both_sides_of_the_crossover(tmp_path):
    """Layer 0 streaming (sinks + window), layer 1 DuoAttention per KV head; dense below 15 keys, so the
    19-token run uses the methods' masks and the 11-token run the exact path, in one model."""
    z = get_zoo_model("llama-tiny")
    sites = lcpass.detect(z.model, z.example_inputs)[0][1].sites
    duo = Plan.duo(sites, {sites[1].name: [0]}, sink=2, recent=5, by_kv_head=True)
    plan = Plan({sites[0].name: SitePlan.same("streaming", sink=2, window=5), sites[1].name: duo.sites[sites[1].name]})
    _, called, inner, ref = _check_onnx(z.model, {"plan": plan, "dense_below": 15}, z.example_inputs,
                                        tmp_path / "m.onnx", (19, 11), 2)
    assert {"ai.onnx.Attention", "ai.onnx.Range", "ai.onnx.LessOrEqual"} <= inner  # mask built from positions
    # the methods really bite at 19 tokens: the export differs from the dense model there
    assert np.abs(_torch_out(ref, z.example_inputs) - _torch_out(z.model, z.example_inputs)).max() > 1e-3


def test_bert_dense_with_padding(tmp_path):
    z = get_zoo_model("bert-tiny")
    _, _, inner, _ = _check_onnx(z.model, {"method": "dense"}, z.example_inputs, tmp_path / "b.onnx", (19, 12), 1)
    assert "ai.onnx.Attention" in inner


def test_left_padded_rows_run_alone(tmp_path):
    z = get_zoo_model("llama-tiny-padded")
    _check_onnx(z.model, {"method": "streaming", "sink": 2, "window": 5, "dense_below": 0}, z.example_inputs,
                tmp_path / "p.onnx", (19, 12), 1)


def test_sliding_window_uses_group_query_attention(tmp_path):
    """A pure sliding window (Mistral's own window, dense plan) lowers to com.microsoft.GroupQueryAttention;
    parity with PyTorch pins local_window_size's meaning (W keys including the current one)."""
    z = get_zoo_model("mistral-tiny")
    _, _, inner, _ = _check_onnx(z.model, {"method": "dense"}, z.example_inputs, tmp_path / "w.onnx", (19, 7), 1)
    assert inner >= {f"{MS_DOMAIN}.GroupQueryAttention"} and "ai.onnx.Attention" not in inner


def test_which_sites_are_pure_sliding_windows():
    def fn(spec, window=-1, mask="none", planned=True):
        return AttentionFunction(planned, 4, 2, 16, 0.25, True, window, 0.0, mask, "causal", spec, True)

    assert pure_sliding_window(fn(spec_json([HeadSpec("streaming", {"sink": 0, "window": 64})], 0))) == 64
    # default crossover 2048 > window: below it the op is plain causal, which a window of 64 is not
    assert pure_sliding_window(fn(spec_json([HeadSpec("streaming", {"sink": 0, "window": 64})]))) is None
    assert pure_sliding_window(fn(spec_json([HeadSpec("streaming", {"sink": 4, "window": 64})], 0))) is None
    assert pure_sliding_window(fn("", window=8, planned=False)) == 8
    assert pure_sliding_window(fn("", window=8, mask="bool", planned=False)) is None


def test_dynamic_methods_without_onnx_lowering_refused_by_name():
    spec = spec_json([HeadSpec("routing", {})], 0)
    fn = AttentionFunction(True, 4, 2, 16, 0.25, True, -1, 0.0, "none", "causal", spec, True)
    with pytest.raises(ValueError, match=r"dynamic .*\['routing'\].*'quest', 'seer', 'landmark'.*format='torch'"):
        function_proto(fn)


def test_torch_format_round_trips_in_a_fresh_process(tmp_path):
    z = get_zoo_model("llama-tiny")
    kw = {"method": "streaming", "sink": 2, "window": 5, "dense_below": 0}
    res = export(z.model, z.example_inputs, tmp_path / "m.pt2", format="torch", **kw)
    targets = {str(n.target) for n in res.program.graph.nodes if n.op == "call_function"}
    assert "lcpass.planned_attention.default" in targets
    ref = lcpass.optimize(copy.deepcopy(z.model), example_inputs=z.example_inputs, **kw)
    ids = z.example_inputs["input_ids"]
    np.save(tmp_path / "ids.npy", ids[:, :13].numpy())
    np.save(tmp_path / "want.npy", _torch_out(ref, {"input_ids": ids[:, :13]}))
    code = f"""
import numpy as np, torch, lcpass
ep = torch.export.load({str(tmp_path / 'm.pt2')!r})
ids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r}))
out = ep.module()(input_ids=ids)
assert type(out) is dict, type(out)
out = out["logits"]
print(float((out - torch.from_numpy(np.load({str(tmp_path / 'want.npy')!r}))).abs().max()))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) <= 1e-5


def test_bad_input(tmp_path):
    z = get_zoo_model("llama-tiny")
    with pytest.raises(ValueError, match="format='tflite'.*onnx"):
        export(z.model, z.example_inputs, tmp_path / "m.x", format="tflite", method="dense")
    with pytest.raises(ValueError, match="folder .* does not exist"):
        export(z.model, z.example_inputs, tmp_path / "nope" / "m.onnx", method="dense")
    with pytest.raises(ValueError, match="is a directory"):
        export(z.model, z.example_inputs, tmp_path, method="dense")
    with pytest.raises(ValueError, match="unknown attention method 'nope'.*streaming"):
        export(z.model, z.example_inputs, tmp_path / "m.onnx", method="nope")
    with pytest.raises(ValueError, match="exactly one of"):
        export(z.model, z.example_inputs, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"site model\.layers\.0\.self_attn: dynamic .*tokenselect"):
        export(z.model, z.example_inputs, tmp_path / "m.onnx", method="tokenselect", dense_below=0)


@pytest.mark.slow
def test_smollm2_dense_streaming_duo(tmp_path):
    """The real model, one export holding all three plans: layers 0-9 dense, 10-19 streaming, 20-29 Duo."""
    from lcpass.zoo.pretrained import load_smollm2

    model, tok = load_smollm2()
    ids = tok("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt")["input_ids"][:, :40]
    sites = lcpass.detect(model, {"input_ids": ids})[0][1].sites
    names = [s.name for s in sites]
    duo = Plan.duo(sites, {n: [0] for n in names}, sink=4, recent=8, by_kv_head=True)
    plan = Plan({**{n: SitePlan.same("dense") for n in names[:10]},
                 **{n: SitePlan.same("streaming", sink=4, window=8) for n in names[10:20]},
                 **{n: duo.sites[n] for n in names[20:]}})
    res, called, _, _ = _check_onnx(model, {"plan": plan, "dense_below": 0}, {"input_ids": ids},
                                    tmp_path / "smol.onnx", (40, 23), 3)
    assert sorted(set(res.lowering.values())) == ["dense", "sparse"]
