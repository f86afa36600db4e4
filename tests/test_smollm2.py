"""The real pretrained SmolLM2-135M-Instruct: captured with torch.export, 30 sites, GQA 9/3 folded,
logits equal eager."""
from __future__ import annotations

import pytest
import torch

from lcpass.capture import capture
from lcpass.zoo.pretrained import load_smollm2
from lcpass.patterns import canonical_args, canonical_nodes, canonicalize

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_smollm2_export_canonical(impl):
    model, tok = load_smollm2(impl)
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    cap = capture(model, (), {"input_ids": ids})
    found = canonicalize(cap.gm, cap.flat_inputs)
    assert len(found.sites) == 30 and not found.rejected
    assert [s.name for s in found.sites] == [f"model.layers.{i}.self_attn" for i in range(30)]
    assert all((s.n_heads, s.n_kv_heads, s.head_dim, s.mask) == (9, 3, 64, "causal") for s in found.sites)
    for node in canonical_nodes(cap.gm):
        assert canonical_args(node).k.meta["val"].shape[1] == 3
    with torch.no_grad():
        got = cap.gm(**cap.extra["kwargs"]).logits
    assert (got - want).abs().max().item() <= 1e-4


def test_inspect_cli_on_smollm2(capsys):
    from lcpass.cli import main

    assert main(["inspect", "smollm2"]) == 0
    out = capsys.readouterr().out
    assert "30 attention sites" in out and "model.layers.29.self_attn" in out
