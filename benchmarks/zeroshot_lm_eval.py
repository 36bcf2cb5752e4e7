"""Check `lopper eval --tasks` against lm-eval called directly: the same model (lopper's load_model), lm-eval's HFLM,
the task configs lopper generates for --task-data, lm_eval.simple_evaluate with the same limit and batch. Prints
every metric of both and exits 1 unless all are identical.

    lopper eval MODEL --tasks lambada,piqa --task-data DIR --limit 200 --batch 16 --json lopper.json
    python benchmarks/zeroshot_lm_eval.py MODEL lopper.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from lopper import zeroshot
from lopper.io import load_model


def direct(model_path: str, names: list[str], task_data: str, limit: int | None, batch: int) -> dict:
    """lm-eval's own run: task -> {metric: value} (metric names without lm-eval's ',none' filter suffix)."""
    model, tok, _ = load_model(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        manager = TaskManager(include_path=str(zeroshot.write_task_configs(names, task_data, Path(tmp))),
                              include_defaults=False)
        out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=batch), tasks=names,
                              task_manager=manager, limit=limit, log_samples=False)
    return {t: {k.split(",")[0]: v for k, v in m.items() if "," in k} for t, m in out["results"].items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("lopper_json", help="written by `lopper eval --tasks ... --task-data ... --json`")
    a = parser.parse_args()
    zs = json.loads(Path(a.lopper_json).read_text())["zeroshot"]
    names = list(zs["tasks"])
    theirs = direct(a.model, names, zs["task_data"], zs["limit"], zs["batch"])
    same = True
    for task in names:
        for metric, value in theirs[task].items():
            ours = zs["tasks"][task].get(metric)
            same &= ours == value
            verdict = "same" if ours == value else "DIFFERENT"
            print(f"{task:16s} {metric:20s} lopper {ours!r:24} lm_eval {value!r:24} {verdict}")
    print("identical" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
