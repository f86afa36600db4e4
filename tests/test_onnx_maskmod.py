"""The ONNX mask is the mask_mod's own trace: every mask the package builds, emitted as ONNX and run by
onnxruntime, equals the Python callable evaluated by torch on the same positions (the oracle is the
callable, not lcpass's ONNX code). Negative positions check torch's floor semantics for // and %."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from lcpass import masks as M
from lcpass.methods.dynamic.cca import cca_mask
from lcpass.methods.s2 import block_local_mask, block_strided_mask, s2_shard_mask
from lcpass.onnx.common import OPSET, Body, ONNXExportError
from lcpass.onnx.maskmod import emit_mask_mod

H = 4

MASKS = {
    "causal": M.causal_mask(),
    "sliding_per_head": M.sliding_window_mask([1, 3, 5, 7]),
    "sink_per_head": M.sink_mask([0, 1, 2, 4]),
    "streaming": M.streaming_mask(2, 3),
    "strided": M.strided_mask(3, [0, 1, 2, 0]),
    "dilated": M.dilated_window_mask([2, 3, 2, 4], [1, 2, 3, 1]),
    "block_diagonal": M.block_diagonal_mask(4, [0, 1, 2, 3]),
    "per_head": M.per_head_mask([M.causal_mask(), M.sliding_window_mask(2), M.streaming_mask(1, 2),
                                 M.full_mask()]),
    "or_and": M.or_masks(M.and_masks(M.causal_mask(), M.sliding_window_mask(3)), M.sink_mask(1)),
    "s2_local": block_local_mask(4, 2),
    "s2_strided": block_strided_mask(4, 3, 1),
    "s2_shard": s2_shard_mask(4, 1, 2, 0),
    "cca": cca_mask(4, 3, 1),
    "callable_floor": M.mask_from_callable(lambda b, h, q, kv: (q - kv) // 3 == ((q + kv) % 5) - 2 + h % 2,
                                           "floor_mix"),
    "callable_float": M.mask_from_callable(lambda b, h, q, kv: torch.exp(-(q - kv).abs() / 4.0) > 0.3, "decay"),
}


def _run(mask, q_pos: np.ndarray, kv_pos: np.ndarray):
    body = Body()
    h = body.const(np.arange(H, dtype=np.int64).reshape(1, H, 1, 1))
    out = emit_mask_mod(body, mask, h, "q", "kv")
    if out is None:
        return None
    body.nodes.append(helper.make_node("Identity", [out], ["keep"]))
    graph = helper.make_graph(body.nodes, "mask",
                              [helper.make_tensor_value_info("q", TensorProto.INT64, [1, 1, None, 1]),
                               helper.make_tensor_value_info("kv", TensorProto.INT64, [1, 1, 1, None])],
                              [helper.make_tensor_value_info("keep", TensorProto.BOOL, [None] * 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"q": q_pos.reshape(1, 1, -1, 1), "kv": kv_pos.reshape(1, 1, 1, -1)})[0]


@pytest.mark.parametrize("name", sorted(MASKS))
def test_onnx_mask_equals_the_callable(name):
    mask = MASKS[name]
    q_pos, kv_pos = np.arange(-5, 19, dtype=np.int64), np.arange(-3, 21, dtype=np.int64)
    got = _run(mask, q_pos, kv_pos)
    hh = torch.arange(H).view(1, H, 1, 1)
    want = mask(torch.zeros(1, 1, 1, 1, dtype=torch.long), hh, torch.from_numpy(q_pos).view(1, 1, -1, 1),
                torch.from_numpy(kv_pos).view(1, 1, 1, -1))
    want = torch.broadcast_to(want, (1, H, len(q_pos), len(kv_pos))).numpy()
    assert got is not None
    got = np.broadcast_to(got, want.shape)
    assert (got == want).all(), f"{name}: {int((got != want).sum())} positions differ"


def test_full_mask_emits_nothing():
    assert _run(M.full_mask(), np.arange(3), np.arange(3)) is None


def test_a_mask_reading_the_batch_index_is_refused_by_name():
    mask = M.mask_from_callable(lambda b, h, q, kv: (kv <= q) & (b == 0), "batch_zero")
    with pytest.raises(ONNXExportError, match="batch_zero.*'b'"):
        _run(mask, np.arange(3), np.arange(3))


def test_an_untraceable_mask_is_refused_by_name():
    mask = M.mask_from_callable(lambda b, h, q, kv: torch.fmod(q, 2) == 0, "c_mod")
    with pytest.raises(ONNXExportError, match="c_mod"):
        _run(mask, np.arange(3), np.arange(3))
