"""Export a model with sparse attention to ONNX, then run it in onnxruntime.

Each attention site becomes one ``lcpass``-domain function; the sequence axis stays dynamic, so the same
file runs any length. ``--method``:

* ``streaming`` (default): ONNX ``Attention`` with the method's mask built from positions in the graph;
* ``quest``: the content-based page selection (block min/max keys, ``TopK``) in standard ops, feeding
  ``Attention`` as a bool mask;
* ``s2``: ``onnx_ops="ort"``, the block layout lowered to ``com.microsoft.SparseAttention``, run with its
  KV buffers bound through IOBinding (``lcpass.onnx.sparse.run_with_kv_buffers``).

The reference is ``lcpass.optimize`` in PyTorch: onnxruntime must agree with it at two lengths (a multiple
of the block and not), and the speed of both is printed.

Run:  python examples/export_onnx.py [--method streaming|quest|s2] [--out /tmp/llama.onnx]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import lcpass
from lcpass.onnx.sparse import run_with_kv_buffers
from lcpass.zoo import get_zoo_model

warnings.filterwarnings("ignore")
PLANS = {  # method -> (plan, onnx_ops)
    "streaming": ({"method": "streaming", "sink": 2, "window": 8, "dense_below": 0}, "default"),
    "quest": ({"method": "quest", "page_size": 16, "token_budget": 32, "sink_pages": 0, "dense_below": 0}, "default"),
    "s2": ({"method": "s2", "block_size": 16, "local_blocks": 1, "vert_stride": 2, "dense_below": 0}, "ort"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=sorted(PLANS), default="streaming")
    ap.add_argument("--out", default=None, help="the .onnx file (default: a temporary folder)")
    args = ap.parse_args()
    plan, onnx_ops = PLANS[args.method]
    out = args.out or str(Path(tempfile.gettempdir()) / f"lcpass-llama-{args.method}.onnx")

    z = get_zoo_model("llama-tiny")  # random init: distinct scores, so top-k selections have no ties
    ids = torch.randint(3, z.model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    res = lcpass.export(z.model, {"input_ids": ids}, out, format="onnx", onnx_ops=onnx_ops, **plan)
    print(f"exported {res.path} in {time.perf_counter() - t:.1f} s; inputs {res.input_names}; "
          f"functions {res.functions}")
    assert all(n.domain != "lcpass" or n.op_type in res.functions for n in onnx.load(out).graph.node)
    assert onnx_ops != "ort" or "com.microsoft.SparseAttention" in res.functions

    reference = lcpass.optimize(copy.deepcopy(z.model), example_inputs={"input_ids": ids}, **plan)
    sess = ort.InferenceSession(out)
    for n in (64, 57):
        feed = {"input_ids": ids[:, :n].numpy()}
        t = time.perf_counter()
        got = run_with_kv_buffers(sess, feed)[0] if res.kv_buffers else sess.run(None, feed)[0]
        t_ort = time.perf_counter() - t
        with torch.no_grad():
            t = time.perf_counter()
            want = reference(input_ids=ids[:, :n]).logits.numpy()
            t_pt = time.perf_counter() - t
        err = float(np.abs(got - want).max())
        print(f"length {n}: max |onnxruntime - pytorch| {err:.2e}; onnxruntime {t_ort * 1e3:.1f} ms, "
              f"pytorch {t_pt * 1e3:.1f} ms")
        assert err <= 1e-4
    print("OK")


if __name__ == "__main__":
    main()
