"""Speed of pruned models against the original with `lopper bench` (not run in CI).

Prunes ../shared/models/ref-llama twice (unless the folders exist): 4 of 16 layers dropped, and half of the MLP
channels removed, then runs `lopper bench` on the three and writes a Markdown page with the commands, the machine and
the table (ratios against the original, beside the FLOP- and byte-proportional limits), plus the JSON beside it.

    python benchmarks/speed.py                                   # CPU: writes benchmarks/speed_cpu.md
    python benchmarks/speed.py --device cuda --dtype bfloat16 --out benchmarks/speed_cuda.md
"""
from __future__ import annotations

import argparse
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
REF = "../shared/models/ref-llama"
VARIANTS = {"d4": ["--drop-layers", "4"], "mlp50": ["--mlp", "0.5"]}


def rel(p: Path) -> str:
    p = p.resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def run(cmd: list[str]) -> None:
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/bench", help="where the pruned copies go")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", default="4")
    ap.add_argument("--prompt-len", default="256")
    ap.add_argument("--new-tokens", default="32")
    ap.add_argument("--repeats", default="5")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "speed_cpu.md"))
    ap.add_argument("--machine", default="2-core shared CPU, torch 2.13 CPU; ratios only, absolute times on shared "
                                         "CPUs mean little")
    a = ap.parse_args()
    prune_cmds = [["lopper", "prune", REF, "--out", f"{a.work}/{name}", *flags, "--quiet"]
                  for name, flags in VARIANTS.items()]
    for cmd in prune_cmds:
        if not Path(cmd[4]).is_dir():
            run(cmd)
    out = Path(a.out)
    js = out.with_suffix(".json")
    table = out.with_suffix(".table.md")
    bench_cmd = ["lopper", "bench", REF, *(f"{a.work}/{n}" for n in VARIANTS), "--device", a.device,
                 "--dtype", a.dtype, "--batch", a.batch, "--prompt-len", a.prompt_len, "--new-tokens", a.new_tokens,
                 "--repeats", a.repeats, "--json", rel(js), "--markdown", rel(table), "--quiet"]
    run(bench_cmd)
    body = table.read_text()
    table.unlink()
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    out.write_text(
        f"# Speed of pruned ref-llama ({a.device})\n\n"
        f"Machine: {a.machine} ({cpu}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}).\n\n"
        "Commands (from the repository root):\n\n```\n"
        + "\n".join(shlex.join(c) for c in prune_cmds + [bench_cmd])
        + "\n```\n\n(or `python benchmarks/speed.py`, which runs the same)\n\n" + body + "\n\n"
        "Limits: prefill = FLOPs per token of the original / of the model (2 x non-embedding matmul params + "
        "4 x P x attention width per layer, lm_head excluded); decode = weight bytes of the original / of the model "
        "(every weight, embeddings and lm_head included, is read once per decode step). Speed-ups > 1 mean faster "
        f"than the original. Raw runs: `{js.name}`.\n")
    print(out.read_text())


if __name__ == "__main__":
    sys.exit(main())
