"""`lcpass inspect`: tables for people, JSON for machines, one line and exit 2 for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lcpass.cli import main


def test_inspect_table(capsys):
    assert main(["inspect", "mistral-tiny"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn" in out and "sliding(8)" in out and "2 attention sites" in out


def test_inspect_json_and_rejections(capsys):
    assert main(["inspect", "gemma2-tiny-eager", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["mask"] for s in data["sites"]] == ["sliding(8)", "causal"]
    assert data["sites"][0]["softcap"] == 50.0 and data["sites"][0]["n_kv_heads"] == 2


@pytest.mark.parametrize("spec,words", [
    ("no-such-model", "unknown model spec"),
    ("/tmp", "has no config.json"),
    ("moe-router", "no attention found"),
    ("lcpass.nothing:factory", "lcpass.nothing"),
])
def test_bad_input_is_one_line_exit_2(spec, words):
    proc = subprocess.run([sys.executable, "-m", "lcpass.cli", "inspect", spec], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lcpass: error:") and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_methods_listed(capsys):
    assert main(["methods", "--json"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)]
    assert {"dense", "streaming", "duo"} <= set(names)


def test_inspect_heads_scores_every_head(capsys):
    assert main(["inspect", "llama-tiny", "--heads", "--prompts", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    scores = data["retrieval_scores"]
    assert len(scores) == 2 and all(len(row) == 4 for row in scores)
    assert all(0.0 <= x <= 1.0 for row in scores for x in row)


def test_top_level_api_names():
    import lcpass
    from lcpass.calibration import calibrate
    from lcpass.quality import evaluate

    assert lcpass.calibrate is calibrate and lcpass.eval is evaluate
    for name in ("inspect", "optimize", "export", "capture", "Plan", "verify_model"):
        assert callable(getattr(lcpass, name))
