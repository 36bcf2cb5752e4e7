"""Healing benchmark (not run in CI): ref-llama pruned to 25% and 50% fewer non-embedding parameters, each healed by
distillation from the unpruned model and by plain fine-tuning on the same tokens of ../shared/data/english (same
order, same settings), with WikiText-2 raw test perplexity (non-overlapping 512-token windows) before pruning,
after pruning and after each heal. Writes JSON and a Markdown table (docs/heal.md) with the exact commands and
the machine.

Each level is pruned with lopper's best retraining-free settings (docs/quality.md): least-squares repair, global
(per-layer) widths where they win (25%), uniform widths with the default depth share where those win (50%; half the cut by depth when docs/heal.md
was measured, three quarters now).

On a GPU, the whole budget (5M tokens):
    python benchmarks/heal.py --device cuda --tokens 5000000
On a 2-core CPU, a smaller budget that still measures healing (about an hour):
    python benchmarks/heal.py --device cpu --tokens 400000 --batch 8 --no-gradient-checkpointing
A CPU smoke run proves that the pipeline works and measures nothing (20k training tokens, 10 evaluation windows):
    python benchmarks/heal.py --smoke
"""
from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHARED / "models" / "ref-llama"))
    p.add_argument("--train-dir", default=str(SHARED / "data" / "english"), help="every *.txt in it is training text")
    p.add_argument("--calib", default=str(SHARED / "data" / "english" / "webtext.txt"))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--eval-text", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    p.add_argument("--eval-max-tokens", type=int, default=0, help="cap on WikiText tokens (0: the whole split)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--allocation", nargs="+", default=["global", "uniform"], choices=("global", "uniform"),
                   help="lopper prune --allocation, one per --fractions entry")
    p.add_argument("--repair", default="lsq", choices=("none", "lsq"))
    p.add_argument("--tokens", type=int, default=0, help="heal tokens (0: one pass over --train-dir)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lora", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="faster where memory allows (CPU)")
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "tmp" / "heal"))
    p.add_argument("--json", default=str(ROOT / "docs" / "heal.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "heal.md"))
    p.add_argument("--smoke", action="store_true", help="CPU, 20k heal tokens, 10 evaluation windows: proves it runs")
    p.add_argument("--from-json", default="", help="only write --doc again from this results JSON")
    a = p.parse_args()
    if a.smoke:
        a.device, a.tokens, a.eval_max_tokens, a.batch = "cpu", a.tokens or 20_000, a.eval_max_tokens or 5120, 4
    if len(a.allocation) != len(a.fractions):
        p.error("give one --allocation per --fractions entry")
    return a


def command(name: str, kwargs: dict) -> str:
    """The `lopper` command line that the keyword call `lopper.<name>(**kwargs)` equals."""
    words = ["lopper", name, str(kwargs["model"])]
    for k, v in kwargs.items():
        if k == "model" or v in ("", False, None):
            continue
        flag = "--" + k.replace("_", "-")
        words += [flag] if v is True else [flag, *map(str, v)] if isinstance(v, list) else [flag, str(v)]
    near = str(ROOT.parent) + os.sep  # paths beside the repository (../shared) as the docs write them
    return " ".join(shlex.quote(os.path.relpath(w, ROOT) if w.startswith(near) else w) for w in words)


def machine(device: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = f"{torch.cuda.get_device_name()}, " if device.startswith("cuda") else ""
    return (f"{gpu}{cpu} ({os.cpu_count()} cores); Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, lopper {lopper.__version__}")


def main() -> int:
    a = parse()
    if a.from_json:
        Path(a.doc).write_text(markdown(json.loads(Path(a.from_json).read_text()), a.from_json))
        return 0
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    train = sorted(str(p) for p in Path(a.train_dir).glob("*.txt"))
    if not train or any(Path(t).resolve() == Path(a.eval_text).resolve() for t in train):
        sys.exit("no training text, or the evaluated split among it")
    ev = dict(text=a.eval_text, seq_len=512, max_tokens=a.eval_max_tokens, device=a.device, quiet=True)
    rows, commands, t_all = [], [], time.time()

    def measure(label: str, folder: str, **extra) -> dict:
        r = lopper.evaluate(model=folder, **ev)
        row = {"model": label, "folder": folder, "params": r["params"],
               "params_non_embedding": r["params_non_embedding"], "perplexity": r["perplexity"],
               "eval_tokens": r["tokens"], **extra}
        rows.append(row)
        commands.append(command("eval", {"model": folder, **{k: v for k, v in ev.items() if k != "quiet"}}))
        print(f"{label}: perplexity {row['perplexity']:.2f}", flush=True)
        return row

    measure("ref-llama (unpruned)", a.model)
    for f, allocation in zip(a.fractions, a.allocation):
        pct = round(f * 100)
        pruned = str(work / f"pruned-{pct}")
        kw = dict(model=a.model, out=pruned, params=f, calib=a.calib, calib_samples=a.calib_samples,
                  device=a.device, force=True, quiet=True)
        kw.update({"allocation": allocation} if allocation != "uniform" else {})
        kw.update({"repair": a.repair} if a.repair != "none" else {})
        t = time.time()
        report = lopper.prune(**kw)
        commands.append(command("prune", kw))
        measure(f"pruned {pct}% ({report['structures']['layers']['after']} layers)", pruned,
                seconds=round(time.time() - t, 1))
        for mode, kd in (("distillation", 1.0), ("fine-tuning", 0.0)):
            kw = dict(model=pruned, teacher=a.model if kd else "", text=train, out=str(work / f"healed-{pct}-{mode}"),
                      tokens=a.tokens, seq_len=a.seq_len, batch=a.batch, grad_accum=a.grad_accum, lr=a.lr,
                      kd_weight=kd, lora=a.lora, device=a.device, force=True, quiet=True,
                      no_gradient_checkpointing=a.no_gradient_checkpointing)
            h = lopper.heal(**kw)["heal"]
            commands.append(command("heal", kw))
            measure(f"pruned {pct}% + {mode}", kw["out"], seconds=h["seconds"], heal_steps=h["steps"],
                    heal_tokens=h["tokens_trained"], heal_loss_first=h["loss_first"], heal_loss_last=h["loss_last"])

    result = {"machine": machine(a.device), "smoke": a.smoke, "settings": vars(a),
              "command": " ".join(["python", "benchmarks/heal.py", *map(shlex.quote, sys.argv[1:])]),
              "train_files": [Path(t).name for t in train], "rows": rows, "commands": commands,
              "seconds": round(time.time() - t_all, 1)}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    Path(a.doc).write_text(markdown(result, a.json))
    print(f"wrote {a.json} and {a.doc}")
    return 0


def markdown(r: dict, json_path: str) -> str:
    rows, a = r["rows"], argparse.Namespace(**r["settings"])
    first = next((x for x in rows if "heal_steps" in x), {})
    lines = ["# Healing after pruning: distillation vs fine-tuning", ""]
    if r["smoke"]:
        lines += ["> **CPU smoke run.** It proves that `benchmarks/heal.py` runs end to end; with "
                  f"{first.get('heal_tokens', 0):,} training tokens and {rows[0]['eval_tokens']:,} evaluated tokens "
                  "its numbers say nothing about healing. The measurement is `python benchmarks/heal.py --device "
                  "cuda` on a GPU.", ""]
    prune = ", ".join(f"{round(f * 100)}%: `--params {f:g}{' --allocation global' if al == 'global' else ''}"
                      f"{' --repair ' + a.repair if a.repair != 'none' else ''}`"
                      for f, al in zip(a.fractions, a.allocation))
    lines += [
        f"ref-llama (`../shared/models/ref-llama`) pruned with `lopper prune` ({prune}; calibration: "
        f"{a.calib_samples} windows of 256 tokens of `{Path(a.calib).name}`), then healed for "
        f"{first.get('heal_tokens', 0):,} tokens ({first.get('heal_steps', 0)} steps, windows of {a.seq_len} tokens, "
        f"global batch {a.batch * a.grad_accum}, AdamW, peak lr {a.lr:g}, 5% warmup then cosine, "
        f"{'LoRA rank %d' % a.lora if a.lora else 'all parameters'}) from `{Path(a.train_dir).name}/*.txt` "
        f"({', '.join(r['train_files'])}), in the same order for both heals: distillation = T^2 KL to the unpruned "
        "model's logits (T = 1, `--kd-weight 1`), fine-tuning = next-token cross-entropy (`--kd-weight 0`).",
        "",
        f"Perplexity: WikiText-2 raw test (never trained on), one token stream, non-overlapping 512-token windows, "
        f"{rows[0]['eval_tokens']:,} predicted tokens.",
        "",
        "| model | params | params (non-emb.) | perplexity | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for x in rows:
        sec = f"{x['seconds']:.0f}" if "seconds" in x else ""
        lines.append(f"| {x['model']} | {x['params'] / 1e6:.2f}M | {x['params_non_embedding'] / 1e6:.2f}M | "
                     f"{x['perplexity']:.2f} | {sec} |")
    lines += ["", f"Machine: {r['machine']}. Total {r['seconds']:.0f} s (seconds: pruning, or healing with loading).",
              "", f"Run: `{r.get('command', 'python benchmarks/heal.py')}`, which made these calls (as CLI commands):",
              "", "```bash", *r["commands"], "```", "",
              f"Raw results: `{os.path.relpath(json_path, ROOT)}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
