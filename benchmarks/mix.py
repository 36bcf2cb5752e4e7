"""Does the --params search pick the mix that generalises? (not run in CI) For one model and level, every depth share
of lopper.select.SEARCH_SHARES is planned as `lopper prune MODEL --params F --depth-share S` would plan it, scored
as the search scores it (KL and cross-entropy on held-back calibration windows after a short repair), then cut
and repaired as the real run is (all calibration windows) and measured on WikiText-2 raw test, window by window,
so that differences between mixes are paired over the same windows and carry a standard error.

    python benchmarks/mix.py --model /tmp/smollm2 --params 0.25 --json docs/mix_smollm2_25.json
    python benchmarks/mix.py --render docs/mix_smollm2_25.json     # the Markdown table beside it, from the JSON

The model is loaded once (float32, CPU), calibrated once (lopper's defaults: 64 x 256 self-generated tokens),
scored once; each candidate is cut on a copy.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from lopper.api import PruneArgs, calibration, candidate_score, resolve_repair, run_repair
from lopper.evaluate import calibration_loss, count_params, teacher_outputs
from lopper.importance import collect, width_scores
from lopper.io import load_model
from lopper.select import SEARCH_HELD, SEARCH_SHARES, default_round_to, solve_params
from lopper.surgery import apply, silenced
from lopper.text import BUILTIN, calibration_windows, read_text, token_stream

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="")
    p.add_argument("--render", default="", help="write the Markdown of this JSON result beside it, and stop")
    p.add_argument("--params", type=float, default=0.25)
    p.add_argument("--shares", type=float, nargs="+", default=list(SEARCH_SHARES))
    p.add_argument("--windows", type=int, default=80, help="WikiText-2 test windows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--json", default="")
    p.add_argument("--diagnose", type=int, default=0, help="also the KL of each cut before its repair (held-out "
                   "calibration windows) and the KL before and after it on the first N WikiText-2 windows")
    p.add_argument("--held", type=int, default=0, help="also the KL after the repair, window by window, on N further "
                   "self-generated windows and on N windows of the built-in calibration text (real text the repair "
                   "never saw): which held-out set ranks the mixes as WikiText-2 does, and with what standard error")
    p.add_argument("--no-short", action="store_true", help="skip the short-repair kl / loss scores (two repairs "
                   "per candidate)")
    p.add_argument("--keep", default="", help="an earlier result of the same model and level: its candidates' "
                   "search scores and WikiText-2 figures are carried over (the same calibration gives the same cut)")
    a = p.parse_args()
    if not a.render and not (a.model and a.json):
        p.error("give --model and --json (or --render RESULT.json)")
    return a


@torch.no_grad()
def window_nll(model, ids: list[torch.Tensor]) -> list[float]:
    """Mean next-token negative log-likelihood of each window."""
    out = []
    for x in ids:
        logits = model(input_ids=x).logits[0, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits, x[0, 1:]).item())
    return out


@torch.no_grad()
def window_kl(teacher, student, ids: list[torch.Tensor]) -> list[float]:
    """Mean per-token KL(teacher || student) of each window: the search's criterion, on other text."""
    out = []
    for x in ids:
        t = teacher(input_ids=x).logits[0].float().log_softmax(-1)
        s = student(input_ids=x).logits[0].float().log_softmax(-1)
        out.append((t.exp() * (t - s)).sum(-1).mean().item())
    return out


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a - b over the windows and its standard error (log perplexity: exp(mean) is the ratio)."""
    d = [x - y for x, y in zip(a, b)]
    return {"mean": statistics.fmean(d), "stderr": statistics.stdev(d) / math.sqrt(len(d))}


def render(path: str) -> None:
    r = json.loads(Path(path).read_text())
    w = r["wikitext"]
    lines = [f"# Depth/width mix at {r['params']:.0%}: {r['model']}", "",
             f"`{r['command']}`", "",
             f"Calibration {r['calibration']}; WikiText-2 raw test, first {w['windows']} x {w['seq_len']} tokens; "
             f"unpruned perplexity {w['unpruned_perplexity']:.2f}. kl / loss: what `--params-search kl` / `loss` "
             "score (after a repair on 16 calibration windows, on 8 others); kl full: the KL of the candidate cut "
             "and repaired as `lopper prune` does (all calibration windows) on 8 further self-generated windows; "
             "perplexity: that same model. Paired difference: mean over the windows of the per-window log "
             "perplexity minus the best candidate's, with its standard error.", "",
             "| depth share | layers dropped | MLP kept | removed | kl | loss | kl full | WikiText-2 | paired vs best "
             "(stderr) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in r["candidates"]:
        if "nll" not in c:
            lines.append(f"| {c['depth_share']} | - | - | - | - | - | - | {c['error']} | |")
            continue
        d = c["vs_best_log_ppl"]
        full = f"{c['kl_full']:.4f}" if "kl_full" in c else "-"
        lines.append(f"| {c['depth_share']} | {c['drop_layers']} | {c['widths'].get('mlp', '-')} | "
                     f"{c['removed']:.2%} | {_f(c, 'kl')} | {_f(c, 'loss')} | {full} | {c['perplexity']:.2f} | "
                     f"{d['mean']:+.4f} ({d['stderr']:.4f}) |")
    diag = [c for c in r["candidates"] if "kl_cut" in c]
    if diag:
        n = len(diag[0]["kl_wiki"])
        lines += ["", f"Before and after the repair (KL to the unpruned model; self: the 8 held-out calibration windows; "
                  f"WikiText-2: its first {n} windows):", "",
                  "| depth share | self, cut | self, repaired | WikiText-2, cut | WikiText-2, repaired | WikiText-2 "
                  "perplexity |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['depth_share']} | {c['kl_cut']:.4f} | {c['kl_full']:.4f} | "
                  f"{statistics.fmean(c['kl_cut_wiki']):.4f} | {statistics.fmean(c['kl_wiki']):.4f} | "
                  f"{c['perplexity']:.2f} |" for c in diag]
    lines += _held_table(r)
    m, picks = r["machine"], r["search_picks"]
    lines += ["", f"Best on WikiText-2: share {r['best_on_wikitext']}; the kl search picks "
              f"{picks.get('kl', '-')}, the loss search {picks.get('loss', '-')}, kl full "
              f"{r['search_picks'].get('kl_full', '-')} (over every share here; the "
              "search itself scores width only and half by depth, then deeper while depth wins). "
              f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, transformers {m['transformers']}; "
              f"{r['seconds']:.0f} s.", ""]
    Path(path).with_suffix(".md").write_text("\n".join(lines))


def _f(row: dict, key: str) -> str:
    return f"{row[key]:.4f}" if key in row else "-"


def _held_table(r: dict) -> list[str]:
    """KL after the repair on each held-out set, mean and paired against the candidate best on WikiText-2."""
    ok = [c for c in r["candidates"] if "kl_self" in c]
    if not ok:
        return []
    best = next(c for c in ok if c["depth_share"] == r["best_on_wikitext"])
    sets = [k for k in ("kl_self", "kl_builtin", "kl_wiki") if k in best]
    names = {"kl_self": "self-generated", "kl_builtin": "built-in text", "kl_wiki": "WikiText-2"}
    lines = ["", f"KL after the repair on held-out windows ({', '.join(f'{names[k]} {len(best[k])}' for k in sets)}), "
             "mean, and paired against the share best on WikiText-2 (mean difference, standard error):", "",
             "| depth share | " + " | ".join(names[k] for k in sets) + " |", "|---:|" + "---:|" * len(sets)]
    for c in ok:
        cells = []
        for k in sets:
            d = paired(c[k], best[k])
            cells.append(f"{statistics.fmean(c[k]):.4f} ({d['mean']:+.4f}, {d['stderr']:.4f})")
        lines.append(f"| {c['depth_share']} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    a = parse()
    if a.render:
        return render(a.render)
    torch.manual_seed(0)
    t0 = time.time()
    model, tok, adapter = load_model(a.model)
    args = resolve_repair(PruneArgs(model=a.model, out="unused", params=a.params, quiet=True), tok)
    args = replace(args, calib="self")
    windows = calibration(replace(args, calib_samples=args.calib_samples + max(SEARCH_HELD, a.held)), model, tok)
    windows, extra = windows[:args.calib_samples], windows[args.calib_samples:]  # the first 64 as the prune's
    held = {"self": extra[:a.held], "builtin": calibration_windows(tok, BUILTIN, a.held, args.seq_len)} if a.held else {}
    extra = extra[:SEARCH_HELD]
    kept = {c["depth_share"]: c for c in json.loads(Path(a.keep).read_text())["candidates"]} if a.keep else {}
    stats = collect(model, adapter, windows, quiet=True)
    scores = width_scores(adapter, stats, args.width_metric)
    target = args.target()
    target.round_to = default_round_to(adapter.hidden_size())
    stream = token_stream(tok, read_text(WIKI, "--text"))
    test = [stream[k * a.seq_len:(k + 1) * a.seq_len][None] for k in range(a.windows)]
    base = json.loads(Path(a.keep).read_text())["unpruned_nll"] if a.keep else window_nll(model, test)
    reference = teacher_outputs(model, extra, log_probs=True)
    kl, ce = candidate_score(args, model, adapter, windows, "kl"), candidate_score(args, model, adapter, windows)
    rows = []
    for share in a.shares:
        t = time.time()
        try:
            plan = solve_params(model, adapter, replace(target), stats, scores, a.params, shares=(share,))
        except Exception as e:  # a share this model's layers cannot reach
            rows.append({"depth_share": share, "error": str(e)})
            continue
        row = {"depth_share": share, "drop_layers": plan.meta["params"]["choice"]["drop_layers"],
               "removed": plan.meta["params"]["removed"]}
        if share in kept and "nll" in kept[share]:
            row.update({k: kept[share][k] for k in ("kl", "loss", "search_seconds", "nll")})
        elif not a.no_short:
            row.update({"kl": kl(plan), "loss": ce(plan), "search_seconds": round(time.time() - t, 1)})
        trial, p = copy.deepcopy(model), copy.deepcopy(plan)
        trial_adapter = type(adapter)(trial)
        if a.diagnose:  # the same cut before any repair: does the repair's gain carry to other text?
            cut = copy.deepcopy(model)
            cut_adapter = type(adapter)(cut)
            with silenced():
                apply(cut, cut_adapter, copy.deepcopy(plan))
            row["kl_cut"] = calibration_loss(cut, extra, reference)
            row["kl_cut_wiki"] = window_kl(model, cut, test[:a.diagnose])
            del cut
        with silenced():
            run_repair(args, trial, trial_adapter, p, windows, quiet=True)
            apply(trial, trial_adapter, p)
        row["widths"] = {k: v for k, v in trial_adapter.layer_widths(trial_adapter.layers()[0]).items()}
        row["params_non_embedding"] = count_params(trial, trial_adapter)["params_non_embedding"]
        row["kl_full"] = calibration_loss(trial, extra, reference)  # the saved cut, on windows it never saw
        row.setdefault("nll", window_nll(trial, test))
        if a.diagnose:
            row["kl_wiki"] = window_kl(model, trial, test[:a.diagnose])
        for name, ids in held.items():
            row[f"kl_{name}"] = window_kl(model, trial, ids)
        row["perplexity"] = math.exp(statistics.fmean(row["nll"]))
        row["seconds"] = round(time.time() - t, 1)
        print(f"share {share}: {row['drop_layers']} layers, kl {row.get('kl', math.nan):.4f}, "
              f"loss {row.get('loss', math.nan):.4f}, kl after the full repair {row['kl_full']:.4f}, "
              f"wikitext {row['perplexity']:.2f} ({row['seconds']} s)", flush=True)
        rows.append(row)
        del trial
        write(a, rows, base, windows, t0)
    write(a, rows, base, windows, t0)


def write(a: argparse.Namespace, rows: list[dict], base: list[float], windows, t0: float) -> None:
    """The JSON (and its Markdown) of the candidates measured so far: written after each, so a long run that is
    stopped keeps what it measured."""
    ok = [r for r in rows if "nll" in r]
    best = min(ok, key=lambda r: r["perplexity"])
    for r in ok:
        r["vs_best_log_ppl"] = paired(r["nll"], best["nll"])
    picked = {m: min((r for r in ok if m in r), key=lambda r: r[m])["depth_share"] for m in ("kl", "loss", "kl_full")
              if any(m in r for r in ok)}
    picked.update({m: min((r for r in ok if m in r), key=lambda r: statistics.fmean(r[m]))["depth_share"]
                   for m in ("kl_self", "kl_builtin", "kl_wiki") if any(m in r for r in ok)})
    flags = [f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))
             for k, v in vars(a).items() if v not in ("", None)]
    result = {
        "command": "python benchmarks/mix.py " + " ".join(flags),
        "model": a.model, "params": a.params, "calibration": f"{len(windows)} x {windows[0].shape[1]} self-generated",
        "wikitext": {"windows": a.windows, "seq_len": a.seq_len, "unpruned_perplexity": math.exp(statistics.fmean(base))},
        "unpruned_nll": base, "candidates": rows, "best_on_wikitext": best["depth_share"], "search_picks": picked,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "seconds": round(time.time() - t0, 1),
    }
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    render(a.json)

if __name__ == "__main__":
    main()
