"""Allocation benchmark (not run in CI): uniform vs global per-layer widths on ref-llama, same parameter count.

One calibration pass (activation scores, block influence), then for each case: choose the plan, least-squares
repair (--repair lsq) on a copy, cut, WikiText-2 raw test perplexity (512-token windows, --max-tokens 30720 on CPU:
the first 60). Cases (see cases()): uniform vs global (raw and layer-mean normalized scores, lopper.allocate) for
--params 0.25 and --mlp 0.5, then global at other depth shares and --min-keep 0.5. Writes JSON (rewritten after
every case) and prints one line per case. Results: docs/allocation.md.

    python benchmarks/allocation.py --max-tokens 30720 --json docs/allocation.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from lopper import allocate
from lopper.evaluate import count_params, perplexity, planned_params
from lopper.importance import collect, width_scores
from lopper.io import load_model
from lopper.repair import repair
from lopper.select import Target, _fill_width, choose, default_round_to
from lopper.surgery import apply, silenced
from lopper.text import calibration_windows

SHARED = Path(__file__).resolve().parents[2] / "shared"


def cases(args) -> list[dict]:
    """Most telling first (a run on a busy CPU may be cut short): --params 0.25 at half the cut
    by depth (lopper's default share when this ran; 0.75 now) and MLP 0.5, uniform vs global with both normalizations, then global (raw) at other depth shares and
    a higher --min-keep."""
    def c(cut, alloc="global", norm="raw", least=0.25, share=None):
        return {"cut": cut, "allocation": alloc, "normalize": norm, "min_keep": least,
                **({} if share is None else {"share": share})}
    p = "params 0.25, depth share {}".format
    out = [c(p(0.5), norm="mean", share=0.5), c("mlp 0.5", "uniform"), c("mlp 0.5", norm="mean"),
           c(p(0.5), share=0.5), c("mlp 0.5")]
    out += [c(p(s), share=s) for s in args.shares if s != 0.5]
    out += [c("mlp 0.5", least=0.5), c(p(0.5), least=0.5, share=0.5), c(p(0.5), "uniform", share=0.5)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "models/ref-llama"))
    ap.add_argument("--calib", default=str(SHARED / "data/english/webtext.txt"))
    ap.add_argument("--eval-text", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"))
    ap.add_argument("--max-tokens", type=int, default=30720)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.75, 0.25, 0.0])
    ap.add_argument("--only", default="", help="run only cases whose cut contains this")
    ap.add_argument("--start", type=int, default=0, help="skip the first cases (resume a run cut short)")
    ap.add_argument("--json", default="docs/allocation.json")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tok, adapter = load_model(args.model, "cpu", "float32")
    windows = calibration_windows(tok, args.calib, 32, 256)
    stats = collect(model, adapter, windows, quiet=True)
    scores = width_scores(adapter, stats, "activation")
    base = count_params(model, adapter)["params_non_embedding"]
    k = default_round_to(adapter.hidden_size())
    n = len(adapter.layers())
    results = []
    for case in cases(args)[args.start:]:
        if args.only and args.only not in case["cut"]:
            continue
        t0 = time.time()
        allocate.NORMALIZE = case["normalize"]
        t = Target(round_to=k, allocation=case["allocation"], min_keep=case["min_keep"])
        if "share" in case:
            t.drop_layers = max(0, min(n - 2, round(case["share"] * 0.25 * n)))
            _, plan = _fill_width(model, adapter, t, stats, scores, 0.25)
        else:
            t.mlp = 0.5
            plan = choose(adapter, t, stats, scores)
        removed = 1 - planned_params(model, type(adapter), plan)["params_non_embedding"] / base
        trial = copy.deepcopy(model)
        trial_adapter = type(adapter)(trial)
        with silenced():
            repair(trial, trial_adapter, plan, windows, quiet=True)
            apply(trial, trial_adapter, plan)
        ppl = perplexity(trial, tok, args.eval_text, 512, args.max_tokens, quiet=True)["perplexity"]
        widths = plan.widths()
        row = {**case, "drop_layers": t.drop_layers, "mlp_frac": round(t.mlp, 4), "heads_frac": t.heads,
               "removed": round(removed, 4), "perplexity": round(ppl, 2),
               "mlp_widths": [widths[i].get("mlp") for i in plan.layers],
               "kv_widths": [widths[i].get("kv_heads") for i in plan.layers], "seconds": round(time.time() - t0, 1)}
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("mlp_widths", "kv_widths")}), flush=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
