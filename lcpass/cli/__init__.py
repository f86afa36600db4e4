"""The ``lcpass`` command line: one sub-command per job.

    lcpass demo                                   the end-to-end demo on SmolLM2 (the README's main command)
    lcpass inspect MODEL [--route export|dynamo|fx] [--core-aten] [--json]
    lcpass methods [--json]
    lcpass optimize MODEL --method M [--param k=v ...] --out plan.json
    lcpass export MODEL --format onnx|torch --method M --out FILE
    lcpass calibrate MODEL --method duo --out plan.json
    lcpass eval MODEL --methods duo,streaming
    lcpass kernels MODEL --show SITE --method M

Bad input (an unknown model, a path with no model, a model with no attention, bad parameters) prints
one line ``lcpass: error: ...`` and exits with code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from lcpass.cli import (calibrate_cmd, demo_cmd, eval_cmd, export_cmd, inspect_cmd, kernels_cmd, methods_cmd,
                        optimize_cmd)

__all__ = ["main", "build_parser", "UserError"]


class UserError(Exception):
    """An error in what the user asked for: reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcpass",
        description="Find attention in any PyTorch model and make long-context inference fast and lean.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in (demo_cmd, inspect_cmd, methods_cmd, optimize_cmd, export_cmd, calibrate_cmd, eval_cmd, kernels_cmd):
        cmd.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, RuntimeError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"lcpass: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
