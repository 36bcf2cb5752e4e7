"""`lopper report DIR`: the run's report and plan as one self-contained HTML page with plots.

What was cut and why, at a glance: block influence per layer with the dropped and protected layers marked, the kept
width of every structure per layer against the original, the candidate mixes of a --params search with the chosen
one, a heal's loss curve, and the before / after figures with the command that reproduces the run. Every number
in the page's tables is one of lopper_report.json's (tests/test_report.py checks it).

Plots are matplotlib figures written as inline SVG: text, so the page needs no network and no image files, stays
small for bar charts (tens of KB each), and scales when zoomed. matplotlib is the optional extra `lopper[report]`;
without it `prune` writes no page and `lopper report` says what to install.
"""
from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import LopperError
from .gguf_out import beside
from .io import PLAN_FILE, REPORT_FILE, is_gguf
from .options import Options, arg_field, existing, resolve_args
from .plan import Plan

PAGE_FILE = "lopper_report.html"
COLORS = {"kept": "#4477aa", "dropped": "#cc3311", "protected": "#999999", "original": "#dddddd"}


@dataclass(kw_only=True)
class ReportArgs(Options):
    """Report"""

    model: str = arg_field("", "a folder written by `lopper prune` or `lopper heal`, or a .gguf file written by "
                           "`lopper prune --out FILE.gguf`", positional=True)
    out: str = arg_field("", "the HTML file to write (default: lopper_report.html beside the report)")
    eval: str = arg_field("", "a `lopper eval --json` result of the pruned model: its perplexity and zero-shot "
                          "accuracy (with standard errors) go on the page")
    bench: str = arg_field("", "a `lopper bench --json` result of the original and the pruned model: measured "
                           "speed-ups beside their FLOP and byte limits go on the page")
    quiet: bool = arg_field(False, "print nothing")

    def check_group(self) -> None:
        if not self.model:
            raise LopperError("no model given: pass the folder (or .gguf file) that `lopper prune` wrote")
        for name in ("eval", "bench"):
            existing(name, getattr(self, name), f"a JSON file that `lopper {name} --json` wrote")


def sources(model: str) -> tuple[Path, Path]:
    """(report, plan) JSON files of a pruned folder or of a .gguf written by lopper."""
    if is_gguf(model):
        report, plan = beside(model, REPORT_FILE), beside(model, PLAN_FILE)
    else:
        report, plan = Path(model) / REPORT_FILE, Path(model) / PLAN_FILE
    if not report.is_file():
        raise LopperError(f"{model} has no {report.name}: give a folder or .gguf file that `lopper prune` wrote")
    return report, plan


def write_report_page(args: ReportArgs | None = None, /, **kwargs) -> dict:
    """Render the page of a pruned model and write it (atomically); returns {"html": path, "bytes": size}."""
    args = resolve_args(ReportArgs, args, kwargs)
    args.check()
    report_path, plan_path = sources(args.model)
    out = Path(args.out) if args.out else beside(args.model, PAGE_FILE) if is_gguf(args.model) else \
        Path(args.model) / PAGE_FILE
    report = json.loads(report_path.read_text())
    plan = Plan.load(plan_path) if plan_path.is_file() else None
    extra = {name: json.loads(Path(getattr(args, name)).read_text()) for name in ("eval", "bench")
             if getattr(args, name)}
    page = render(report, plan, **extra)
    tmp = out.with_name(f".{out.name}.lopper-tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return {"html": str(out), "bytes": len(page.encode())}


def available() -> bool:
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def render(report: dict, plan: Plan | None, eval: dict | None = None, bench: dict | None = None) -> str:
    """The whole page as one HTML string; `eval` and `bench`: results of `lopper eval --json` / `lopper bench
    --json`, shown where given."""
    if not available():
        raise LopperError("the report page draws its plots with matplotlib: pip install \"lopper[report]\"")
    title = f"lopper: {Path(str(report.get('source', 'model'))).name}"
    parts = [f"<h1>{html.escape(title)}</h1>", _command(report), "<h2>Before and after</h2>", _before_after(report)]
    if eval:
        parts += ["<h2>Quality of the pruned model (lopper eval)</h2>", _eval_table(eval)]
    if bench:
        parts += ["<h2>Speed against the original (lopper bench)</h2>", _bench_table(bench)]
    if plan is not None:
        parts += ["<h2>Layers: importance and what was dropped</h2>", _svg(layers_figure(report, plan)),
                  "<h2>Kept width per layer</h2>", _svg(widths_figure(plan))]
        candidates = plan.meta.get("params", {}).get("candidates", [])
        if len(candidates) > 1:
            parts += ["<h2>Depth / width mixes the search scored</h2>", _svg(candidates_figure(plan)),
                      _candidates_table(plan)]
    if "heal" in report and report["heal"].get("loss_history"):
        parts += ["<h2>Heal</h2>", _svg(loss_figure(report["heal"]))]
    if report.get("phases_seconds"):
        parts += ["<h2>Time per phase (seconds)</h2>", _table(["phase", "seconds"],
                                                              list(report["phases_seconds"].items()))]
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
             "code{background:#f3f3f3;padding:2px 4px}svg{max-width:100%;height:auto}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def _command(report: dict) -> str:
    command = report.get("command")
    return f"<p>Reproduce: <code>{html.escape(command)}</code></p>" if command else ""


def _before_after(report: dict) -> str:
    rows = [("parameters", report.get("params_before"), report.get("params_after")),
            ("parameters (non-embedding)", report.get("params_non_embedding_before"),
             report.get("params_non_embedding_after")),
            ("weights on disk (bytes)", report.get("size_bytes_before"), report.get("size_bytes_after"))]
    before, after = report.get("perplexity_before"), report.get("perplexity_after")
    if before and after:
        rows.append(("perplexity (--eval-text)", round(before["perplexity"], 2), round(after["perplexity"], 2)))
    rows += [(name, s["before"], s["after"]) for name, s in report.get("structures", {}).items()]
    return _table(["", "before", "after"], [r for r in rows if r[1] is not None])


def _eval_table(result: dict) -> str:
    rows = [("perplexity", round(result["perplexity"], 2), "")] if "perplexity" in result else []
    tasks = result.get("zeroshot", {}).get("tasks", {})
    for name, t in tasks.items():
        main = t["main"]
        rows.append((f"{name} {main}", round(t[main], 4), round(t[f"{main}_stderr"], 4)))
    if "average" in result.get("zeroshot", {}):
        rows.append(("zero-shot average", round(result["zeroshot"]["average"], 4), ""))
    return _table(["", "value", "standard error"], rows)


def _bench_table(result: dict) -> str:
    rows = []
    for r in result.get("ratios", [])[1:]:
        rows.append((Path(r["model"]).name, round(r["prefill_speedup"], 3), round(r["prefill_limit"], 3),
                     round(r.get("decode_speedup_batch_1") or 0.0, 3), round(r["decode_limit"], 3)))
    return _table(["model", "prefill speed-up", "FLOP limit", "decode speed-up (batch 1)", "byte limit"], rows)


def _candidates_table(plan: Plan) -> str:
    search = plan.meta["params"]
    metric = search.get("search", "score")
    chosen = search["choice"]["drop_layers"]
    rows = [(c["depth_share"], c["drop_layers"], c["removed"], round(c[metric], 4) if metric in c else "",
             c.get("seconds", ""), "chosen" if c["drop_layers"] == chosen else "") for c in search["candidates"]]
    return _table(["depth share", "layers dropped", "removed", metric, "seconds", ""], rows)


def _table(header: list[str], rows: list) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(v) -> str:
    return str(v) if not isinstance(v, float) else f"{v:g}" if abs(v) >= 1e-4 or v == 0 else f"{v:.3e}"


def _svg(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})  # the same run, the same page
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure(rows: int = 1, height: float = 2.6, ratios: list[float] | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: smaller, searchable
    matplotlib.rcParams["svg.hashsalt"] = "lopper"  # element ids the same on every draw
    fig, axes = plt.subplots(rows, 1, figsize=(9, height * (sum(ratios) if ratios else rows)), squeeze=False,
                             gridspec_kw={"height_ratios": ratios} if ratios else None)
    return fig, [a[0] for a in axes]


def layers_figure(report: dict, plan: Plan):
    """Block influence (1 - cosine of a layer's input and output: how much it changes the residual stream) per layer,
    dropped layers red, protected grey."""
    n = plan.model["num_layers"]
    target = plan.meta.get("target", {})
    protected = set(range(target.get("protect_first", 0))) | set(range(n - target.get("protect_last", 0), n))
    scores = plan.meta.get("block_influence") or [1.0] * n
    kept = set(plan.layers)
    colors = [COLORS["dropped"] if i not in kept else COLORS["protected"] if i in protected else COLORS["kept"]
              for i in range(n)]
    fig, (ax,) = _figure()
    ax.bar(range(n), scores, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("block influence" if plan.meta.get("block_influence") else "(no scores recorded)")
    metric = target.get("layer_metric", "bi")
    ax.set_title(f"{n - len(kept)} of {n} layers dropped (chosen by {metric}); red: dropped, grey: protected")
    return fig


def widths_figure(plan: Plan):
    """For each structure with a per-layer width, the kept count against the original, per original layer."""
    n = plan.model["num_layers"]
    names = [k for k in ("mlp", "heads", "kv_heads", "experts", "expert_mlp", "shared_mlp")
             if isinstance(plan.model.get(k), list) and any(plan.model[k])]
    fig, axes = _figure(len(names) + 1, 2.0, [1.0] * len(names) + [0.35])
    for ax, name in zip(axes, names):
        full = plan.model[name]
        kept = [len(plan.per_layer[i][name]) if i in plan.layers and name in plan.per_layer[i] else
                (full[i] if i in plan.layers else 0) for i in range(n)]
        ax.bar(range(n), full, color=COLORS["original"], label="original")
        ax.bar(range(n), kept, color=COLORS["kept"], label="kept")
        ax.set_ylabel(name)
    hidden_ax = axes[-1]
    hidden_ax.barh([0], [plan.model["hidden"]], color=COLORS["original"])
    hidden_ax.barh([0], [len(plan.hidden)], color=COLORS["kept"])
    hidden_ax.set_yticks([0], ["hidden"])
    axes[0].legend(loc="upper right")
    axes[-2 if names else -1].set_xlabel("layer")
    return fig


def candidates_figure(plan: Plan):
    search = plan.meta["params"]
    metric = search.get("search", "score")
    cands = [c for c in search["candidates"] if metric in c]
    chosen = search["choice"]["drop_layers"]
    fig, (ax,) = _figure()
    ax.plot([c["drop_layers"] for c in cands], [c[metric] for c in cands], "o-", color=COLORS["kept"])
    best = [c for c in cands if c["drop_layers"] == chosen]
    ax.plot([c["drop_layers"] for c in best], [c[metric] for c in best], "o", ms=12, mfc="none",
            color=COLORS["dropped"], label="chosen")
    ax.set_xlabel("layers dropped (the rest of the cut by width)")
    ax.set_ylabel(metric)
    ax.legend()
    return fig


def loss_figure(heal: dict):
    steps, losses = zip(*heal["loss_history"])
    fig, (ax,) = _figure()
    ax.plot(steps, losses, color=COLORS["kept"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    return fig
