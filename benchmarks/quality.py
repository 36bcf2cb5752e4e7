"""Quality benchmark (not run in CI): pruning criteria compared on ref-llama at equal parameter counts.

At 3, 6 and 8 of 16 layers (18.75%, 37.5%, 50% of the non-embedding parameters) removed:
  depth  ShortGPT block influence, Gromov angular block, SLEB (greedy by calibration loss) drop that many layers;
  width  magnitude and Fisher/Taylor scores cut MLP channels (then heads) to the same parameter count (bisection,
         lopper.select._fill_width, the same routine lopper.prune(params=...) uses), no repair;
  lopper lopper.prune(params=F, repair="lsq", width_metric="activation") (half depth, half width, least-squares
         repair), F = the fraction the depth methods remove.
No method is healed (no training). Calibration: --calib only (32 windows x 256 tokens by default). Quality:
WikiText-2 raw test perplexity, non-overlapping 512-token windows (--max-tokens caps the tokens read: on CPU use
--max-tokens 30720, the first 60 windows). Results go to JSON and a Markdown table with the exact command and machine;
the JSON is rewritten after every measurement, so a run cut short keeps what it measured.

    python benchmarks/quality.py --device cuda                              # the whole split
    python benchmarks/quality.py --max-tokens 30720 --layers 3              # CPU, 18.75% only
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers

import lopper
from lopper.api import Selection, make_plan
from lopper.evaluate import count_params, perplexity, planned_params
from lopper.gradient import fisher_scores
from lopper.importance import collect, width_scores
from lopper.io import load_model
from lopper.repair import repair
from lopper.select import Target, _fill_width, choose, default_round_to
from lopper.sleb import Sleb
from lopper.surgery import apply, silenced
from lopper.text import calibration_windows

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
METHODS = {
    "shortgpt": "ShortGPT block influence (depth)",
    "gromov": "Gromov angular distance, contiguous block (depth)",
    "sleb": "SLEB greedy, calibration loss (depth)",
    "magnitude": "magnitude, sum of abs(W) (width)",
    "fisher": "Fisher / first-order Taylor (width)",
    "lopper": "lopper --params F --repair lsq --width-metric activation",
}
NOT_RUN = {"torch-pruning": "torch-pruning (Fang et al. 2023)", "flap": "FLAP (An et al. 2024)"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHARED / "models" / "ref-llama"))
    p.add_argument("--calib", default=str(SHARED / "data" / "english" / "webtext.txt"))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-text", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=0, help="cap on WikiText tokens (0: the whole split)")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 6, 8], help="layers the depth methods drop")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", default=str(ROOT / "docs" / "quality.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "quality.md"))
    return p.parse_args()


def machine(device: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = f"{torch.cuda.get_device_name()}, " if device.startswith("cuda") else ""
    return (f"{gpu}{cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"lopper {lopper.__version__}")


def rel(path: str) -> str:
    near = str(ROOT.parent) + os.sep
    return os.path.relpath(path, ROOT) if path.startswith(near) else path


def main() -> int:
    a = parse()
    t_start = time.time()
    model, tok, adapter = load_model(a.model, a.device, a.dtype)
    windows = calibration_windows(tok, a.calib, a.calib_samples, a.seq_len)
    n_layers = len(adapter.layers())
    rt = default_round_to(adapter.hidden_size())
    base = count_params(model, adapter)["params_non_embedding"]

    def ppl(m) -> float:
        return perplexity(m, tok, a.eval_text, a.eval_seq_len, a.max_tokens, quiet=True)["perplexity"]

    result = {"command": "python " + " ".join(shlex.quote(rel(w)) for w in [rel(__file__), *sys.argv[1:]]),
              "machine": machine(a.device), "settings": {k: rel(v) if isinstance(v, str) else v
                                                         for k, v in vars(a).items()},
              "params_non_embedding": base, "layers": n_layers, "scoring_seconds": {}, "runs": []}
    t = time.time()
    result["baseline_perplexity"] = ppl(model)
    result["baseline_eval_seconds"] = round(time.time() - t, 1)

    def save() -> None:
        result["seconds"] = round(time.time() - t_start, 1)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        Path(a.doc).write_text(markdown(result, a.json))

    save()
    t = time.time()
    stats = collect(model, adapter, windows, quiet=True)
    result["scoring_seconds"]["forward statistics (bi, angular, magnitude, activation)"] = round(time.time() - t, 1)
    magnitude = width_scores(adapter, stats, "magnitude")
    fisher = None
    if "fisher" in a.methods:
        t = time.time()
        fisher = fisher_scores(model, adapter, windows, quiet=True)
        result["scoring_seconds"]["fisher (one backward per window)"] = round(time.time() - t, 1)
    sleb = Sleb(model, adapter, windows, quiet=True)

    for k in a.layers:
        depth_plan = choose(adapter, Target(drop_layers=k, round_to=rt), stats, magnitude)
        frac = 1 - planned_params(model, type(adapter), depth_plan)["params_non_embedding"] / base
        for method in a.methods:
            t = time.time()
            trial = copy.deepcopy(model)
            trial_adapter = type(adapter)(trial)
            if method in ("shortgpt", "gromov", "sleb"):
                metric = {"shortgpt": "bi", "gromov": "angular", "sleb": "sleb"}[method]
                p = choose(adapter, Target(drop_layers=k, layer_metric=metric, drop_fn=sleb, round_to=rt), stats,
                           magnitude)
            elif method in ("magnitude", "fisher"):
                _, p = _fill_width(model, adapter, Target(round_to=rt), stats,
                                   magnitude if method == "magnitude" else fisher, frac)
            else:
                args = Selection(model=a.model, params=round(frac, 6), repair="lsq", width_metric="activation",
                                 calib=a.calib, calib_samples=a.calib_samples, seq_len=a.seq_len, quiet=True)
                p = make_plan(args, model, adapter, windows)
                with silenced():
                    repair(trial, trial_adapter, p, windows, quiet=True)
            with silenced():
                apply(trial, trial_adapter, p)
            prune_s = time.time() - t
            after = count_params(trial, trial_adapter)["params_non_embedding"]
            t = time.time()
            value = ppl(trial)
            run = {"method": method, "layers_level": k, "target_removed": round(frac, 4),
                   "removed": round(1 - after / base, 4), "perplexity": value,
                   "layers_kept": len(p.layers), "dropped_layers": sorted(set(range(n_layers)) - set(p.layers)),
                   "mlp": len(p.per_layer[p.layers[0]]["mlp"]), "heads": len(p.per_layer[p.layers[0]]["heads"]),
                   "prune_seconds": round(prune_s, 1), "eval_seconds": round(time.time() - t, 1)}
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
            del trial
            save()
    save()
    return 0


def markdown(r: dict, json_path: str) -> str:
    s = r["settings"]
    levels = sorted({x["layers_level"] for x in r["runs"]} or set(s["layers"]))
    n = r["layers"]
    cap = f"first {s['max_tokens']} tokens" if s["max_tokens"] else "the whole split"
    lines = ["# Quality: pruning criteria at equal parameter counts", "",
             f"Model `{rel(s['model'])}` ({n} layers, {r['params_non_embedding']:,} non-embedding parameters), "
             f"no healing. WikiText-2 raw test perplexity ({cap}, non-overlapping {s['eval_seq_len']}-token windows); "
             f"unpruned: **{r['baseline_perplexity']:.2f}**. Calibration: `{rel(s['calib'])}` only, "
             f"{s['calib_samples']} x {s['seq_len']} tokens. Each cell: perplexity (non-embedding parameters "
             "removed). Depth methods drop k layers; width methods (MLP channels, then heads, no repair) and lopper "
             "are matched to the same count.", "",
             "| method | " + " | ".join(f"{k}/{n} layers ({k / n:.2%})" for k in levels) + " |",
             "|---|" + "---:|" * len(levels)]
    for m, label in METHODS.items():
        cells = []
        for k in levels:
            hit = [x for x in r["runs"] if x["method"] == m and x["layers_level"] == k]
            cells.append(f"{hit[0]['perplexity']:.2f} ({hit[0]['removed']:.2%})" if hit else "not run")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label in NOT_RUN.values():
        lines.append(f"| {label} | " + " | ".join("not yet run" for _ in levels) + " |")
    lines += ["", "Details per run (dropped layers, kept widths, seconds) are in "
              f"`{os.path.relpath(json_path, ROOT)}`. Scoring time shared by the runs: "
              + ", ".join(f"{k}: {v} s" for k, v in r["scoring_seconds"].items()) + ".", "",
              f"Command: `{r['command']}`", "",
              f"Machine: {r['machine']}. Total {r.get('seconds', 0):.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
