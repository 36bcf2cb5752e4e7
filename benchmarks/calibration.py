"""Which calibration text? (not run in CI) The default `lopper prune MODEL --params F` once per calibration text,
everything else the same, the model loaded once (float32, CPU). Perplexity of each cut on WikiText-2 raw test (the
reported split, first --max-tokens tokens in 512-token windows) and on two held-out domains that no candidate
contains (the last 200,000 characters of english/abc.txt, news, and english/movie_reviews.txt, reviews; first
10,240 tokens each), so that a text is not chosen for matching WikiText alone.

    python benchmarks/calibration.py --model SMOLLM2.gguf \
        --texts builtin=src/lopper/data/calibration.txt inaugural=../shared/data/english/inaugural.txt \
                webtext=../shared/data/english/webtext.txt --self-generated --no-repair webtext \
        --json docs/calibration.json --doc docs/calibration.md

`--self-generated` adds the model's own samples as calibration text (Williams et al. 2025, "Self-calibration for
language model quantization and pruning"), as `lopper prune --calib self` draws them (text.generated_windows). `--no-repair NAME ...` adds the same cut without the repair for those texts.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
import transformers

from lopper.api import Selection, make_plan, resolve_repair, run_repair
from lopper.evaluate import count_params, perplexity
from lopper.io import load_model, model_source
from lopper.surgery import apply, silenced
from lopper.text import calibration_windows, generated_windows

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--params", type=float, default=0.25)
    p.add_argument("--texts", nargs="+", default=[f"builtin={ROOT / 'src/lopper/data/calibration.txt'}"],
                   help="NAME=PATH calibration texts")
    p.add_argument("--self-generated", action="store_true")
    p.add_argument("--no-repair", nargs="*", default=[], help="NAMEs also cut without the repair")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=20480)
    p.add_argument("--work", default="/tmp/lopper-calibration")
    p.add_argument("--json", default="")
    p.add_argument("--doc", default="")
    return p.parse_args()


def held_out(work: Path) -> dict[str, tuple[Path, int]]:
    work.mkdir(parents=True, exist_ok=True)
    out = {"wikitext-2 test": (SHARED / "wikitext-2-raw" / "wiki.test.raw", 0)}
    for name in ("abc", "movie_reviews"):
        tail = work / f"{name}_tail.txt"
        tail.write_text((SHARED / "english" / f"{name}.txt").read_text()[-200_000:])
        out[f"{name} (tail)"] = (tail, 10240)
    return out


def main() -> None:
    a = parse()
    source = model_source(a.model, "")
    model, tok, adapter = load_model(source)
    evals = held_out(Path(a.work))
    base = count_params(model, adapter)["params_non_embedding"]
    runs = [(name, path, "lsq") for name, path in (t.split("=", 1) for t in a.texts)]
    runs += [(name, path, "none") for name, path in (t.split("=", 1) for t in a.texts) if name in a.no_repair]
    if a.self_generated:
        runs.append(("self-generated", None, "lsq"))
    results = [{"calibration": "unpruned", **{k: perplexity(model, tok, f, 512, n or a.max_tokens, quiet=True)
                                                 ["perplexity"] for k, (f, n) in evals.items()}}]
    for name, path, repair in runs:
        t0 = time.time()
        args = resolve_repair(Selection(model=source, params=a.params, repair=repair, calib=path or "",
                                        calib_samples=a.calib_samples, seq_len=a.seq_len, quiet=True), tok)
        windows = generated_windows(model, tok, a.calib_samples, a.seq_len) if path is None else \
            calibration_windows(tok, path, a.calib_samples, a.seq_len)
        trial = copy.deepcopy(model)
        trial_adapter = type(adapter)(trial)
        with silenced():
            p = make_plan(args, trial, trial_adapter, windows)
            if args.repair == "lsq":
                run_repair(args, trial, trial_adapter, p, windows, quiet=True)
            apply(trial, trial_adapter, p)
        row = {"calibration": name, "repair": args.repair, "path": path,
               "removed": round(1 - count_params(trial, trial_adapter)["params_non_embedding"] / base, 4),
               "dropped_layers": sorted(set(range(len(adapter.layers()))) - set(p.layers))}
        row.update({k: perplexity(trial, tok, f, 512, n or a.max_tokens, quiet=True)["perplexity"]
                    for k, (f, n) in evals.items()})
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        results.append(row)
    report = {"model": source, "params": a.params, "calib_samples": a.calib_samples, "seq_len": a.seq_len,
              "max_tokens": a.max_tokens, "results": results,
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "threads": torch.get_num_threads()}}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    if a.doc:
        cols = list(evals)
        lines = ["| calibration | repair | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
        lines += [f"| {r['calibration']} | {r.get('repair', '')} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |"
                  for r in results]
        Path(a.doc).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
