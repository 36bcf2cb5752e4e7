"""Zero-shot accuracy through lm-evaluation-harness (`lopper eval --tasks`).

lm-eval's own task definitions (prompts, answer choices, metrics and their stderr) run on the model that lopper's
`load_model` returns, so the figures are the ones papers report, and lopper's non-standard layouts are measured too.
`--task-data DIR` switches only the data source to local files: each task gets a generated config that includes
lm-eval's definition and points `dataset_path: json` at a file; where the local format differs from the hub dataset
lm-eval expects, the rows are rewritten field by field into the hub format (never re-prompted), so lm-eval's own
templates and `process_docs` build the same requests as from the hub."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import tempfile
import time
from pathlib import Path

from .errors import LopperError, one_line

ALIASES = {"lambada": "lambada_openai"}
# The metric averaged across tasks: acc_norm (log-likelihood per byte of the answer, so long answers are not
# penalised) for HellaSwag, PIQA and ARC-Challenge; acc for LAMBADA (one target word) and ARC-Easy. Papers differ in
# this choice, so acc and acc_norm both stay in the results.
MAIN_METRIC = {"lambada_openai": "acc", "hellaswag": "acc_norm", "piqa": "acc_norm", "arc_easy": "acc",
               "arc_challenge": "acc_norm"}
# lm-eval's definition file of each standard task, relative to lm_eval/tasks/
DEFINITIONS = {"lambada_openai": "lambada/lambada_openai.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
               "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml"}
SPLITS = ("training_split", "validation_split", "test_split")
INSTALL = 'pip install "lopper[eval]"'


def lm_eval_dir() -> Path:
    """Where lm-eval's task definitions are; LopperError with the install command when lm-eval is missing (it is an
    optional dependency: pruning does not need it)."""
    try:
        import lm_eval.tasks
    except ImportError:
        raise LopperError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    return Path(lm_eval.tasks.__file__).parent


def task_list(spec: str) -> list[str]:
    """'lambada, piqa' -> lm-eval task names in the order given, short names expanded, repeats dropped."""
    names = [ALIASES.get(n.strip(), n.strip()) for n in spec.split(",") if n.strip()]
    if not names:
        raise LopperError(f"--tasks {spec!r} names no task: e.g. --tasks lambada,hellaswag,piqa,arc_easy,arc_challenge")
    return list(dict.fromkeys(names))


def check(tasks: str, task_data: str = "", limit: int = 0, batch: int = 1) -> list[str]:
    """Everything about --tasks that can be refused before the model is loaded; returns the task names."""
    names = task_list(tasks)
    lm_eval_dir()
    if limit < 0:
        raise LopperError(f"--limit {limit} is negative: give the number of examples per task (0: all)")
    if batch < 1:
        raise LopperError(f"--batch {batch} must be at least 1")
    if task_data:
        other = [n for n in names if n not in LOCAL]
        if other:
            raise LopperError(f"--task-data has no local layout for {', '.join(other)}: it covers "
                              f"{', '.join(LOCAL)} (drop --task-data to read the others from the hub)")
        for name in names:
            for rel in LOCAL[name][1]:
                if not (Path(task_data) / rel).is_file():
                    raise LopperError(f"--task-data {task_data} lacks {rel} (for {name}): see docs/zeroshot.md for "
                                      "the layout")
    return names


# ---- local data in lm-eval's hub formats ---------------------------------------------------------------------------
def read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    """The rows of a JSON-lines file, each checked for `keys`: a wrong file is refused here, with its line, rather
    than failing inside lm-eval."""
    rows = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LopperError(f"{path} line {k} is not JSON ({e.msg}): give a JSON-lines file")
        missing = [key for key in keys if not isinstance(row, dict) or key not in row]
        if missing:
            raise LopperError(f"{path} line {k} lacks {', '.join(missing)}: see docs/zeroshot.md for the format")
        rows.append(row)
    if not rows:
        raise LopperError(f"{path} has no rows")
    return rows


def split_context(ctx: str) -> tuple[str, str]:
    """The hub keeps an ActivityNet context's unfinished last phrase apart (ctx_a 'A man is sitting on a roof.',
    ctx_b 'he') and lm-eval capitalises it ('... roof. He'); the local ctx has both joined ('... roof. he'), so the
    phrase is split off again after the last sentence end. WikiHow contexts (the article title 'How to ...' first,
    whole sentences) have an empty ctx_b on the hub."""
    if ctx.startswith("How to ") and ctx.endswith((".", "?", "!", '"', "'", ")")):
        return ctx, ""
    match = re.match(r"(.*[.!?]) (.*)$", ctx)
    return (match.group(1), match.group(2)) if match else ("", ctx)


def hellaswag_doc(row: dict) -> dict:
    """Local {"ind","ctx","endings","label"} (ctx = "activity_label: context", already preprocessed) -> the hub
    fields lm-eval's hellaswag utils read. Its preprocessing runs once more on text that had it already, which changes
    nothing but the few bracketed phrases the local conversion kept and lm-eval removes from the hub text too."""
    label, _, ctx = row["ctx"].partition(": ")
    ctx_a, ctx_b = split_context(ctx)
    return {"ind": row.get("ind"), "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b,
            "endings": row["endings"], "label": str(row["label"])}


def arc_doc(row: dict) -> dict:
    """llm-foundry's {"query": "Question: ...", "choices", "gold"} -> the hub's ai2_arc fields, so lm-eval's
    'Question: {{question}}\\nAnswer:' gives the same text. llm-foundry padded 3-choice questions to 4 by putting a
    copy of a distractor first; dropping it restores the hub's 3 choices and so the same requests."""
    choices, gold = list(row["choices"]), int(row["gold"])
    if choices[0] in choices[1:] and gold != 0:
        choices, gold = choices[1:], gold - 1
    labels = [chr(ord("A") + i) for i in range(len(choices))]
    return {"question": row["query"].removeprefix("Question: "), "choices": {"text": choices, "label": labels},
            "answerKey": labels[gold]}


def lambada_docs(folder: Path) -> list[dict]:
    """OpenAI's {"text"} rows are exactly EleutherAI/lambada_openai's."""
    return [{"text": r["text"]} for r in read_jsonl(folder / LOCAL["lambada_openai"][1][0], ("text",))]


def hellaswag_docs(folder: Path) -> list[dict]:
    rows = read_jsonl(folder / LOCAL["hellaswag"][1][0], ("ctx", "endings", "label"))
    return [hellaswag_doc(r) for r in rows]


def piqa_docs(folder: Path) -> list[dict]:
    """The authors' copy keeps the labels in a separate file, one per line; the hub row has them as `label`."""
    rows = read_jsonl(folder / "piqa/valid.jsonl", ("goal", "sol1", "sol2"))
    labels = (folder / "piqa/valid-labels.lst").read_text().split()
    if len(labels) != len(rows):
        raise LopperError(f"{folder}/piqa/valid-labels.lst has {len(labels)} labels for {len(rows)} rows of "
                          "valid.jsonl: give the matching pair")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)} for r, y in zip(rows, labels)]


def arc_docs(name: str):
    return lambda folder: [arc_doc(r) for r in read_jsonl(folder / LOCAL[name][1][0], ("query", "choices", "gold"))]


# task -> (the split lm-eval scores, files under --task-data, reader of the rows in the hub format)
LOCAL = {
    "lambada_openai": ("test", ("lambada/lambada_test.jsonl",), lambada_docs),
    "hellaswag": ("validation", ("hellaswag/hellaswag_val.jsonl",), hellaswag_docs),
    "piqa": ("validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), piqa_docs),
    "arc_easy": ("test", ("arc/arc_easy.jsonl",), arc_docs("arc_easy")),
    "arc_challenge": ("test", ("arc/arc_challenge.jsonl",), arc_docs("arc_challenge")),
}


def local_config(name: str, data_file: Path, cache: Path) -> dict:
    """lm-eval's definition of `name` with only the data source switched: the json loader on one file, scored as
    the split the definition scores; the other splits are unset (they would be looked up and are not in the file;
    zero-shot never reads them). The datasets cache goes to the temporary folder, not the user's HF cache."""
    split = LOCAL[name][0]
    key = {"train": "training_split", "validation": "validation_split", "test": "test_split"}[split]
    config = {"include": str(lm_eval_dir() / DEFINITIONS[name]), "task": name, "dataset_path": "json",
              "dataset_name": None, "dataset_kwargs": {"data_files": {split: str(data_file)}, "cache_dir": str(cache)}}
    return config | {s: None for s in SPLITS} | {key: split}


def write_task_configs(names: list[str], task_data: str, folder: Path) -> Path:
    """One YAML per task in `folder` (for TaskManager(include_path=folder)), beside its data in the hub format."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        data_file = folder / f"{name}.jsonl"
        rows = LOCAL[name][2](Path(task_data))
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        config = local_config(name, data_file, folder / "datasets-cache")
        (folder / f"{name}.yaml").write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
    return folder


def task_manager(names: list[str], task_data: str, folder: Path):
    """Indexing all of lm-eval's ~15k task files takes ~15 s, so only the folders needed are indexed: the generated
    configs, or the folders of the standard tasks' definitions; the whole index only for other task names."""
    from lm_eval.tasks import TaskManager

    if task_data:
        return TaskManager(include_path=str(write_task_configs(names, task_data, folder)), include_defaults=False)
    if any(n not in DEFINITIONS for n in names):
        return TaskManager()
    return TaskManager(include_path=sorted({str((lm_eval_dir() / DEFINITIONS[n]).parent) for n in names}),
                       include_defaults=False)


def load_tasks(manager, names: list[str], task_data: str) -> None:
    """Build the tasks once before the run, so that unknown names and data that cannot be read are refused with
    the fix, not met as a traceback inside the evaluation (it builds them again, reading the datasets cache)."""
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise LopperError(f"--tasks: lm-eval has no task {', '.join(map(repr, unknown))}: use lambada, hellaswag, "
                          "piqa, arc_easy, arc_challenge or a name from `lm-eval ls tasks`")
    try:
        manager.load(names)
    except OSError as e:  # datasets' not-found and offline errors, network errors, missing files
        where = f"--task-data {task_data}" if task_data else "the Hugging Face hub (no network or HF cache here?)"
        raise LopperError(f"cannot load the data of --tasks {','.join(names)} from {where} ({one_line(e)}): give "
                          "--task-data DIR with local copies (layout: docs/zeroshot.md)") from None


def run(model, tokenizer, names: list[str], task_data: str = "", limit: int = 0, batch: int = 1,
        quiet: bool = False, per_example: bool = False) -> dict:
    """lm_eval.simple_evaluate on lm-eval's tasks (local data with `task_data`), the model wrapped in lm-eval's
    HFLM as it is (lopper's layouts included); returns per task the metrics with stderr, n and the average. With
    `per_example`, also each task's main metric per example in document order ("per_example": {task: [0/1, ...]}),
    so that two models scored on the same examples can be compared pairwise."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if quiet:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        import datasets
        datasets.disable_progress_bars()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="lopper-tasks-") as tmp:
        manager = task_manager(names, task_data, Path(tmp))
        load_tasks(manager, names, task_data)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch)
        # lm-eval's progress bars take no switch (tqdm reads TQDM_DISABLE at import): quiet sends them nowhere
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit or None,
                                          log_samples=per_example)
    result = {**summarize(out, names), "limit": limit or None, "task_data": task_data or None, "batch": batch,
              "seconds": round(time.time() - t0, 2), "lm_eval_version": lm_eval.__version__}
    if per_example:
        result["per_example"] = {task: [float(d[result["tasks"][task]["main"]]) for d in
                                        sorted(docs, key=lambda d: d["doc_id"])]
                                 for task, docs in out["samples"].items() if result["tasks"][task]["main"]}
    return result


def summarize(out: dict, names: list[str]) -> dict:
    """lm-eval's {"results": {task: {"acc,none": x, "acc_stderr,none": s}}} -> {task: {"acc": x, "acc_stderr": s,
    "n": examples scored, "main": the averaged metric}}, and the mean of the main metrics over the asked tasks."""
    tasks = {}
    for task, metrics in out["results"].items():
        row = {k.split(",")[0]: v for k, v in metrics.items() if "," in k}
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        tasks[task] = {**row, "n": n, "main": main_metric(task, row)}
    used = {n: tasks[n]["main"] for n in names if n in tasks and tasks[n]["main"]}
    average = sum(tasks[n][m] for n, m in used.items()) / len(used) if used else None
    return {"tasks": tasks, "average": average, "average_of": used}


def main_metric(task: str, metrics: dict) -> str | None:
    """MAIN_METRIC for the standard tasks; else acc_norm, else acc; None (left out of the average) for neither."""
    if task in MAIN_METRIC:
        return MAIN_METRIC[task]
    return next((m for m in ("acc_norm", "acc") if isinstance(metrics.get(m), (int, float))), None)


def table(zs: dict) -> str:
    """A markdown table: one row per task, value ± stderr of acc, acc_norm and perplexity, the main metric starred."""
    cols = ("acc", "acc_norm", "perplexity")

    def cell(row, m):
        if not isinstance(row.get(m), (int, float)):
            return ""
        s = row.get(f"{m}_stderr")
        err = f" ± {s:.4f}" if isinstance(s, (int, float)) else ""
        return f"{row[m]:.4f}{err}{' *' if row['main'] == m else ''}"

    lines = ["| task | n | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for task, row in zs["tasks"].items():
        lines.append(f"| {task} | {row['n'] if row['n'] is not None else ''} | "
                     + " | ".join(cell(row, m) for m in cols) + " |")
    if zs["average"] is not None:
        lines.append(f"average of the starred metrics ({len(zs['average_of'])} tasks): {zs['average']:.4f}")
    lines.append(f"limit {zs['limit'] or 'none'}, batch {zs['batch']}, {zs['seconds']:.0f} s, lm-eval "
                 f"{zs['lm_eval_version']}, data: {zs['task_data'] or 'hub'}")
    return "\n".join(lines)
