"""The examples run (subprocess, small lengths) and the CLI commands `lcpass optimize` / `lcpass export`
(parsers built here; the lead wires them into `lcpass/cli/__init__.py`)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcpass.cli import export_cmd, optimize_cmd
from lcpass.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "custom_model.py": ["--tokens", "256"],
    "export_onnx.py": [],
    "compile_backend.py": [],
    "quickstart_hf.py": ["--tokens", "128", "--window", "32", "--new", "4"],
}


@pytest.mark.parametrize("script", list(EXAMPLES))
def test_example_runs(script, tmp_path):
    args = EXAMPLES[script] + (["--out", str(tmp_path / "m.onnx")] if script == "export_onnx.py" else [])
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-1500:], proc.stderr[-3000:])
    assert proc.stdout.strip().endswith("OK")
    assert " ms" in proc.stdout or " s" in proc.stdout  # speed printed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcpass")
    sub = parser.add_subparsers(dest="command")
    optimize_cmd.add_parser(sub)
    export_cmd.add_parser(sub)
    return parser


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


def test_help_shows_examples():
    for cmd, needle in (("optimize", "lcpass optimize llama-tiny --method streaming"),
                        ("export", "lcpass export llama-tiny --format onnx")):
        sub = _parser()._subparsers._group_actions[0].choices[cmd]
        text = sub.format_help()
        assert "examples:" in text and needle in text


def test_optimize_writes_plan_and_prints_report(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = _run(["optimize", "llama-tiny", "--method", "streaming", "--param", "sink=2", "--param", "window=5",
               "--out", str(out), "--dense-below", "0", "--verify"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "2/2 sites rewritten" in text and "verify model.layers.1.self_attn: max abs error" in text
    plan = Plan.load(out)
    assert [h.params for h in plan.resolve("model.layers.0.self_attn")] == [{"sink": 2, "window": 5}] * 4
    assert plan.fingerprint is not None and len(plan.fingerprint.sites) == 2
    assert plan.fingerprint.model == "llama-tiny"


def test_optimize_captures_the_model_once(tmp_path, capsys, monkeypatch):
    """The CLI plans on optimize's own capture (no second detect), dense layers included."""
    calls = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "plan.json"
    assert _run(["optimize", "llama-tiny", "--method", "streaming", "--param", "window=5", "--dense-first", "1",
                 "--out", str(out)]) == 0
    assert len(calls) == 1
    plan = Plan.load(out)
    assert [h.method for h in plan.resolve("model.layers.0.self_attn")] == ["dense"] * 4
    assert [h.method for h in plan.resolve("model.layers.1.self_attn")] == ["streaming"] * 4


def test_export_torch_format(tmp_path, capsys):
    out = tmp_path / "m.pt2"
    assert _run(["export", "llama-tiny", "--format", "torch", "--method", "streaming", "--param", "window=8",
                 "--out", str(out)]) == 0
    assert out.is_file() and "2/2 attention sites planned sparse" in capsys.readouterr().out
    ep = torch.export.load(str(out))
    assert any("planned_attention" in str(n.target) for n in ep.graph.nodes)


@pytest.mark.parametrize("argv, match", [
    (["optimize", "llama-tiny", "--method", "nope", "--out", "p.json"], r"unknown attention method 'nope'.*streaming"),
    (["optimize", "llama-tiny", "--method", "streaming", "--param", "window", "--out", "p.json"], "key=value"),
    (["optimize", "llama-tiny", "--method", "streaming", "--out", "/nonexistent-dir/p.json"], "does not exist"),
    (["export", "llama-tiny", "--format", "tflite", "--method", "dense", "--out", "m.x"], "--format 'tflite'.*onnx"),
    (["export", "llama-tiny", "--method", "nope", "--out", "m.onnx"], "unknown attention method"),
    (["export", "llama-tiny", "--method", "dense", "--out", "/nonexistent-dir/m.onnx"], "does not exist"),
    (["export", "llama-tiny", "--out", "m.onnx"], "exactly one of --method"),
    (["export", "llama-tiny", "--method", "s2", "--onnx-ops", "trt", "--out", "m.onnx"], "--onnx-ops 'trt'.*ort"),
    (["export", "llama-tiny", "--method", "s2", "--format", "torch", "--onnx-ops", "ort", "--out", "m.pt2"],
     "goes with --format onnx"),
])
def test_bad_input_is_one_line_value_error(argv, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=match) as info:
        _run(argv)
    assert "\n" not in str(info.value)
