"""`lcpass methods`: list the registered attention methods (table, or JSON with --json).

Wiring (in lcpass/cli/__init__.py):

    sub = parser.add_subparsers(dest="command")
    methods_cmd.add_parser(sub)          # registers "methods", sets func=methods_cmd.run
    args = parser.parse_args(["methods", "--json"])
    sys.exit(args.func(args))

Example:
    >>> import argparse
    >>> run(argparse.Namespace(json=True)) == 0   # doctest: +ELLIPSIS
    [...
    True
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lcpass.methods import Method, list_methods

_PHASE_ORDER = ("prefill", "decode", "kv")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``methods`` sub-command on an argparse sub-parsers object."""
    p = subparsers.add_parser(
        "methods",
        help="list the attention methods lcpass can plan",
        description="List every registered attention method: paper, parameters with defaults and "
        "ranges, whether it needs calibration, the phases it sparsifies, and its crossover length.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
    return p


def method_record(m: Method) -> dict[str, Any]:
    """JSON-friendly description of one method."""
    return {
        "name": m.name,
        "paper": m.paper,
        "summary": m.summary,
        "kind": m.kind,
        "phases": [p for p in _PHASE_ORDER if p in m.phases],
        "needs_calibration": m.needs_calibration,
        "crossover": m.crossover,
        "crossover_why": m.crossover_why,
        "params": [
            {"name": p.name, "type": p.type, "default": p.default, "low": p.low, "high": p.high, "doc": p.doc}
            for p in m.params
        ],
    }


def run(args: argparse.Namespace) -> int:
    """Print the method table (or JSON when ``args.json``) to stdout; return 0."""
    methods = list_methods()
    if getattr(args, "json", False):
        print(json.dumps([method_record(m) for m in methods], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lcpass attention methods", show_lines=True)
    table.add_column("method", style="bold")
    table.add_column("paper")
    table.add_column("parameters (default)")
    table.add_column("calibration")
    table.add_column("phases")
    table.add_column("crossover", justify="right")
    for m in methods:
        params = "\n".join(f"{p.name}={p.default!r}" for p in m.params) or "-"
        phases = " ".join(p for p in _PHASE_ORDER if p in m.phases)
        calibration = "yes" if m.needs_calibration else "no"
        table.add_row(m.name, m.paper, params, calibration, phases, str(m.crossover))
    Console(file=sys.stdout, width=160, soft_wrap=False).print(table)
    return 0
