"""``lcpass.export(..., onnx_ops="ort")``: block-aligned static sites lower to com.microsoft.SparseAttention
(onnxruntime CPU, KV buffers shared through IOBinding) and match PyTorch within 1e-4; other sites keep the
lcpass Attention function with the reason recorded; the layout predicate on each kind of plan."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lcpass
from lcpass.export import export
from lcpass.lower import spec_json
from lcpass.onnx import DOMAIN, MS_DOMAIN, AttentionFunction
from lcpass.onnx.sparse import run_with_kv_buffers, sparse_layout
from lcpass.plan import HeadSpec, Plan, SitePlan
from lcpass.zoo import get_zoo_model

TOL = 1e-4
S2 = {"block_size": 16, "local_blocks": 1, "vert_stride": 2}


def _site_ops(path) -> list[set[str]]:
    """Op types inside the function each top-level lcpass node calls, in graph order."""
    m = onnx.load(str(path))
    bodies = {f.name: {f"{n.domain or 'ai.onnx'}.{n.op_type}" for n in f.node} for f in m.functions}
    return [bodies[n.op_type] for n in m.graph.node if n.domain == DOMAIN]


def _llama():
    z = get_zoo_model("llama-tiny")  # GQA 4:2, head_dim 16, 64 positions
    ids = torch.randint(3, z.model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    names = [s.name for s in lcpass.detect(z.model, {"input_ids": ids})[0][1].sites]
    return z.model, ids, names


def test_s2_site_runs_sparse_attention_and_streaming_site_falls_back(tmp_path):
    model, ids, names = _llama()
    plan = Plan({names[0]: SitePlan.same("s2", **S2), names[1]: SitePlan.same("streaming", sink=4, window=16)})
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = export(copy.deepcopy(model), {"input_ids": ids}, path, plan=plan, dense_below=0, onnx_ops="ort")
    ops = _site_ops(path)
    assert f"{MS_DOMAIN}.SparseAttention" in ops[0] and "ai.onnx.Attention" not in ops[0]
    assert "ai.onnx.Attention" in ops[1] and f"{MS_DOMAIN}.SparseAttention" not in ops[1]
    assert f"{MS_DOMAIN}.SparseAttention" in res.functions
    assert res.kv_buffers == ["past_key.0", "past_value.0"]
    assert list(res.notes) == [names[1]] and "not block-aligned" in res.notes[names[1]]
    assert any(names[1] in str(w.message) and "SparseAttention" in str(w.message) for w in caught)

    ref = lcpass.optimize(copy.deepcopy(model), example_inputs={"input_ids": ids}, plan=plan, dense_below=0)
    sess = ort.InferenceSession(str(path))
    for n in (64, 57):  # a multiple of the block and not
        got = run_with_kv_buffers(sess, {"input_ids": ids[:, :n].numpy()})[0]
        with torch.no_grad():
            want = ref(input_ids=ids[:, :n]).logits.numpy()
            dense = model(input_ids=ids[:, :n]).logits.numpy()
        assert np.abs(got - want).max() <= TOL, (n, np.abs(got - want).max())
        assert np.abs(want - dense).max() > 1e-3  # the layouts really drop keys
    # the constraint that makes IOBinding necessary: separate past / present buffers are refused
    kv = {b: np.zeros((2, 2, 64, 16), np.float32) for b in res.kv_buffers}
    with pytest.raises(Exception, match=r"past_key->DataRaw\(\) == present_key->DataRaw\(\)"):
        sess.run(None, {"input_ids": ids.numpy(), **kv})


def test_s2_default_lowering_builds_the_block_mask_in_graph(tmp_path):
    """Without the opt-in the same S2 site is an lcpass Attention function (the mask from positions)."""
    model, ids, _ = _llama()
    path = tmp_path / "d.onnx"
    res = export(copy.deepcopy(model), {"input_ids": ids}, path, method="s2", dense_below=0, **S2)
    assert res.kv_buffers == [] and all("ai.onnx.Attention" in ops for ops in _site_ops(path))
    ref = lcpass.optimize(copy.deepcopy(model), example_inputs={"input_ids": ids}, method="s2", dense_below=0, **S2)
    sess = ort.InferenceSession(str(path))
    for n in (64, 41):
        with torch.no_grad():
            want = ref(input_ids=ids[:, :n]).logits.numpy()
        assert np.abs(sess.run(None, {"input_ids": ids[:, :n].numpy()})[0] - want).max() <= TOL


def _fn(specs, dense_below=0, **kw) -> AttentionFunction:
    args = dict(planned=True, n_heads=4, n_kv_heads=2, head_dim=16, scale=0.25, is_causal=True, window=-1,
                softcap=0.0, mask="none", mask_kind="causal", spec=spec_json(specs, dense_below), same_len=True,
                ort_max_len=256)
    args.update(kw)
    return AttentionFunction(**args)


def test_which_layouts_sparse_attention_takes():
    s2 = [HeadSpec("s2", {"block_size": 32, "local_blocks": 2, "vert_stride": 2})] * 4
    lay, why = sparse_layout(_fn(s2), 256)
    assert why == "" and lay.block == 32  # the largest block the layout is aligned to
    assert lay.rows.shape == (2, 9) and lay.rows.dtype == np.int32  # 2 distinct head layouts, 8 rows
    # row r: the diagonal and local block, plus every other block at the head's offset
    assert lay.cols[0, lay.rows[0, 3]:lay.rows[0, 4]].tolist() == [1, 2, 3]
    assert lay.cols[1, lay.rows[1, 3]:lay.rows[1, 4]].tolist() == [0, 2, 3]
    assert sparse_layout(_fn([HeadSpec("longlora", {"group_size": 64})] * 4), 256)[0] is not None
    refused = {
        "not block-aligned": _fn([HeadSpec("streaming", {"sink": 16, "window": 32})] * 4),
        "partly masked": _fn([HeadSpec("s2", {"block_size": 8, "local_blocks": 2, "vert_stride": 2})] * 4),
        "crossover": _fn(s2, None),  # s2 runs dense below 4096 keys; the layout is sparse there
        "dynamic": _fn([HeadSpec("quest", {})] * 4),
        "mask tensor": _fn(s2, mask="bool", mask_kind="causal+padding"),
        "head_dim=12": _fn(s2, head_dim=12),
        "softcap": _fn(s2, softcap=30.0),
    }
    for needle, fn in refused.items():
        lay, why = sparse_layout(fn, 256)
        assert lay is None and needle in why, (needle, why)
    # a crossover below which the layout is already dense is fine (rows under 40 keys are full)
    assert sparse_layout(_fn(s2, 40), 256)[0] is not None


def test_onnx_ops_bad_values(tmp_path):
    z = get_zoo_model("llama-tiny")
    with pytest.raises(ValueError, match=r"onnx_ops='trt'.*\('default', 'ort'\)"):
        export(z.model, z.example_inputs, tmp_path / "m.onnx", method="dense", onnx_ops="trt")
    with pytest.raises(ValueError, match="applies to format='onnx'"):
        export(z.model, z.example_inputs, tmp_path / "m.pt2", format="torch", method="dense", onnx_ops="ort")
