"""The HTML report page: written by prune, redrawn by `lopper report`, every table figure from the report JSON."""
from __future__ import annotations

import json
import re

import pytest

import lopper
from lopper.cli import main
from lopper.report import render
from test_readme import json_values

pytest.importorskip("matplotlib")
FAST = dict(calib_samples=4, seq_len=16, quiet=True)


def table_numbers(page: str) -> list[str]:
    cells = re.findall(r"<td>(.*?)</td>", page)
    return [n for c in cells for n in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])", c)]


def shown_in(n: str, values: list[float]) -> bool:
    """`n` as printed is one of `values` at the precision it is printed with."""
    x = float(n)
    if "e" in n:
        return any(abs(v - x) <= abs(x) * 1e-3 for v in values)
    d = len(n.split(".")[1]) if "." in n else 0
    return any(round(v, d) == x for v in values)


@pytest.fixture(scope="module")
def pruned(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    lopper.prune(model=str(model_dir("llama", layers=6, mlp=64)), out=str(out), params=0.3, round_to=4, **FAST)
    return out


def test_prune_writes_the_page_with_every_panel(pruned):
    page = (pruned / "lopper_report.html").read_text()
    assert page.count("<svg") == 3  # layers, widths, candidates
    for heading in ("Before and after", "Layers: importance", "Kept width per layer", "mixes the search scored",
                    "Time per phase"):
        assert heading in page
    assert "Reproduce: <code>lopper prune " in page and "--params 0.3" in page and "--round-to 4" in page
    assert "<script" not in page and not re.search(r'(src|href)="https?:', page)  # nothing to fetch: SVG inline
    assert len(page.encode()) < 1_000_000


def test_every_number_in_the_tables_is_the_reports(pruned):
    report = json.loads((pruned / "lopper_report.json").read_text())
    page = (pruned / "lopper_report.html").read_text()
    numbers = table_numbers(page)
    values = json_values(report)
    assert len(numbers) > 20
    assert [n for n in numbers if not shown_in(n, values)] == []
    assert str(report["params_after"]) in numbers and str(report["size_bytes_after"]) in numbers


def test_a_number_not_in_the_report_is_caught(pruned):
    report = json.loads((pruned / "lopper_report.json").read_text())
    page = (pruned / "lopper_report.html").read_text().replace(
        f"<td>{report['params_after']}</td>", f"<td>{report['params_after'] + 1}</td>", 1)
    assert [n for n in table_numbers(page) if not shown_in(n, json_values(report))] == [str(report["params_after"] + 1)]


def test_lopper_report_redraws_the_page(pruned, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["report", str(pruned), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["html"] == str(out)
    assert out.read_text() == (pruned / "lopper_report.html").read_text()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "has no lopper_report.json" in capsys.readouterr().err


def test_a_heal_gets_its_loss_curve(pruned):
    report = json.loads((pruned / "lopper_report.json").read_text())
    report["heal"] = {"loss_history": [[1, 3.0], [2, 2.5], [3, 2.2]]}
    page = render(report, None)
    assert "<h2>Heal</h2>" in page and page.count("<svg") == 1


def test_eval_and_bench_results_go_on_the_page_as_measured(pruned, tmp_path):
    """`lopper report --eval E.json --bench B.json`: the pruned model's perplexity and zero-shot scores (with standard
    errors) and the measured speed-ups beside their limits, every figure one of those files'."""
    report = json.loads((pruned / "lopper_report.json").read_text())
    ev = {"perplexity": 57.95151915046318, "zeroshot": {"tasks": {"piqa": {
        "acc_norm": 0.583, "acc_norm_stderr": 0.0115, "main": "acc_norm", "n": 1000}}, "average": 0.583}}
    bench = {"ratios": [{"model": "a"}, {"model": "/x/pruned", "prefill_speedup": 1.31, "prefill_limit": 1.33,
                                         "decode_speedup_batch_1": 1.18, "decode_limit": 1.25}]}
    (tmp_path / "e.json").write_text(json.dumps(ev))
    (tmp_path / "b.json").write_text(json.dumps(bench))
    out = tmp_path / "page.html"
    lopper_main = main(["report", str(pruned), "--out", str(out), "--eval", str(tmp_path / "e.json"),
                        "--bench", str(tmp_path / "b.json")])
    assert lopper_main == 0
    page = out.read_text()
    assert "Quality of the pruned model" in page and "Speed against the original" in page
    assert "<td>57.95</td>" in page and "<td>0.0115</td>" in page and "<td>1.31</td>" in page
    assert [n for n in table_numbers(page) if not shown_in(n, json_values(report, ev, bench))] == []
