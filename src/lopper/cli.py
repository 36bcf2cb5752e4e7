"""`lopper plan|prune|eval|demo`: flags generated from the argument dataclasses in api.py."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from . import api
from .errors import LopperError

COMMANDS = {
    "plan": (api.PlanArgs, api.plan, "score and choose what to remove; write the plan JSON without cutting"),
    "prune": (api.PruneArgs, api.prune, "prune a model and save a standard checkpoint with plan and report"),
    "eval": (api.EvalArgs, api.evaluate, "parameters, size on disk and perplexity of a model folder"),
}


def add_fields(parser: argparse.ArgumentParser, cls) -> None:
    for f in fields(cls):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if meta.get("positional"):
            parser.add_argument(f.name, help=meta.get("help"))
        elif f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=meta.get("help"))
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=default, choices=meta.get("choices"),
                                required=meta.get("required", False), help=f"{meta.get('help')} (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopper", description="structured pruning of transformer models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_) in COMMANDS.items():
        add_fields(sub.add_parser(name, help=help_, description=help_), cls)
    demo = sub.add_parser("demo", help="prune the built-in all-MiniLM-L6-v2 and print a before/after table")
    demo.add_argument("--out", default="", help="also keep the pruned model in this folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "demo":
            from .demo import run_demo
            run_demo(ns.out)
            return 0
        cls, fn, _ = COMMANDS[ns.command]
        result = fn(cls(**{k: v for k, v in vars(ns).items() if k != "command"}))
    except LopperError as e:
        print(f"lopper: error: {e}", file=sys.stderr)
        return 2
    _print_summary(ns.command, result)
    return 0


def _print_summary(command: str, result) -> None:
    if command == "plan":
        print(json.dumps({"layers_kept": len(result.layers), **result.meta.get("predicted", {})}))
    elif command == "prune":
        keys = ("params_before", "params_after", "params_non_embedding_before", "params_non_embedding_after",
                "size_bytes_before", "size_bytes_after", "standard_checkpoint")
        print(json.dumps({k: result[k] for k in keys if k in result} |
                         {"structures": result["structures"]}, indent=1))
    else:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
