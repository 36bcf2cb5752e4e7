"""`lopper eval --tasks`: lm-eval's own task definitions on local data (tests/data/zeroshot: real rows, the layout of
shared/data/zeroshot). The local rows are rewritten into the hub formats so that lm-eval builds exactly the requests
it builds from the hub; lopper's results equal a direct lm_eval.simple_evaluate run to the last digit."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"  # never download: the hub datasets must be refused, not fetched

import lopper  # noqa: E402
from lopper import zeroshot  # noqa: E402
from lopper.cli import main  # noqa: E402
from lopper.io import load_model  # noqa: E402

DATA = Path(__file__).parent / "data" / "zeroshot"
NAMES = ["lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge"]
TASKS = "lambada,hellaswag,piqa,arc_easy,arc_challenge"
TEXT = ("Fellow citizens of the Senate and of the House of Representatives. Among the vicissitudes incident to life "
        "no event could have filled me with greater anxieties than that of which the notification was transmitted "
        "by your order, and received on the fourteenth day of the present month. ") * 3


@pytest.fixture(scope="module")
def llama(model_dir):
    return model_dir("llama")


@pytest.fixture(scope="module")
def cli_run(llama, tmp_path_factory):
    """One `lopper eval` with perplexity and all five tasks: (JSON written, stdout)."""
    root = tmp_path_factory.mktemp("zeroshot-cli")
    text, out = root / "text.txt", root / "eval.json"
    text.write_text(TEXT)
    capture, errors = root / "stdout.txt", root / "stderr.txt"
    with capture.open("w") as f, errors.open("w") as g:
        old, sys.stdout, old_err, sys.stderr = sys.stdout, f, sys.stderr, g
        try:
            code = main(["eval", str(llama), "--tasks", TASKS, "--task-data", str(DATA), "--limit", "4", "--batch",
                         "2", "--text", str(text), "--seq-len", "32", "--json", str(out), "--quiet"])
        finally:
            sys.stdout, sys.stderr = old, old_err
    assert code == 0
    assert "it/s]" not in errors.read_text() and "%|" not in errors.read_text()  # --quiet: no progress bars
    return json.loads(out.read_text()), capture.read_text()


def built_requests(folder: Path, limit: int = 6) -> dict:
    """task -> doc id -> [(context, continuation)] as lm-eval builds them from the generated configs."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    out = {}
    for name, task in manager.load(NAMES)["tasks"].items():
        task.set_config(key="num_fewshot", value=0)
        task.build_all_requests(limit=limit)
        docs: dict = {}
        for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
            docs.setdefault(inst.doc_id, []).append(inst.args)
        out[name] = (task, docs)
    return out


def choices(context: str, options: list[str]) -> list[tuple[str, str]]:
    return [(context, " " + o) for o in options]


# Hand-written from the hub rows (EleutherAI/lambada_openai, Rowan/hellaswag, baber/piqa, allenai/ai2_arc) and
# lm-eval's templates: what lm-eval asks the model for these docs when it reads the hub.
LAMBADA_0 = ('In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel.\n\n"Figured if '
             "you're going to be out at night getting hit by cars, you might as well have some backup.\"\n\nI look at "
             "him, feeling stunned. Like this is some sort of sign. But as I stare at Harlin, his mouth curved in a "
             "confident grin, I don't care about")
EXPECTED = {
    ("lambada_openai", 0): [(LAMBADA_0, " signs")],
    # hub: ctx_a "A man is sitting on a roof.", ctx_b "he"; lm-eval capitalises ctx_b
    ("hellaswag", 0): choices("Roof shingle removal: A man is sitting on a roof. He",
                              ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                               "is holding a rubik's cube.", "starts pulling up roofing on a roof."]),
    ("hellaswag", 1): choices("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady",
                              ["swings and lands in her arms.", "pulls the barbell forward.",
                               "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."]),
    # an ActivityNet context that starts like a WikiHow title: its last phrase is still ctx_b
    ("hellaswag", 4): choices("Cleaning windows: How to clean your rv windows and mirrors fast without using any "
                              "spray. You",
                              ["also have a bucket that you spray paint a window in.",
                               "can reach for a running water hose and clean the inside of your rv quickly.",
                               "get a wash cloth and you put it under the faucet to get wet and then you rinse it out "
                               "so it's not soaking.",
                               "meticulously clean the window in the glass shop and then take the plastic off and "
                               "start taking the hood off."]),
    ("piqa", 0): choices("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
                         ["Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper "
                          "strips, you will also need to supply it with a water bottle and a food dish.",
                          "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans "
                          "material, you will also need to supply it with a water bottle and a food dish."]),
    ("arc_easy", 0): choices("Question: Which statement best explains why photosynthesis is the foundation of most "
                             "food webs?\nAnswer:",
                             ["Sunlight is the source of energy for nearly all ecosystems.",
                              "Most ecosystems are found on land instead of in water.",
                              "Carbon dioxide is more available than other gases.",
                              "The producers in all ecosystems are plants."]),
    # llm-foundry padded these 3-choice questions with a copy of a distractor put first
    ("arc_easy", 4): choices("Question: When a rock is placed in a graduated cylinder containing water, the height of "
                             "the water will\nAnswer:", ["decrease", "increase", "remain the same"]),
    ("arc_challenge", 0): choices("Question: An astronomer observes that a planet rotates faster after a meteorite "
                                  "impact. Which is the most likely effect of this increase in rotation?\nAnswer:",
                                  ["Planetary density will decrease.", "Planetary years will become longer.",
                                   "Planetary days will become shorter.", "Planetary gravity will become stronger."]),
    ("arc_challenge", 4): choices("Question: A toy truck rolls over a smooth surface. If the surface is covered with "
                                  "sand, the truck will most likely roll\nAnswer:",
                                  ["slower", "faster", "at the same speed"]),
}
GOLD = {("hellaswag", 0): 3, ("hellaswag", 4): 2, ("piqa", 0): 0, ("arc_easy", 0): 0, ("arc_easy", 4): 1,
        ("arc_challenge", 4): 0}


def test_local_rows_give_lm_evals_hub_requests(tmp_path):
    folder = zeroshot.write_task_configs(NAMES, str(DATA), tmp_path / "tasks")
    built = built_requests(folder)
    for (name, doc_id), expected in EXPECTED.items():
        task, docs = built[name]
        assert docs[doc_id] == expected, (name, doc_id)
        if (name, doc_id) in GOLD:
            assert task.doc_to_target(list(task.eval_docs)[doc_id]) == GOLD[name, doc_id]
    # a WikiHow context is whole sentences: the local text is lm-eval's query unchanged
    wikihow = json.loads((DATA / "hellaswag/hellaswag_val.jsonl").read_text().splitlines()[5])
    assert {c for c, _ in built["hellaswag"][1][5]} == {wikihow["ctx"]}
    assert [len(built[n][1]) for n in NAMES] == [5, 6, 5, 5, 5]  # every row became a doc


def test_hellaswag_rows_split_like_the_hub():
    """The first local rows are the hub's validation rows ind 24, 92, 106, 114 (rowanz/hellaswag data)."""
    rows = [json.loads(line) for line in (DATA / "hellaswag/hellaswag_val.jsonl").read_text().splitlines()]
    hub = [("Roof shingle removal", "A man is sitting on a roof.", "he"),
           ("Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole.", "the lady"),
           ("Canoeing", "Two women in a child are shown in a canoe while a man pulls the canoe while standing in "
            "the water, with other individuals visible in the background.", "the child and a different man"),
           ("High jump", "A boy is running down a track.", "the boy")]
    for row, (label, ctx_a, ctx_b) in zip(rows, hub):
        doc = zeroshot.hellaswag_doc(row)
        assert (doc["activity_label"], doc["ctx_a"], doc["ctx_b"]) == (label, ctx_a, ctx_b)
        assert doc["endings"] == row["endings"] and doc["label"] == str(row["label"])
    assert zeroshot.split_context("How to dry a towel. Hang it up.") == ("How to dry a towel. Hang it up.", "")


def test_eval_writes_zero_shot_beside_perplexity(cli_run):
    result, stdout = cli_run
    assert result["perplexity"] > 1 and result["seq_len"] == 32  # --text, in the same result
    zs = result["zeroshot"]
    assert list(zs["tasks"]) == NAMES
    assert (zs["limit"], zs["batch"], zs["task_data"]) == (4, 2, str(DATA)) and zs["seconds"] > 0
    for name, row in zs["tasks"].items():
        assert row["n"] == 4 and row["main"] == zeroshot.MAIN_METRIC[name]
        metrics = ["acc", "perplexity"] if name == "lambada_openai" else ["acc", "acc_norm"]
        for m in metrics:
            assert isinstance(row[m], float) and isinstance(row[f"{m}_stderr"], float), (name, m)
        assert 0.0 <= row["acc"] <= 1.0
    assert zs["average_of"] == zeroshot.MAIN_METRIC
    assert zs["average"] == pytest.approx(sum(zs["tasks"][n][m] for n, m in zeroshot.MAIN_METRIC.items()) / 5)
    for name in NAMES:
        assert f"| {name} | 4 |" in stdout
    assert "average of the starred metrics (5 tasks)" in stdout


def test_result_equals_a_direct_lm_eval_run(cli_run, llama, tmp_path):
    """The same model, HFLM, task configs and limit through lm_eval.simple_evaluate: identical numbers."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok, _ = load_model(str(llama))
    manager = TaskManager(include_path=str(zeroshot.write_task_configs(NAMES, str(DATA), tmp_path / "tasks")),
                          include_defaults=False)
    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=2), tasks=NAMES,
                          task_manager=manager, limit=4)
    ours = cli_run[0]["zeroshot"]["tasks"]
    for name in NAMES:
        direct = {k.split(",")[0]: v for k, v in out["results"][name].items() if "," in k}
        assert {k: ours[name][k] for k in direct} == direct, name
        assert ours[name]["n"] == out["n-samples"][name]["effective"]


def test_bad_task_options_are_refused(llama, model_dir, tmp_path, capsys, monkeypatch):
    cases = [
        ({"tasks": "piqa,winogrande", "task_data": str(DATA)}, ["--task-data has no local layout for winogrande"]),
        ({"tasks": " , "}, ["names no task"]),
        ({"tasks": "piqa", "task_data": str(DATA), "limit": -1}, ["--limit -1"]),
        ({"tasks": "piqa", "task_data": str(DATA), "batch": 0}, ["--batch 0"]),
        ({"limit": 5}, ["--limit and --task-data apply to zero-shot tasks", "--tasks"]),
        ({"tasks": "piqa", "task_data": str(tmp_path)}, ["lacks piqa/valid.jsonl", "docs/zeroshot.md"]),
        ({"tasks": "piqa", "limit": 1}, ["cannot load the data", "--task-data"]),  # the hub, offline
    ]
    for kw, mentions in cases:
        with pytest.raises(lopper.LopperError) as err:
            lopper.evaluate(model=str(llama), quiet=True, **kw)
        assert "\n" not in str(err.value)
        for m in mentions:
            assert m in str(err.value), (kw, str(err.value))
    argv = ["eval", str(llama), "--tasks", "piqa,winogrande", "--task-data", str(DATA), "--quiet"]
    assert main(argv) == 2 and "no local layout for winogrande" in capsys.readouterr().err

    with pytest.raises(lopper.LopperError, match="not a causal LM.*drop --tasks"):
        lopper.evaluate(model=str(model_dir("bert")), tasks="piqa", task_data=str(DATA), quiet=True)

    labels = tmp_path / "short"
    shutil.copytree(DATA, labels)
    (labels / "piqa/valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(lopper.LopperError, match="2 labels for 5 rows"):
        lopper.evaluate(model=str(llama), tasks="piqa", task_data=str(labels), quiet=True)
    (labels / "arc/arc_easy.jsonl").write_text('{"query": "Question: Why?", "choices": ["a", "b"]}\n')
    with pytest.raises(lopper.LopperError, match="arc_easy.jsonl line 1 lacks gold"):
        lopper.evaluate(model=str(llama), tasks="arc_easy", task_data=str(labels), quiet=True)

    from lm_eval.tasks import TaskManager
    folder = zeroshot.write_task_configs(["piqa"], str(DATA), tmp_path / "tasks")
    with pytest.raises(lopper.LopperError, match="lm-eval has no task 'no_such_task'"):
        zeroshot.load_tasks(TaskManager(include_path=str(folder), include_defaults=False), ["no_such_task"], "")

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(lopper.LopperError, match=r'pip install "lopper\[eval\]"'):
        lopper.evaluate(model=str(llama), tasks="piqa", quiet=True)
