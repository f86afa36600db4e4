"""``lcpass eval MODEL --methods duo,streaming --lengths 1024,2048 --out results/``: the quality harness."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lcpass.cli.calibrate_cmd import parse_floats, parse_ints
from lcpass.plan import Plan
from lcpass.quality import DEFAULT_TEXT, evaluate, load_text_ids, parse_method
from lcpass.zoo.pretrained import resolve_model

__all__ = ["add_parser", "run", "split_methods"]

EXAMPLES = """examples:
  lcpass eval smollm2 --methods duo,streaming --lengths 1024,2048 --out results/
  lcpass eval smollm2 --methods "streaming:window=256,sink=4,duo:ratio=0.25" --out results/
  lcpass eval smollm2 --methods plan.json,duo-random:ratio=0.5 --text my_corpus.txt --out results/
"""


def split_methods(text: str) -> list[str]:
    """Split a comma-separated method list; a `key=value` piece without ':' belongs to the method before it.

    Example:
        >>> split_methods("dense,streaming:window=256,sink=4,duo")
        ['dense', 'streaming:window=256,sink=4', 'duo']
    """
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece and "/" not in piece and out:
            out[-1] += "," + piece
        else:
            out.append(piece)
    if not out:
        raise ValueError(f"--methods {text!r} names no method; e.g. --methods dense,streaming,duo")
    return out


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="measure answer quality of attention methods on a model (passkey, multi-needle, perplexity)",
        description="Apply each method to a fresh copy of MODEL and measure passkey retrieval (lengths x "
        "depths), multi-needle chain following, perplexity on a text file and next-token agreement with "
        "dense; write results.json, results.md and PNG plots to --out.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="'smollm2' or a local Hugging Face folder with a tokenizer")
    p.add_argument("--methods", default="dense",
                   help="comma-separated method specs: dense, a method name with :k=v params, duo / razor / moa "
                        "(calibrated), duo-random, or a plan JSON path (default: dense)")
    p.add_argument("--lengths", default="1024,2048", help="passkey / needle context lengths (default 1024,2048)")
    p.add_argument("--depths", default="0.1,0.4,0.7,0.95", help="passkey depths in [0, 1]")
    p.add_argument("--needle-trials", type=int, default=2, help="multi-needle questions per length (default 2)")
    p.add_argument("--hops", type=int, default=1, help="multi-needle chain links (default 1)")
    p.add_argument("--text", default=None, help="perplexity text file (default: /usr/share/common-licenses/GPL-3)")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="tokens of the text used (default 2048)")
    p.add_argument("--calib-lengths", default="1024", help="calibration prompt lengths (default 1024)")
    p.add_argument("--dense-below", type=int, default=None,
                   help="sites run dense below this many keys (default: each method's crossover, as deployed; "
                        "0 = always run the method)")
    p.add_argument("--timing-repeats", type=int, default=1, help="prefill runs per method, fastest kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for results.json, results.md and the plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the harness and write its files; raise ValueError / FileNotFoundError on bad input."""
    methods = split_methods(args.methods)
    specs = [parse_method(m) for m in methods]  # bad specs fail before the model loads
    for s in specs:
        if s.plan_path is not None:
            Plan.load(s.plan_path)  # missing or corrupt plan files fail before the model loads
    text = args.text or DEFAULT_TEXT
    if not Path(text).is_file():
        raise FileNotFoundError(f"perplexity text file '{text}' does not exist; pass an existing file with --text")
    lengths = parse_ints(args.lengths, "--lengths")
    depths = parse_floats(args.depths, "--depths")
    calib = parse_ints(args.calib_lengths, "--calib-lengths")
    resolved = resolve_model(args.model)
    if resolved.tokenizer is None:
        raise ValueError(
            f"model {args.model!r} has no tokenizer, and the quality harness asks questions in text; "
            "use 'smollm2' or a Hugging Face folder that includes its tokenizer"
        )
    load_text_ids(resolved.tokenizer, text, args.ppl_tokens)  # too-short / non-text file fails now
    res = evaluate(
        resolved.model, resolved.tokenizer, methods, lengths=lengths, depths=depths,
        needle_trials=args.needle_trials, hops=args.hops, text=text, ppl_tokens=args.ppl_tokens,
        calibration={"lengths": calib}, seed=args.seed, dense_below=args.dense_below,
        timing_repeats=args.timing_repeats, progress=not args.no_progress, out_dir=args.out,
        name=resolved.name,
    )
    print(Path(res["files"]["markdown"]).read_text())
    print("wrote " + ", ".join(res["files"].values()))
    return 0
