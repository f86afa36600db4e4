"""``lcpass calibrate MODEL --method duo --ratio 0.5 --out plan.json``: measure the heads, write a plan."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lcpass.calibration import calibrate
from lcpass.quality.report import plot_plan
from lcpass.zoo.pretrained import resolve_model

__all__ = ["add_parser", "run", "parse_floats", "parse_ints"]

EXAMPLES = """examples:
  lcpass calibrate smollm2 --method duo --ratio 0.5 --out duo.json            retrieval-head scores (fast)
  lcpass calibrate smollm2 --method duo --mode optimize --steps 8 --out duo.json   DuoAttention's gates
  lcpass calibrate smollm2 --method razor --ratio 0.25 --out razor.json
  lcpass calibrate smollm2 --method moa --density 0.4 --out moa.json --plot moa.png
  lcpass calibrate llama-tiny --method duo --out tiny.json                     no tokenizer: random prompts
"""


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """'1024,2048' -> (1024, 2048); ValueError naming `what` otherwise."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what} {text!r} must be comma-separated integers, e.g. 1024,2048") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} {text!r} must list positive integers, e.g. 1024,2048")
    return values


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """'0.1,0.5' -> (0.1, 0.5) with every value in [0, 1]; ValueError naming `what` otherwise."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what} {text!r} must be comma-separated numbers in [0, 1], e.g. 0.1,0.5,0.9") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{what} {text!r} must list numbers in [0, 1], e.g. 0.1,0.5,0.9")
    return values


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "calibrate",
        help="measure a model's heads and write a DuoAttention / RazorAttention / MoA plan",
        description="Score every head on synthetic needle prompts (the Retrieval Head copy-paste score) or "
        "train DuoAttention's gates, or profile per-head window mass (MoA), and write a plan JSON that "
        "carries the model's fingerprint (it is refused on any other model).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="zoo name, 'smollm2', a local Hugging Face folder, or 'module:factory'")
    p.add_argument("--method", choices=("duo", "razor", "moa"), default="duo", help="plan kind (default duo)")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="duo/razor: share of heads (KV heads under GQA) kept full (default 0.5)")
    p.add_argument("--mode", choices=("score", "optimize"), default="score",
                   help="duo/razor: 'score' = retrieval-head scores (fast), 'optimize' = DuoAttention gates")
    p.add_argument("--density", type=float, default=0.5, help="moa: target average density (default 0.5)")
    p.add_argument("--lengths", default="1024", help="prompt lengths in tokens, comma-separated (default 1024)")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths in [0, 1], comma-separated")
    p.add_argument("--sink", type=int, default=64, help="sink tokens of streaming heads / MoA (default 64)")
    p.add_argument("--recent", type=int, default=256, help="recent tokens of duo streaming heads (default 256)")
    p.add_argument("--steps", type=int, default=8, help="optimize mode: training steps (default 8)")
    p.add_argument("--per-query-head", action="store_true",
                   help="choose query heads independently (default under GQA: whole KV heads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--plot", help="also write the per-head plan heat map to this PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Calibrate, write the plan (and heat map); raise ValueError / FileNotFoundError on bad input."""
    lengths = parse_ints(args.lengths, "--lengths")
    depths = parse_floats(args.depths, "--depths")
    if not 0.0 <= args.ratio <= 1.0:
        raise ValueError(f"--ratio {args.ratio} must lie in [0, 1] (the share of heads kept full)")
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise FileNotFoundError(f"--out {out}: folder '{out.parent}' does not exist; create it first")
    resolved = resolve_model(args.model)
    plan = calibrate(
        resolved.model, args.method, tokenizer=resolved.tokenizer, retrieval_ratio=args.ratio, mode=args.mode,
        density=args.density, lengths=lengths, depths=depths, sink=args.sink, recent=args.recent,
        by_kv_head=False if args.per_query_head else None, steps=args.steps, seed=args.seed,
        progress=not args.no_progress, name=resolved.name,
    )
    plan.save(out)
    fp = plan.fingerprint
    n_heads = sum(s.n_heads for s in fp.sites) if fp else 0
    if args.method in ("duo", "razor"):
        kept = sum(bool(h.params.get("retrieval")) for n in plan.sites for h in plan.resolve(n))
        summary = f"{kept}/{n_heads} heads kept full ({args.method}, ratio {args.ratio})"
    else:
        spans = [h.params["alpha"] for n in plan.sites for h in plan.resolve(n)]
        summary = f"MoA windows {int(min(spans))}..{int(max(spans))} tokens (target density {args.density})"
    print(f"wrote {out}: {summary}; fingerprint {fp.architecture if fp else '?'} weights {fp.weights if fp else '?'}")
    if args.plot:
        plot_plan(plan, args.plot, length=max(lengths))
        print(f"wrote {args.plot}")
    sys.stdout.flush()
    return 0
