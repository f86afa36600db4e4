"""The demo (the README's main command) end to end, at short lengths: every stage runs and every number
it reports is a measurement (positive times, real cache bytes, the optimized cache smaller)."""
from __future__ import annotations

import json

import pytest

from lcpass.cli import main

pytestmark = pytest.mark.slow


def test_demo_short(tmp_path, capsys):
    from lcpass.demo import run_demo

    result = run_demo(tmp_path, length=384, calib_length=256, new_tokens=3)
    assert result["sites"] == 30 and result["rewritten"] == 30
    dense, duo = result["rows"]["dense"], result["rows"]["lcpass duo"]
    for row in (dense, duo):
        assert row["prefill_s"] > 0 and row["decode_s_per_token"] > 0 and row["kv_bytes"] > 0
    assert duo["kv_bytes"] < dense["kv_bytes"]
    assert json.loads((tmp_path / "demo.json").read_text())["passkey"] == result["passkey"]
    for name in ("plan.json", "plan_heatmap.png", "kernel_site0.py"):
        assert (tmp_path / name).stat().st_size > 0
    assert "@triton.jit" in (tmp_path / "kernel_site0.py").read_text()
    out = capsys.readouterr().out
    assert "passkey" in out and "lcpass duo" in out


def test_demo_cli_rejects_bad_length(capsys):
    assert main(["demo", "--length", "10"]) == 2
    assert "too short" in capsys.readouterr().err


def test_demo_rejects_unknown_calibration_mode(tmp_path, capsys):
    from lcpass.demo import run_demo

    with pytest.raises(ValueError, match="mode='train'.*optimize"):
        run_demo(tmp_path, mode="train")
    assert main(["demo", "--calibration", "train"]) == 2
