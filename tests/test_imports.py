"""The module graph stays readable: no import circle (lazy imports inside functions count too), no private name
imported across modules, and `options` (argument plumbing) depends on nothing of lopper but its error type."""
from __future__ import annotations

import ast
from pathlib import Path

import lopper

ROOT = Path(lopper.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import of lopper modules in `path`, wherever it stands."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "lopper" or target.startswith("lopper."):
                names = []
                for n in (a.name for a in node.names):  # `from . import sparsity` imports lopper.sparsity
                    path = ROOT.parent / (target + "." + n).replace(".", "/")
                    if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
                        out.append((target + "." + n, []))
                    else:
                        names.append(n)
                if names:
                    out.append((target, names))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("lopper")]
    return out


def graph() -> dict[str, set[str]]:
    g = {}
    for path in ROOT.rglob("*.py"):
        g[module_name(path)] = {t for t, _ in imports(path) if t != module_name(path)}
    return g


def test_no_private_name_is_imported_across_modules():
    bad = [f"{module_name(p)}: from {t} import {n}" for p in ROOT.rglob("*.py") for t, names in imports(p)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "make these public where they live: " + "; ".join(bad)


def test_no_import_circle():
    g = graph()
    # the package's __init__ imports the public modules by design; a module reaching back to it is what counts
    edges = {m: {t for t in ts if t in g and g.get(t) is not None and t != "lopper"} for m, ts in g.items()
             if m != "lopper"}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import circles: " + "; ".join(cycles)
    assert not any("lopper" == t for ts in g.values() for t in ts), "import the module you need, not the package"


def test_options_and_errors_depend_on_nothing_of_lopper():
    g = graph()
    assert g["lopper.errors"] == set()
    assert g["lopper.options"] == {"lopper.errors"}
    assert g["lopper.version"] == set()


def test_the_checker_sees_a_circle_and_a_private_import(tmp_path, monkeypatch):
    """The checks above can fail: a planted circle and a planted private import are found."""
    pkg = tmp_path / "lopper"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from .sub.c import _h\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    monkeypatch.setattr(f"{__name__}.ROOT", pkg)
    with __import__("pytest").raises(AssertionError, match="lopper.a -> lopper.b -> lopper.sub.c -> lopper.a"):
        test_no_import_circle()
    with __import__("pytest").raises(AssertionError, match="from lopper.sub.c import _h"):
        test_no_private_name_is_imported_across_modules()
