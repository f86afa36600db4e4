"""``lcpass inspect MODEL``: the table of attention sites lcpass finds in a model."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from lcpass.inspect import inspect
from lcpass.methods.dynamic import retrieval_head_scores
from lcpass.zoo.pretrained import resolve_model

__all__ = ["add_parser", "run", "render"]

EXAMPLES = """examples:
  lcpass inspect llama-tiny                 a built-in zoo model
  lcpass inspect smollm2                    the embedded default (SmolLM2-135M-Instruct)
  lcpass inspect ./my-hf-model --json       a local Hugging Face folder, JSON for machines
  lcpass inspect mypkg.models:build         a factory returning a module (or module, inputs)
  lcpass inspect t5-tiny --route dynamo     the graphs torch.compile would hand a backend
  lcpass inspect smollm2 --heads            also score every head's retrieval (copy-paste) behaviour
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="list the attention sites found in a model",
        description="Capture MODEL, detect every attention subgraph structurally and print a table of "
        "sites (layer, source form, heads, head_dim, mask, scale, softcap) and of the softmaxes left "
        "alone with the reason.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="zoo name, 'smollm2', a local Hugging Face folder, or 'module:factory'")
    p.add_argument("--route", choices=("export", "dynamo", "fx"), default="export",
                   help="capture route (default: export)")
    p.add_argument("--core-aten", action="store_true", help="inspect the graph after run_decompositions()")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--heads", action="store_true",
                   help="score each head with the Retrieval Head paper's copy-paste score on synthetic needle "
                        "prompts (causal LMs; heads near 1 copy from the context, heads near 0 do not)")
    p.add_argument("--prompts", type=int, default=4, help="needle prompts for --heads (default 4)")
    p.set_defaults(func=run)
    return p


def render(report, file=None) -> None:
    """Rich tables for people."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=160)
    table = Table(title=f"{report.model}: {len(report.sites)} attention sites (route: {report.route})")
    for col in ("site", "source", "q heads", "kv heads", "head_dim", "mask", "scale", "softcap"):
        table.add_column(col, justify="right" if col in ("q heads", "kv heads", "head_dim", "scale") else "left")
    for s in report.sites:
        table.add_row(s.name, s.source, str(s.n_heads), str(s.n_kv_heads), str(s.head_dim), s.mask,
                      f"{s.scale:.4g}", f"{s.softcap:g}" if s.softcap else "-")
    console.print(table)
    if report.rejected:
        rej = Table(title=f"{len(report.rejected)} softmax(es) left alone")
        rej.add_column("node")
        rej.add_column("layer")
        rej.add_column("reason")
        for r in report.rejected:
            rej.add_row(r.node, r.site or "-", r.reason)
        console.print(rej)


def run(args: argparse.Namespace) -> int:
    from lcpass.cli import UserError  # lazy: lcpass.cli imports this module before it defines UserError

    resolved = resolve_model(args.model)
    report = inspect(resolved.model, resolved.example_inputs, route=args.route, decompose=args.core_aten,
                     name=resolved.name)
    if not report.sites:
        reasons = "; ".join(f"{r.node}: {r.reason}" for r in report.rejected[:3])
        raise UserError(f"no attention found in {args.model!r}" + (f" (softmaxes left alone: {reasons})" if reasons else ""))
    scores = None
    if args.heads:
        if not hasattr(getattr(resolved.model, "config", None), "vocab_size"):
            raise UserError(f"--heads needs a transformers causal LM; {args.model!r} is "
                            f"{type(resolved.model).__name__}")
        scores = retrieval_head_scores(resolved.model, resolved.tokenizer, n_prompts=args.prompts)
    if args.json:
        import json

        data = report.as_dict()
        if scores is not None:
            data["retrieval_scores"] = scores.tolist()
        print(json.dumps(data, indent=2))
    else:
        render(report)
        if scores is not None:
            render_heads(scores)
    return 0


def render_heads(scores, file=None) -> None:
    """One row per layer: each head's retrieval score (copy-paste hits / copy steps)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="retrieval-head scores (Retrieval Head paper, copy-paste on synthetic needles)")
    table.add_column("layer", justify="right")
    for h in range(scores.shape[1]):
        table.add_column(f"h{h}", justify="right")
    for layer, row in enumerate(scores.tolist()):
        table.add_row(str(layer), *(f"{x:.2f}" for x in row))
    Console(file=file or sys.stdout, width=200).print(table)
