"""Zero-shot accuracy of several models on the same examples, with paired differences (not run in CI).

Every model runs lm-eval's tasks on the same first --limit examples of each task (lopper.zeroshot, local data), and
each example's main metric (0/1) is kept, so that two cuts are compared example by example: the standard error of
a paired difference is far smaller than that of either accuracy. Retention beside every average: the pruned
average over the first model's (the unpruned one), and the share of its margin above chance that is kept.

    python benchmarks/zeroshot_paired.py --models unpruned=/tmp/smollm2 kl=/tmp/s25kl d75=/tmp/s25d75 \
        --limit 1000 --json docs/zeroshot_paired_smollm2_25.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from lopper import zeroshot
from lopper.io import load_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "zeroshot"
TASKS = "lambada,hellaswag,piqa,arc_easy,arc_challenge"
# Accuracy of a uniform guess: LAMBADA's open cloze has none to speak of, HellaSwag and ARC four choices (ARC has a
# few with three or five), PIQA two.
CHANCE = {"lambada_openai": 0.0, "hellaswag": 0.25, "piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[], help="NAME=FOLDER; the first is the unpruned reference")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", default="")
    p.add_argument("--render", default="", help="write the Markdown of this JSON result beside it, and stop")
    a = p.parse_args()
    if not a.render and not (len(a.models) >= 2 and a.json):
        p.error("give two or more --models and --json (or --render RESULT.json)")
    return a


def paired(a: list[float], b: list[float]) -> dict:
    d = [x - y for x, y in zip(a, b)]
    return {"mean": statistics.fmean(d), "stderr": statistics.stdev(d) / math.sqrt(len(d)), "n": len(d)}


def paired_average(a: dict, b: dict, tasks: list[str]) -> dict:
    """The difference of the task-averaged accuracies and its standard error: the tasks' examples are independent,
    so the variance is the sum of the per-task paired variances over the number of tasks squared."""
    per = [paired(a[t], b[t]) for t in tasks]
    return {"mean": statistics.fmean(p["mean"] for p in per),
            "stderr": math.sqrt(sum(p["stderr"] ** 2 for p in per)) / len(per)}


def retention(avg: float, base: float, chance: float) -> dict:
    return {"of_average": avg / base, "of_margin_above_chance": (avg - chance) / (base - chance)}


def main() -> None:
    a = parse()
    if a.render:
        return render(a.render)
    names = zeroshot.task_list(a.tasks)
    t0, runs = time.time(), {}
    for spec in a.models:
        name, folder = spec.split("=", 1)
        model, tok, _ = load_model(folder)
        runs[name] = {"folder": folder, **zeroshot.run(model, tok, names, str(DATA), a.limit, a.batch, quiet=True,
                                                        per_example=True)}
        print(f"{name}: average {runs[name]['average']:.4f} ({runs[name]['seconds']:.0f} s)", flush=True)
        del model
    first = next(iter(runs))
    tasks = [t for t in names if all(t in r["per_example"] for r in runs.values())]
    chance = statistics.fmean(CHANCE.get(t, 0.0) for t in tasks)
    for name, r in runs.items():
        r["retention"] = retention(r["average"], runs[first]["average"], chance)
        r["vs"] = {other: paired_average(r["per_example"], o["per_example"], tasks)
                   for other, o in runs.items() if other not in (name, first)}
    result = {"command": "python benchmarks/zeroshot_paired.py --models " + " ".join(a.models)
              + f" --tasks {a.tasks} --limit {a.limit} --batch {a.batch} --json {a.json}",
              "tasks": tasks, "chance_average": chance, "runs": runs,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "transformers": transformers.__version__},
              "seconds": round(time.time() - t0, 1)}
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    render(a.json)


def render(path: str) -> None:
    r = json.loads(Path(path).read_text())
    runs, tasks = r["runs"], r["tasks"]
    first = next(iter(runs))
    lines = [f"# Zero-shot, paired: {', '.join(runs)}", "", f"`{r['command']}`", "",
             f"lm-eval {next(iter(runs.values()))['lm_eval_version']}, the first {runs[first]['limit']} examples of "
             "each task (all where fewer), main metric per task (lopper.zeroshot.MAIN_METRIC). Retention: average "
             f"over {first}'s, and the share of its margin above chance ({r['chance_average']:.3f}) kept.", "",
             "| model | " + " | ".join(tasks) + " | average | retention | of margin |",
             "|---|" + "---:|" * (len(tasks) + 3)]
    for name, run in runs.items():
        cells = [f"{run['tasks'][t][run['tasks'][t]['main']]:.3f}" for t in tasks]
        ret = run["retention"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {run['average']:.4f} | {ret['of_average']:.1%} | "
                     f"{ret['of_margin_above_chance']:.1%} |")
    lines += ["", "Paired differences of the average (row minus column, standard error in brackets):", ""]
    for name, run in runs.items():
        for other, d in run["vs"].items():
            if list(runs).index(other) > list(runs).index(name):
                lines.append(f"- {name} - {other}: {d['mean']:+.4f} ({d['stderr']:.4f})")
    m = r["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, transformers "
              f"{m['transformers']}; {r['seconds']:.0f} s.", ""]
    Path(path).with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
