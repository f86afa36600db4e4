"""``lcpass export MODEL --format onnx|torch --method M --out FILE``: export with attention planned.

ONNX (opset 23, dynamic sequence axis, one ``lcpass``-domain function per site configuration) runs in
onnxruntime; the torch format is a ``torch.export`` program whose attention sites are lcpass custom ops
(``torch.export.load`` after ``import lcpass``). See :func:`lcpass.export`.

Wiring (in lcpass/cli/__init__.py)::

    export_cmd.add_parser(sub)          # registers "export", sets func=export_cmd.run

Example::

    >>> import argparse
    >>> sub = argparse.ArgumentParser().add_subparsers()
    >>> _ = add_parser(sub)
"""
from __future__ import annotations

import argparse
from typing import Any

from lcpass.cli.optimize_cmd import parse_params
from lcpass.export import FORMATS, ONNX_OPS, check_output_path, export
from lcpass.plan import Plan
from lcpass.zoo.pretrained import resolve_model

__all__ = ["add_parser", "run"]

EXAMPLES = """examples:
  lcpass export llama-tiny --format onnx --method streaming --param sink=4 --param window=64 --out m.onnx
  lcpass export smollm2 --format torch --method dense --out smollm2.pt2
  lcpass export bert-tiny --format onnx --method dense --out bert.onnx
  lcpass export smollm2 --format onnx --plan plan.json --out smollm2.onnx     (a plan from `lcpass optimize`)
  lcpass export llama-tiny --method s2 --dense-below 0 --onnx-ops ort --out s2.onnx
      (com.microsoft.SparseAttention where a site's block layout allows; run it with
       lcpass.onnx.sparse.run_with_kv_buffers, which binds its shared KV buffers)
then:  onnxruntime.InferenceSession("m.onnx").run(None, {"input_ids": ids})
       import lcpass; torch.export.load("smollm2.pt2").module()(input_ids=ids)["logits"]
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``export`` sub-command on an argparse sub-parsers object."""
    p = subparsers.add_parser(
        "export",
        help="export a model with its attention planned, to ONNX or torch.export",
        description="Capture MODEL, plan its attention (--method with --param values, or --plan FILE), lower "
        "every planned site and write an ONNX model (onnxruntime, dynamic sequence axis) or a saved "
        "torch.export program whose attention sites are lcpass ops.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="zoo name, 'smollm2', a local Hugging Face folder, or 'module:factory'")
    p.add_argument("--format", default="onnx", help="onnx (default) or torch")
    p.add_argument("--method", default=None, help="attention method (see `lcpass methods`)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter, repeatable (e.g. --param sink=4 --param window=1024)")
    p.add_argument("--plan", default=None, metavar="FILE", help="a plan JSON file instead of --method")
    p.add_argument("--out", required=True, help="the file to write (.onnx or .pt2)")
    p.add_argument("--static-seq", action="store_true", help="export with the example's fixed sequence length")
    p.add_argument("--dense-below", type=int, default=None, metavar="LEN",
                   help="run dense below this key length instead of the method's crossover")
    p.add_argument("--onnx-ops", default="default", metavar="SET",
                   help="default (ONNX Attention functions, GroupQueryAttention for pure windows) or ort "
                        "(also com.microsoft.SparseAttention for static block layouts)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Validate (one-line ValueError), export, print what was written."""
    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format!r} is not supported; use one of {', '.join(FORMATS)}")
    if args.onnx_ops not in ONNX_OPS:
        raise ValueError(f"--onnx-ops {args.onnx_ops!r} is not supported; use one of {', '.join(ONNX_OPS)}")
    if args.onnx_ops != "default" and args.format != "onnx":
        raise ValueError(f"--onnx-ops {args.onnx_ops} goes with --format onnx, not {args.format}")
    params = parse_params(args.param)
    Plan.request(args.method, args.plan, params, door="lcpass export",
                 method_flag="--method NAME (see `lcpass methods`)", plan_flag="--plan FILE")
    out = check_output_path(args.out, "lcpass export")
    resolved = resolve_model(args.model)
    res = export(resolved.model, resolved.example_inputs, out, format=args.format, method=args.method,
                 plan=args.plan, dynamic_seq=not args.static_seq, dense_below=args.dense_below,
                 onnx_ops=args.onnx_ops, **params)
    rewritten = sum(1 for v in res.lowering.values() if v != "dense")
    print(f"wrote {res.path} ({res.format}): {rewritten}/{len(res.lowering)} attention sites planned sparse")
    if res.format == "onnx":
        print(f"inputs: {', '.join(res.input_names)}; lcpass functions / contrib ops: {', '.join(res.functions)}")
        for site, why in res.notes.items():
            print(f"  {site}: kept the lcpass Attention function ({why})")
        if res.kv_buffers:
            print(f"SparseAttention KV buffers to bind (lcpass.onnx.sparse.run_with_kv_buffers): "
                  f"{', '.join(res.kv_buffers)}")
    return 0
