"""MiniLM healing benchmark (not run in CI; issue #5): all-MiniLM-L6-v2 pruned to 40% fewer encoder FLOPs, then
healed by distilling the unpruned model's sentence embeddings (`lopper heal --encoder-loss cosine`), with the
cosine to the unpruned embeddings and the SST-2 probe accuracy before and after healing.

Cuts (the two strongest of docs/minilm.md, both through lopper.prune): the best baseline, Kwon et al.'s Fisher on a
uniform heads + MLP cut with least-squares repair ("fisher+lsq"), and lopper's best no-training cut, Fisher + lsq on
MLP channels only with 512 calibration windows. Training text: sentences (one per line) that are neither SST-2 dev
nor test: SST-2 train (labels dropped), english/brown.txt and english/movie_reviews.txt, shuffled by the seed, capped
by --tokens. The probe and the cosine are measured exactly as in benchmarks/minilm.py (which this script imports).

    python benchmarks/minilm_heal.py --tokens 250000     # writes docs/minilm_heal.json and docs/minilm_heal.md
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import lopper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm import ROOT, machine, measure, methods, setup  # noqa: E402

ENGLISH = ROOT.parent / "shared" / "data" / "english"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=0.40, help="fraction of encoder FLOPs to remove")
    p.add_argument("--flops-seq-len", type=int, default=128)
    p.add_argument("--train-n", type=int, default=3000, help="SST-2 train sentences for the probe")
    p.add_argument("--tokens", type=int, default=250_000, help="cap on the healing tokens")
    p.add_argument("--seq-len", type=int, default=128, help="a training sentence is cut to this many tokens")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--encoder-loss", default="cosine", choices=("cosine", "mse"))
    p.add_argument("--only", default="", help="heal only the cuts whose name contains this (e.g. 'lopper best')")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory, slower)")
    p.add_argument("--json", default=str(ROOT / "docs" / "minilm_heal.json"))
    p.add_argument("--markdown", default=str(ROOT / "docs" / "minilm_heal.md"))
    return p.parse_args()


CUTS = {"fisher+lsq": "fisher+lsq (best baseline)", "fisher+lsq, 0 heads, 512 windows": "fisher+lsq, 0 heads, 512 "
        "windows (lopper best)"}


def cuts(a: argparse.Namespace) -> dict[str, dict]:
    """The two cuts as benchmarks/minilm.py defines them (the baseline keeping the units its scores chose)."""
    m = methods(a)
    return {label: m[name][1] for name, label in CUTS.items()}


def heal_text(sst2_sentences: Path) -> list[str]:
    """The SST-2 train sentences (no labels; the calibration file) beside the English sentence-per-line corpora."""
    return [str(sst2_sentences), str(ENGLISH / "brown.txt"), str(ENGLISH / "movie_reviews.txt")]


def main() -> None:
    a = parse()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    source, tok, data, work, calib, _ = setup(a.train_n, "lopper-minilm-heal-")
    text = heal_text(calib)
    base, ref = measure(source, tok, data, None, a.flops_seq_len)
    rows = [{"model": "unpruned", **base, "flops_removed": 0.0}]
    commands = []

    def record(label: str, folder: str, **extra) -> None:
        m, _ = measure(folder, tok, data, ref, a.flops_seq_len)
        rows.append({"model": label, **m, "flops_removed": 1 - m["flops_per_token"] / base["flops_per_token"],
                     **extra})
        took = f" ({extra['heal_seconds']:.0f} s)" if "heal_seconds" in extra else ""
        print(f"{label}: cos {m['cosine_mean']:.4f} probe {m['probe_accuracy']:.4f}{took}", flush=True)

    for name, kw in cuts(a).items():
        if a.only not in name:
            continue
        pruned, healed = str(work / f"pruned-{len(rows)}"), str(work / f"healed-{len(rows)}")
        options = {"calib_samples": 128, **kw}
        lopper.prune(model=source, out=pruned, calib=str(calib), seq_len=64, quiet=True, force=True, **options)
        record(name, pruned, cut=kw)
        hk = dict(model=pruned, teacher=source, text=text, out=healed, tokens=a.tokens, seq_len=a.seq_len,
                  batch=a.batch, lr=a.lr, encoder_loss=a.encoder_loss, encoder_data="lines", device="cpu",
                  save_every=0, no_gradient_checkpointing=not a.gradient_checkpointing, force=True, quiet=True)
        h = lopper.heal(**hk)["heal"]
        commands.append("lopper heal PRUNED --teacher MINILM --text " + " ".join(Path(t).name for t in text) + " "
                        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in hk.items()
                                   if k in ("tokens", "seq_len", "batch", "lr", "encoder_loss", "encoder_data")))
        record(f"{name} + heal", healed, cut=kw, heal_tokens=h["tokens_trained"], heal_steps=h["steps"],
               heal_seconds=h["seconds"], heal_loss_first=h["loss_first"], heal_loss_last=h["loss_last"])
    report = {"command": "python " + shlex.join(sys.argv), "machine": machine(), "args": vars(a),
              "heal_text": [Path(t).name for t in text], "heal_commands": commands, "dev_n": len(data["dev_x"]),
              "rows": rows, "seconds": round(time.time() - t0, 1)}
    Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    Path(a.markdown).write_text(markdown(report), encoding="utf-8")
    print(f"wrote {a.json} and {a.markdown}")


def markdown(r: dict) -> str:
    a, base = r["args"], r["rows"][0]
    healed = next((x for x in r["rows"] if "heal_tokens" in x), {})
    lines = [
        "# all-MiniLM-L6-v2 at 40% fewer encoder FLOPs, healed by embedding distillation",
        "",
        f"Command: `{r['command']}` ({r['seconds'] / 60:.0f} min in all).  ",
        f"Machine: {r['machine']}.",
        "",
        f"Cuts as in [minilm.md](minilm.md) (FLOPs per token at P = {a['flops_seq_len']}, encoder layers only). Heal: "
        f"`lopper heal` with `--encoder-loss {a['encoder_loss']}` (1 - cosine between the student's and the "
        f"unpruned model's mean-pooled embeddings), {healed.get('heal_tokens', 0):,} tokens "
        f"({healed.get('heal_steps', 0)} steps of {a['batch']} sentences, at most {a['seq_len']} tokens each, AdamW, "
        f"peak lr {a['lr']:g}, 5% warmup then cosine, all parameters, float32) from {', '.join(r['heal_text'])} "
        "(one sentence per line; SST-2 labels never used). Cosine: to the unpruned embeddings of the "
        f"{r['dev_n']} SST-2 dev sentences (never trained on). Probe: logistic regression on {a['train_n']} SST-2 "
        "train sentences, accuracy on dev (as in minilm.md).",
        "",
        "| model | FLOPs removed | cosine mean | cosine min | probe acc. (dev) | heal seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for x in r["rows"]:
        sec = f"{x['heal_seconds']:.0f}" if "heal_seconds" in x else ""
        lines.append(f"| {x['model']} | {x['flops_removed']:.1%} | {x.get('cosine_mean', 1):.4f} | "
                     f"{x.get('cosine_min', 1):.4f} | {x['probe_accuracy']:.2%} | {sec} |")
    lines += ["", f"Unpruned probe: {base['probe_accuracy']:.2%}. Heal calls (as CLI commands):", "", "```bash",
              *r["heal_commands"], "```", "", "Raw results: `docs/minilm_heal.json`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
