"""``lcpass optimize MODEL --method M [--param k=v ...] --out plan.json``: plan a model and print the report.

Detects the model's attention sites, plans every head with the method (parameters from ``--param``),
validates the plan against the model, writes it as JSON (``lcpass.optimize(model, plan="plan.json")`` and
``torch.compile(..., options={"plan": "plan.json"})`` read it) and prints the optimize report: sites
rewritten, lowering, expected attention work and KV bytes versus dense. ``--verify`` also runs every
planned site once against the dense reference on the example inputs.

Wiring (in lcpass/cli/__init__.py)::

    optimize_cmd.add_parser(sub)        # registers "optimize", sets func=optimize_cmd.run

Example::

    >>> import argparse
    >>> sub = argparse.ArgumentParser().add_subparsers()
    >>> _ = add_parser(sub)
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any, Sequence

from lcpass.export import check_output_path
from lcpass.optimize import optimize
from lcpass.plan import Plan
from lcpass.verify import verify_model
from lcpass.zoo.pretrained import resolve_model

__all__ = ["add_parser", "run", "parse_params"]

EXAMPLES = """examples:
  lcpass optimize llama-tiny --method streaming --param sink=4 --param window=64 --out plan.json
  lcpass optimize smollm2 --method streaming --param window=1020 --out smollm2-streaming.json
  lcpass optimize ./my-hf-model --method duo --param recent=256 --dense-first 2 --out plan.json
  lcpass optimize mypkg.models:build --method s2 --out plan.json --verify --dense-below 0
then:  lcpass.optimize(model, plan="plan.json")  or  torch.compile(model, backend="lcpass",
       options={"plan": "plan.json"})
"""


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``["sink=4", "ratio=0.5", "retrieval=true"]`` -> ``{"sink": 4, "ratio": 0.5, "retrieval": True}``.

    Values are read as JSON (numbers, true/false), anything else stays a string.

    Example::

        >>> parse_params(["sink=4", "window=1020"])
        {'sink': 4, 'window': 1020}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param {item!r} is not key=value; write e.g. --param window=1024")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``optimize`` sub-command on an argparse sub-parsers object."""
    p = subparsers.add_parser(
        "optimize",
        help="plan a model's attention with a method, write the plan, print the report",
        description="Capture MODEL, detect its attention sites, plan every head with --method (and its "
        "--param values), write the plan JSON to --out and print the report: sites rewritten, lowering, "
        "expected attention work and KV bytes versus dense.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="zoo name, 'smollm2', a local Hugging Face folder, or 'module:factory'")
    p.add_argument("--method", required=True, help="attention method (see `lcpass methods`)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter, repeatable (e.g. --param sink=4 --param window=1024)")
    p.add_argument("--out", required=True, help="where to write the plan JSON")
    p.add_argument("--dense-first", type=int, default=0, metavar="N", help="keep the first N layers dense")
    p.add_argument("--dense-last", type=int, default=0, metavar="N", help="keep the last N layers dense")
    p.add_argument("--dense-below", type=int, default=None, metavar="LEN",
                   help="verify: run dense below this key length instead of the method's crossover")
    p.add_argument("--report-len", type=int, default=8192, metavar="LEN",
                   help="sequence length of the report's expected work and KV bytes (default 8192)")
    p.add_argument("--verify", action="store_true",
                   help="run every planned site once against the dense reference and print the errors")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Plan, write, report; ValueError (one line) on bad input, before any model is loaded where possible."""
    params = parse_params(args.param)
    # unknown method / parameter: fail before loading
    request = Plan.request(args.method, None, params, door="lcpass optimize", method_flag="--method NAME",
                           plan_flag="a plan", dense_first=args.dense_first, dense_last=args.dense_last)
    out = check_output_path(args.out, "lcpass optimize")
    resolved = resolve_model(args.model)
    model = optimize(resolved.model, plan=request, example_inputs=resolved.example_inputs,
                     dense_below=args.dense_below, report_len=args.report_len)
    plan = getattr(model, "lcpass_plan", None)
    if not isinstance(plan, Plan):
        raise ValueError(f"no attention found in {args.model!r}; nothing to plan (see `lcpass inspect {args.model}`)")
    plan = Plan(plan.sites, replace(plan.fingerprint, model=resolved.name))  # one capture: optimize's own
    plan.save(out)
    report = model.lcpass_report
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        report.print()
        print(f"plan written to {out}")
    if args.verify:
        rep = verify_model(model, resolved.example_inputs)
        for site, err in rep.items():
            flag = "  OVER BOUND" if site in rep.failed else ""
            print(f"verify {site}: max abs error {err:.3g} (bound {rep.bounds[site]:.3g}){flag}")
        for site, why in rep.skipped.items():
            print(f"verify {site}: skipped ({why})")
        if not rep and not rep.skipped:
            print("verify: no planned site ran sparse on the example inputs (shorter than the crossover; "
                  "pass --dense-below 0 to check the method's own lowering)")
        if rep.failed:
            raise ValueError(f"verify: sites over their error bound: {', '.join(rep.failed)}")
    return 0
