"""README.md stays a first screen, and every figure it shows is in a JSON result under docs/ (results are data: a
number typed by hand, or left behind when its benchmark was re-run, fails here)."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)x?(?!\w|\.\d)")  # 0.83x is a figure; Q4_1, 135M, v2 are names
SCALES = (1, 1e-6, 1e-9, 100)  # as stored, bytes as MB or GB, a fraction as a percentage


def shown_figures(markdown: str) -> list[str]:
    """The measured figures of a page: every number in a table's body rows, and every decimal in the prose; code
    blocks, inline code and link targets are commands and names, not figures."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    found = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        table = [ln for ln in lines if ln.startswith("|")]
        for ln in table[2:]:  # below the header and the |---| row
            found += [n for cell in ln.split("|")[2:] for n in NUMBER.findall(cell)]
        found += [n for ln in lines if not ln.startswith("|") for n in NUMBER.findall(ln) if "." in n]
    return found


def json_values(*docs) -> list[float]:
    """Every number (not a boolean) anywhere inside the JSON documents `docs`."""
    out: list[float] = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            out.append(float(x))

    for d in docs:
        walk(d)
    return out


def json_numbers(folder: Path) -> set[tuple[int, float]]:
    """(decimals, value) for every number in every JSON file under `folder`, rounded to 0-4 decimals at each scale."""
    values = json_values(*(json.loads(path.read_text()) for path in folder.rglob("*.json")))
    return {(d, round(x * s, d)) for x in values for s in SCALES for d in range(5)}


def unsupported(markdown: str, numbers: set[tuple[int, float]]) -> list[str]:
    out = []
    for n in shown_figures(markdown):
        decimals = len(n.split(".")[1]) if "." in n else 0
        if (decimals, float(n)) not in numbers:
            out.append(n)
    return out


def test_every_readme_figure_is_in_a_json_result():
    numbers = json_numbers(ROOT / "docs")
    readme = (ROOT / "README.md").read_text()
    assert len(shown_figures(readme)) >= 10, "the README shows measured figures; the scan found too few"
    assert unsupported(readme, numbers) == []


def test_a_figure_typed_by_hand_is_caught():
    numbers = json_numbers(ROOT / "docs")
    page = "| model | ppl |\n|---|---:|\n| a | 22.58 |\n| b | 22.59 |\n\nThe cut is 0.8311x the input; see `0.123`.\n"
    assert unsupported(page, numbers) == ["22.59", "0.8311"]


def test_readme_fits_a_first_screen_budget():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 8192
    commands = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert "lopper demo" in commands[0] and "python -m pytest" in commands[1]


def test_every_link_between_the_pages_resolves():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for link in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if not link.startswith(("http://", "https://")):
                assert (page.parent / link).exists(), f"{page.relative_to(ROOT)} links to {link}, which does not exist"
