"""Structured vs unstructured vs both, at the same number of nonzero non-embedding parameters (not run in CI).

On ../shared/models/ref-llama, with calibration from ../shared/data/english, for each budget (by default 50% and
37.5% of the original nonzero non-embedding parameters):
  structured               lopper.prune(params=1 - budget)
  wanda / sparsegpt        unstructured only (wanda per row, sparsegpt per layer), the fraction that meets the budget
  structured 25% + sgpt    one structured plan (params=0.25), replayed, then sparsegpt to meet the budget
  2:4                      50%: sparsegpt 2:4 alone; 37.5%: structured 25% + sparsegpt 2:4 (near the budget)
  --extra                  structured + lsq repair, wanda + owl, structured 25% + wanda, wanda 2:4
and the unpruned model. Every variant goes through lopper.prune (saved, bf16 like the source) and is reloaded with
lopper.load; perplexity on WikiText-2 raw test: one token stream, non-overlapping 512-token windows, total NLL over
predicted tokens (lopper.evaluate's formula), optionally capped with --max-tokens for CPU runs. Writes a JSON file
(updated after every variant; --resume skips those done) and a Markdown table with the command and the machine.

    python benchmarks/sparsity.py --max-tokens 30720          # CPU: the first 60 windows
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

import lopper
from lopper import sparsity as sp
from lopper.io import load_model
from lopper.surgery import apply
from lopper.text import read_text, token_stream

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
STRUCT_FIRST = 0.25  # the structured share of the combined variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "ref-llama"))
    ap.add_argument("--calib-dir", default=str(SHARED / "data" / "english"))
    ap.add_argument("--calib-chars", type=int, default=60_000, help="characters taken from each calibration file")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--text", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=0, help="cap on evaluated tokens (0: the whole split)")
    ap.add_argument("--budgets", default="0.5,0.375", help="nonzero non-embedding fractions of the original")
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--extra", action="store_true", help="also: structured + lsq repair, wanda + owl, structured + "
                    "wanda, wanda 2:4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default=str(ROOT / "docs" / "sparsity.json"))
    ap.add_argument("--md", default=str(ROOT / "docs" / "sparsity.md"))
    ap.add_argument("--work", default="", help="folder for the pruned models (default: a temporary one)")
    ap.add_argument("--resume", action="store_true", help="keep the variants already in --json")
    args = ap.parse_args()

    results = json.loads(Path(args.json).read_text()) if args.resume and Path(args.json).is_file() else {}
    results.setdefault("variants", {})
    results["setup"] = setup(args)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lopper-sparsity-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calibration.txt"
    calib.write_text(calibration_text(Path(args.calib_dir), args.calib_chars), encoding="utf-8")

    model, tok, adapter = load_model(args.model, args.device, args.dtype)
    stream = token_stream(tok, read_text(args.text, "--text"))
    if args.max_tokens:
        stream = stream[:args.max_tokens]
    base = counts(model, adapter)
    results["setup"]["original"] = base
    del model

    common = dict(model=args.model, calib=str(calib), calib_samples=args.calib_samples, seq_len=args.calib_len,
                  device=args.device, dtype=args.dtype, quiet=True, force=True)
    variants = plan_variants(args, common, base, [float(b) for b in args.budgets.split(",")], work)
    only = set(filter(None, args.only.split(",")))
    for name, budget, kw in variants:
        if only and name not in only or name in results["variants"]:
            continue
        t0 = time.time()
        out = work / name.replace(" ", "_").replace("%", "pct").replace(":", "-").replace("+", "plus")
        if kw is None:
            folder = args.model
            report = {}
        else:
            report = lopper.prune(**common, **kw, out=str(out))
            folder = str(out)
        pruned_s = time.time() - t0
        m, _, a = load_model(folder, args.device, args.dtype)
        c = counts(m, a)
        ppl = perplexity(m, stream, args.seq_len)
        results["variants"][name] = {
            "budget": budget, "args": kw, **c, "nonzero_fraction": c["nonzero_non_embedding"] / base["nonzero_non_embedding"],
            "params_fraction": c["params_non_embedding"] / base["params_non_embedding"], **ppl,
            "sparsity": {k: v for k, v in report.get("sparsity", {}).items() if k not in ("per_layer",)},
            "prune_seconds": round(pruned_s, 1), "eval_seconds": round(time.time() - t0 - pruned_s, 1)}
        print(f"{name:38s} nonzero {c['nonzero_non_embedding'] / base['nonzero_non_embedding']:.4f}  "
              f"ppl {ppl['perplexity']:9.2f}  ({pruned_s:.0f}s + {time.time() - t0 - pruned_s:.0f}s)", flush=True)
        del m
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    Path(args.md).write_text(markdown(results))
    print(f"wrote {args.json} and {args.md}")


def calibration_text(folder: Path, chars: int) -> str:
    """The first `chars` characters of every file in `folder` (sorted), one after another."""
    parts = [f.read_text(encoding="utf-8", errors="replace")[:chars] for f in sorted(folder.glob("*.txt"))]
    if not parts:
        sys.exit(f"no .txt files in {folder}")
    return "\n\n".join(parts)


def counts(model, adapter) -> dict:
    embed = {id(p) for p in adapter.embedding_params()}
    params = {id(p): p for p in model.parameters() if id(p) not in embed}
    return {"params_non_embedding": sum(p.numel() for p in params.values()),
            "nonzero_non_embedding": sp.nonzero_non_embedding(model, adapter),
            "layers": len(adapter.layers())}


def candidate_weights(model_path: str, plan=None) -> tuple[int, int]:
    """(non-embedding parameters, weights that sparsity may zero) of the model, cut to `plan` if given."""
    model, _, adapter = load_model(model_path, "cpu", "float32")
    if plan is not None:
        apply(model, adapter, plan)
    return counts(model, adapter)["params_non_embedding"], sum(t.weight().numel() for t in sp.targets(model, adapter))


def plan_variants(args, common, base, budgets, work: Path) -> list[tuple[str, float | None, dict | None]]:
    """(name, budget, prune keywords) for every variant; the sparsity fractions are solved so that the nonzero
    non-embedding parameters meet the budget (norm weights are non-embedding and stay dense). The combined
    variants replay one structured plan (params=STRUCT_FIRST), chosen once."""
    n0 = base["nonzero_non_embedding"]
    dense, lin = candidate_weights(args.model)
    plan_file = work / "structured_first_plan.json"
    plan = lopper.plan(**{k: v for k, v in common.items()}, params=STRUCT_FIRST, out=str(plan_file))
    dense1, lin1 = candidate_weights(args.model, plan)
    st, first = f"structured {STRUCT_FIRST:.0%}", dict(plan=str(plan_file))
    out = [("unpruned", None, None)]
    for b in budgets:
        s_only = round((dense - b * n0) / lin, 6)  # dense == n0 for a trained model: no exact zeros
        s_comb = round((dense1 - b * n0) / lin1, 6)
        pct = f"{b:.1%}".replace(".0%", "%")
        out += [(f"{pct} structured", b, dict(params=1 - b)),
                (f"{pct} wanda", b, dict(sparsity=s_only, sparsity_criterion="wanda")),
                (f"{pct} sparsegpt", b, dict(sparsity=s_only, sparsity_criterion="sparsegpt", sparsity_scope="layer"))]
        if 0 < s_comb < 1:
            out += [(f"{pct} {st} + sparsegpt", b, dict(**first, sparsity=s_comb, sparsity_criterion="sparsegpt",
                                                        sparsity_scope="layer"))]
        if abs(b - 0.5) < 1e-9:
            out += [("50% sparsegpt 2:4", b, dict(sparsity_pattern="2:4", sparsity_criterion="sparsegpt"))]
        if abs(b - (1 - STRUCT_FIRST) * 0.5) < 1e-9:
            out += [(f"37.5% {st} + sparsegpt 2:4", b, dict(**first, sparsity_pattern="2:4",
                                                             sparsity_criterion="sparsegpt"))]
        if args.extra:
            out += [(f"{pct} structured + lsq repair", b, dict(params=1 - b, repair="lsq")),
                    (f"{pct} wanda + owl", b, dict(sparsity=s_only, sparsity_criterion="wanda",
                                                    sparsity_allocation="owl")),
                    (f"{pct} {st} + wanda", b, dict(**first, sparsity=s_comb, sparsity_criterion="wanda"))]
            if abs(b - 0.5) < 1e-9:
                out += [("50% wanda 2:4", b, dict(sparsity_pattern="2:4", sparsity_criterion="wanda"))]
    return out


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int) -> dict:
    """lopper.evaluate.perplexity on a pre-tokenized stream (tokenized once for all variants)."""
    device = next(model.parameters()).device
    windows = len(stream) // seq_len
    nll = 0.0
    for w in range(windows):
        ids = stream[w * seq_len:(w + 1) * seq_len][None].to(device)
        logits = model(input_ids=ids).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
    count = windows * (seq_len - 1)
    return {"perplexity": math.exp(nll / count), "tokens": count, "windows": windows}


def setup(args) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else None
    return {"command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT),
                                                                       *sys.argv[1:]]),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
                        "lopper": lopper.__version__, "threads": torch.get_num_threads(),
                        "load_average": os.getloadavg()[0]},
            "calibration": f"{args.calib_samples} windows x {args.calib_len} tokens, from the first "
                           f"{args.calib_chars:,} characters of each file in {os.path.relpath(args.calib_dir, ROOT)}",
            "evaluation": f"WikiText-2 raw test, {args.seq_len}-token windows"
                          + (f", first {args.max_tokens:,} tokens" if args.max_tokens else ", whole split")}


def markdown(results: dict) -> str:
    s, base = results["setup"], results["setup"]["original"]
    done = results["variants"]
    first = next(iter(done.values()), {})
    lines = [
        "# Structured vs unstructured sparsity on ref-llama, at equal nonzero parameters", "",
        "Written by `benchmarks/sparsity.py`. Command (from the repository root):", "", "```", s["command"], "```", "",
        f"Machine: {s['machine']['cpu']}, {s['machine']['cores']} cores"
        + (f", GPU {s['machine']['gpu']}" if s["machine"]["gpu"] else ", no GPU")
        + f", torch {s['machine']['torch']}, {s['machine']['threads']} threads, lopper {s['machine']['lopper']}"
        f" (load average {s['machine']['load_average']:.1f} at the start: a shared machine).", "",
        f"Model: ref-llama (16 layers, hidden 384, bf16 checkpoint, {base['params_non_embedding']:,} non-embedding "
        f"parameters). Calibration: {s['calibration']}. Perplexity: {s['evaluation']} "
        f"({first.get('windows', '?')} windows, {first.get('tokens', '?'):,} predicted tokens), float32 on the "
        "device, every pruned model saved by `lopper.prune` (bf16, like the source) and reloaded with `lopper.load`.",
        "", "Budget: nonzero non-embedding parameters as a fraction of the original's (norm weights count and stay "
        "dense). 'structured 25% + X' removes 25% of the non-embedding parameters structurally (`params=0.25`), "
        "then X zeroes what the budget still asks; the 2:4 rows land near, not exactly on, their budget.", "",
        "| variant | nonzero non-emb. | of original | stored non-emb. params | layers | perplexity | prune s |",
        "|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in done.items():  # in the order they ran
        lines.append(f"| {name} | {v['nonzero_non_embedding']:,} | {v['nonzero_fraction']:.4f} | "
                     f"{v['params_non_embedding']:,} | {v['layers']} | {v['perplexity']:.2f} | "
                     f"{v['prune_seconds']:.0f} |")
    total = sum(v["prune_seconds"] + v["eval_seconds"] for v in done.values())
    lines += ["", f"'prune s' is the wall time of `lopper.prune` (calibration, scoring, cut, sparsity, save); the "
              f"variants took {total / 60:.0f} minutes in all, pruning and evaluation, on this machine as it was "
              "loaded at the time.", "", "Raw figures: `docs/sparsity.json` (settings and achieved sparsity per "
              "variant).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
