"""Adding a dynamic method is one file plus one registry line: ``tests/toy_method.py`` holds a record with
its prefill selection, its decode selector and its ONNX lowering; registering it (one ``register`` call)
makes it run through every door (optimize, the compile backend, export to ONNX run by onnxruntime) and the
decode cache, each checked against a reference written out here in plain PyTorch.

The toy runs in a subprocess so that its registration does not leak into the other tests' registry.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPT = r'''
import json, math, sys, tempfile, warnings
from pathlib import Path
import torch
import torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
from lcpass.methods import register
from toy_method import TOY
register(TOY)  # the one registry line
import lcpass
from lcpass.kv.group import KVGroup
from lcpass.kv.select import Selector, decode_selectors, select_attend
from lcpass.methods import KVPolicy
from lcpass.onnx.dynamic import onnx_methods

warnings.simplefilter("ignore")
torch.manual_seed(0)
HQ, HKV, D, BS, TOPK = 4, 2, 16, 16, 3

class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(32, h * D) for h in (HQ, HKV, HKV))
    def heads(self, x):
        B, S, _ = x.shape
        return (self.q(x).view(B, S, HQ, D).transpose(1, 2), self.k(x).view(B, S, HKV, D).transpose(1, 2),
                self.v(x).view(B, S, HKV, D).transpose(1, 2))
    def forward(self, x):
        return F.scaled_dot_product_attention(*self.heads(x), is_causal=True, enable_gqa=True)

def reference(m, x):
    """toy_blockmax written out: per query head and query block, the TOPK key blocks scoring best by
    max over the block's queries of q . max(k over the key block); the sink and local blocks forced."""
    q, k, v = m.heads(x)
    B, _, S, _ = q.shape
    k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    nb = -(-S // BS)
    keep = torch.zeros(B, HQ, S, S, dtype=torch.bool)
    for i in range(nb):
        rows = range(i * BS, min((i + 1) * BS, S))
        kmax = torch.stack([k[:, :, j * BS:(j + 1) * BS].amax(2) for j in range(i + 1)], 2)  # [B, H, i+1, D]
        s = (q[:, :, rows.start:rows.stop] @ kmax.transpose(-1, -2)).amax(2)  # [B, H, i+1]
        s[..., 0] = math.inf
        s[..., i] = math.inf
        chosen = s.topk(min(TOPK, i + 1), -1).indices
        for b in range(B):
            for h in range(HQ):
                for j in chosen[b, h].tolist():
                    keep[b, h, rows.start:rows.stop, j * BS:(j + 1) * BS] = True
    keep &= torch.ones(S, S, dtype=torch.bool).tril()
    sc = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    return torch.softmax(sc.masked_fill(~keep, -math.inf), -1) @ v

m = Attn().eval()
x = torch.randn(2, 70, 32)      # 70 and 91: not multiples of the block
fresh = torch.randn(2, 91, 32)
errs = {}
with torch.no_grad():
    want, want_fresh = reference(m, x), reference(m, fresh)
    dense = F.scaled_dot_product_attention(*m.heads(x), is_causal=True, enable_gqa=True)
    errs["differs_from_dense"] = float((want - dense).abs().max())
    opt = lcpass.optimize(m, method="toy_blockmax", dense_below=0, example_inputs=(x,))
    errs["optimize"] = float((opt(x) - want).abs().max())
    errs["optimize_fresh"] = float((opt(fresh) - want_fresh).abs().max())
    comp = torch.compile(m, backend="lcpass", options={"method": "toy_blockmax", "dense_below": 0, "inner": "eager"})
    errs["compile"] = float((comp(x) - want).abs().max())
    import onnxruntime as ort
    path = Path(tempfile.mkdtemp()) / "toy.onnx"
    res = lcpass.export(m, (x,), path, method="toy_blockmax", dense_below=0)
    sess = ort.InferenceSession(str(path))
    name = sess.get_inputs()[0].name
    errs["onnx"] = float(abs(sess.run(None, {name: x.numpy()})[0] - want.numpy()).max())
    errs["onnx_fresh"] = float(abs(sess.run(None, {name: fresh.numpy()})[0] - want_fresh.numpy()).max())
    # decode: the record's selector on one cache group, against the slots chosen by hand
    B, h, G, L = 2, HKV, HQ // HKV, 30
    kk, vv = torch.randn(B, h, L, D), torch.randn(B, h, L, D)
    pos = torch.arange(L, dtype=torch.int32)[None].repeat(B, 1)
    sel = Selector("toy_blockmax", {"budget": 8})
    qd = torch.randn(B, h, G, D)
    got = select_attend(sel, qd, KVGroup([0, 1], KVPolicy.all(), sel, kk, vv, pos), 0.25, layer_idx=0,
                        n_layers=1, shared={})
    votes = torch.softmax((qd @ kk[:, :, :L - 1].transpose(-1, -2)) * 0.25, -1).sum(2)  # [B, h, L-1]
    keepd = torch.zeros(B, h, L, dtype=torch.bool)
    keepd.scatter_(2, votes.topk(8, -1).indices, True)
    keepd[:, :, -1] = True
    sd = (qd @ kk.transpose(-1, -2)) * 0.25
    wantd = torch.softmax(sd.masked_fill(~keepd[:, :, None], -math.inf), -1) @ vv
    errs["decode"] = float((got - wantd).abs().max())
    errs["decode_differs_from_dense"] = float((wantd - torch.softmax(sd, -1) @ vv).abs().max())
print(json.dumps({"errs": errs, "selectors": sorted(decode_selectors()), "onnx": list(onnx_methods()),
                  "budget": sel.budget(), "functions": res.functions}))
'''


def test_a_toy_method_in_one_file_runs_through_every_door():
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(HERE)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    errs = out["errs"]
    assert errs["differs_from_dense"] > 1e-2 and errs["decode_differs_from_dense"] > 1e-2  # the toy selects
    for door in ("optimize", "optimize_fresh", "compile", "onnx", "onnx_fresh", "decode"):
        assert errs[door] < 1e-5, (door, errs)
    assert "toy_blockmax" in out["selectors"] and "toy_blockmax" in out["onnx"] and out["budget"] == 8
    assert out["functions"]  # the ONNX graph holds the lcpass attention function
