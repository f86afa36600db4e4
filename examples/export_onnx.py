"""Export a model with StreamingLLM attention to ONNX, then run it in onnxruntime.

Each attention site becomes one ``lcpass``-domain function (ONNX ``Attention`` with the method's mask built
from positions inside the graph); the sequence axis stays dynamic, so the same file runs any length. The
reference is ``lcpass.optimize`` in PyTorch: onnxruntime must agree with it at two lengths, and the speed
of both is printed.

Run:  python examples/export_onnx.py [--out /tmp/llama-streaming.onnx]
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
from lcpass.zoo import get_zoo_model

warnings.filterwarnings("ignore")
PLAN = {"method": "streaming", "sink": 2, "window": 8, "dense_below": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "lcpass-llama-streaming.onnx"))
    args = ap.parse_args()

    z = get_zoo_model("llama-tiny")
    t = time.perf_counter()
    res = lcpass.export(z.model, z.example_inputs, args.out, format="onnx", **PLAN)
    print(f"exported {res.path} in {time.perf_counter() - t:.1f} s; inputs {res.input_names}; "
          f"functions {res.functions}")
    assert all(n.domain != "lcpass" or n.op_type in res.functions for n in onnx.load(args.out).graph.node)

    reference = lcpass.optimize(copy.deepcopy(z.model), example_inputs=z.example_inputs, **PLAN)
    sess = ort.InferenceSession(args.out)
    ids = z.example_inputs["input_ids"]
    for n in (ids.shape[1], 11):
        feed = {"input_ids": ids[:, :n].numpy()}
        t = time.perf_counter()
        got = sess.run(None, feed)[0]
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
