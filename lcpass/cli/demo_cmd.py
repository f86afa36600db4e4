"""``lcpass demo``: inspect -> calibrate -> optimize -> passkey at ~4k tokens on SmolLM2, dense vs optimized."""
from __future__ import annotations

import argparse
from typing import Any

from lcpass.demo import run_demo

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="the end-to-end demo on the embedded SmolLM2-135M-Instruct",
        description="Inspect, calibrate a DuoAttention plan, optimize, and answer a passkey question at ~4k "
        "tokens with the dense and the optimized model; prints answer, prefill time, decode time per token and "
        "KV bytes, and writes the plan, its heat map, one site's Triton source and the numbers.",
    )
    p.add_argument("--out", default="lcpass-demo", help="output folder (default: lcpass-demo)")
    p.add_argument("--length", type=int, default=4096, help="passkey prompt length in tokens (default 4096)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of retrieval (full) heads (default 0.5)")
    p.add_argument("--calibration", default="optimize", metavar="MODE",
                   help="optimize (default): DuoAttention's gate training, ~1 min on 2 cores, the plan that kept "
                        "all 12 passkey cases of benchmarks/calibration.py; score: retrieval-head copy-paste "
                        "scores (seconds; 9 of 12 there)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.length < 256:
        raise ValueError(f"lcpass demo: --length {args.length} is too short; use >= 256 tokens")
    if args.calibration not in ("score", "optimize"):
        raise ValueError(f"lcpass demo: --calibration {args.calibration!r}; use optimize (default) or score")
    if not 0.0 < args.ratio <= 1.0:
        raise ValueError(f"lcpass demo: --ratio {args.ratio} must be in (0, 1]")
    run_demo(args.out, length=args.length, retrieval_ratio=args.ratio, mode=args.calibration)
    return 0
