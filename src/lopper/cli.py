"""`lopper plan|prune|eval|heal|bench|export|demo`: flags generated from the argument dataclasses in api.py."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING

from . import api, zeroshot
from .errors import LopperError
from .bench import BenchArgs, bench
from .export import ExportArgs, export
from .heal import HealArgs, heal
from .report import ReportArgs, write_report_page
from .options import flag, groups, resolve_args

COMMANDS = {
    "plan": (api.PlanArgs, api.plan, "score and choose what to remove; write the plan JSON without cutting"),
    "prune": (api.PruneArgs, api.prune, "prune a model and save a standard checkpoint with plan and report"),
    "eval": (api.EvalArgs, api.evaluate, "parameters, size on disk, perplexity and zero-shot accuracy (lm-eval) of a "
             "model folder"),
    "heal": (HealArgs, heal, "distil or fine-tune a pruned model toward the original; save a standard checkpoint"),
    "bench": (BenchArgs, bench, "parameters, FLOPs, size, memory, prefill and decode speed of models, with ratios"),
    "export": (ExportArgs, export, "rewrite a pruned model in a layout serving engines read with per-layer widths "
               "(nemotron-nas)"),
    "report": (ReportArgs, write_report_page, "draw a pruned model's report and plan as one HTML page with plots "
               "(needs lopper[report])"),
}


def add_fields(parser: argparse.ArgumentParser, cls) -> None:
    """One argparse group per options group of `cls`. Values stay strings and only the flags given are set
    (argparse.SUPPRESS), so the dataclass converts and checks them as it does for the Python API, and a --config
    recipe fills the rest."""
    for title, group_fields in groups(cls):
        group = parser.add_argument_group(title)
        for f in group_fields:
            meta, name = f.metadata, flag(f.name)
            default = f.default if f.default is not MISSING else None
            many = str(f.type) == "list[str]"
            choices = meta.get("choices")
            metavar = "{" + ",".join(map(str, choices)) + "}" if choices else None
            if meta.get("positional"):
                group.add_argument(f.name, nargs="*" if many else "?", default=argparse.SUPPRESS,
                                   help=meta.get("help"))
            elif f.type in (bool, "bool"):
                group.add_argument(name, action="store_true", default=argparse.SUPPRESS, help=meta.get("help"))
            elif many:
                group.add_argument(name, nargs="+", default=argparse.SUPPRESS, metavar="FILE", help=meta.get("help"))
            else:
                group.add_argument(name, default=argparse.SUPPRESS, metavar=metavar,
                                   help=f"{meta.get('help')} (default: {default})")


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
        result = fn(resolve_args(cls, None, {k: v for k, v in vars(ns).items() if k != "command"}))
    except LopperError as e:
        print(f"lopper: error: {e}", file=sys.stderr)
        return 2
    _print_summary(ns.command, result)
    return 0


def _print_summary(command: str, result) -> None:
    if command == "plan":
        print(json.dumps({"layers_kept": len(result.layers), **result.meta.get("predicted", {})}))
    elif command == "prune":
        print(report_table(result))
    elif command == "heal":
        if result:  # None on the other processes of `accelerate launch`
            section = result.get("heal", result)
            print(json.dumps({k: v for k, v in section.items() if k not in ("loss_history", "args")}, indent=1))
    elif command == "export":
        print(json.dumps({k: v for k, v in result.items() if k not in ("blocks", "args")}, indent=1))
    elif command == "bench":
        if not result["args"]["quiet"]:
            print(result["markdown"])
    elif command == "eval" and "zeroshot" in result:
        print(json.dumps({k: v for k, v in result.items() if k != "zeroshot"}, indent=1))
        print(zeroshot.table(result["zeroshot"]))
    else:
        print(json.dumps(result, indent=1))


def report_table(r: dict) -> str:
    """before -> after for every count the report holds."""
    rows = [("params", r["params_before"], r["params_after"]),
            ("params (non-embedding)", r["params_non_embedding_before"], r["params_non_embedding_after"])]
    if "size_bytes_before" in r:
        rows.append(("weights on disk (MB)", r["size_bytes_before"] / 1e6, r["size_bytes_after"] / 1e6))
    rows += [(k, v["before"], v["after"]) for k, v in r["structures"].items()]
    if "sparsity" in r:
        rows += [("nonzero params (non-embedding)", r["params_non_embedding_before"],
                  r["sparsity"]["nonzero_params_non_embedding"]),
                 (f"sparsity of layer weights ({r['sparsity']['pattern']})", 0.0, r["sparsity"]["overall"])]
    if "perplexity_before" in r:
        rows.append(("perplexity", r["perplexity_before"]["perplexity"], r["perplexity_after"]["perplexity"]))
    if "speedup" in r["plan"]:
        sp = r["plan"]["speedup"]
        rows.append((f"prefill speed-up for --target-speedup {sp['target']} (predicted -> measured)",
                     sp["predicted"], sp["measured"]))
    fmt = lambda v: f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
    lines = ["| | before | after |", "|---|---:|---:|"] + [f"| {n} | {fmt(a)} | {fmt(b)} |" for n, a, b in rows]
    if not r["standard_checkpoint"]:
        lines.append("note: widths outside what the config class can describe; load with lopper.load()")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
