"""Quality benchmark (not run in CI): pruning criteria compared on ref-llama at equal parameter counts.

At each level F of the non-embedding parameters removed (--levels, default 0.2 0.35 0.5):
  depth  ShortGPT block influence, Gromov angular block, SLEB (greedy by calibration loss) drop round(F * layers)
         layers (16 layers: 3, 6, 8 = 18.75%, 37.5%, 50%) and report the fraction that actually is;
  width  magnitude and Fisher/Taylor scores cut MLP channels (then heads) to F (bisection,
         lopper.select._fill_width, the same routine lopper.prune(params=...) uses), no repair;
  flap   FLAP (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for LLMs") in its best setting:
         fluctuation scores Var(X_j) * ||W[:, j]||^2 of the o_proj / down_proj inputs, standardized per layer and
         structure, one global ranking over attention and MLP units weighted by their parameter cost (adaptive
         across layers and modules: widths differ per layer and a module may go entirely), bias compensation;
         grouped-query attention is ranked by KV group (FLAP's GQA variant). Applied by masking: removed units are
         zeroed and the removed inputs' mean contribution goes into an o_proj / down_proj bias;
  torch-pruning  the PyPI package (pip install -e .[bench]) run as its examples/LLMs/prune_llm.py prunes Llama:
         MetaPruner, GroupMagnitudeImportance(p=2, mean), the same ratio for hidden channels, heads and MLP
         channels, round_to 4, lm_head ignored, no repair; the ratio is bisected to F;
  lopper the default command, `lopper prune MODEL --params F` with no other option: uniform widths (a standard
         checkpoint), three quarters of the cut by depth, least-squares repair (--repair auto: each layer aimed 0.3 of the way
         at the unpruned stream, MLP channels re-chosen by greedy OBS);
         lopper-global the same with --allocation global (per-layer widths from one ranking across layers, a
         lopper layout; layers dropped only past 35%, lopper.select.global_depth_share);
         lopper-fisher the same as lopper with Fisher width scores.
Zero-shot (--tasks, optional): lm-evaluation-harness through lopper.zeroshot on every cut model, --task-data local
files, --limit examples per task; the table gains the average of the tasks' main metrics.
No method is healed (no training). Calibration: --calib only (32 windows x 256 tokens by default). Quality:
WikiText-2 raw test perplexity, non-overlapping 512-token windows (--max-tokens caps the tokens read: on CPU use
--max-tokens 30720, the first 60 windows). Results go to JSON and a Markdown table with the exact command and machine;
the JSON is rewritten after every measurement, so a run cut short keeps what it measured.

    python benchmarks/quality.py --device cuda                              # the whole split
    python benchmarks/quality.py --max-tokens 30720 --levels 0.2            # CPU, 20% only
    python benchmarks/quality.py --max-tokens 30720 --methods lopper lopper-fisher --keep docs/quality.json
                                   # re-measure lopper only; the other methods' runs are carried over unchanged
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
import transformers

import lopper
from lopper import zeroshot
from lopper.api import Selection, make_plan, run_repair
from lopper.evaluate import count_params, perplexity
from lopper.gradient import fisher_scores
from lopper.importance import collect, width_scores
from lopper.io import load_model
from lopper.select import Target, _fill_width, choose, default_round_to
from lopper.sleb import Sleb
from lopper.surgery import apply, silenced
from lopper.text import calibration_windows, generated_windows

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
METHODS = {
    "shortgpt": "ShortGPT block influence (depth)",
    "gromov": "Gromov angular distance, contiguous block (depth)",
    "sleb": "SLEB greedy, calibration loss (depth)",
    "magnitude": "magnitude, sum of abs(W) (width)",
    "fisher": "Fisher / first-order Taylor (width)",
    "flap": "FLAP: fluctuation, global adaptive allocation, bias compensation (An et al. 2024)",
    "torch-pruning": "torch-pruning 1.6.1 MetaPruner, magnitude, hidden + MLP channels (Fang et al. 2023)",
    "lopper": "lopper --params F (the default: uniform widths, 3/4 of the cut by depth, lsq repair)",
    "lopper-global": "lopper --params F --allocation global (per-layer widths, a lopper layout)",
    "lopper-fisher": "lopper --params F --width-metric fisher",
}
DEPTH = {"shortgpt": "bi", "gromov": "angular", "sleb": "sleb"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHARED / "models" / "ref-llama"))
    p.add_argument("--calib", default=str(SHARED / "data" / "english" / "webtext.txt"),
                   help="calibration text for every method, or self (windows sampled from the model, as lopper's default)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-text", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=0, help="cap on WikiText tokens (0: the whole split)")
    p.add_argument("--levels", type=float, nargs="+", default=[0.2, 0.35, 0.5],
                   help="fractions of non-embedding parameters removed (depth methods: the nearest layer count)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--tasks", default="", help="zero-shot tasks through lm-eval for every cut model, e.g. "
                   "lambada,hellaswag,piqa,arc_easy,arc_challenge (empty: perplexity only)")
    p.add_argument("--task-data", default=str(SHARED / "data" / "zeroshot"))
    p.add_argument("--limit", type=int, default=500, help="zero-shot examples per task (0: all)")
    p.add_argument("--zs-batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", default=str(ROOT / "docs" / "quality.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "quality.md"))
    p.add_argument("--keep", default="", help="a results JSON of the same settings: its runs of methods not in "
                   "--methods are carried over (their code did not change), and so is the unpruned model's perplexity and "
                   "zero-shot, so only --methods are measured again")
    return p.parse_args()


SAME = ("model", "calib", "calib_samples", "seq_len", "eval_text", "eval_seq_len", "max_tokens", "dtype", "tasks",
        "limit")


def kept_runs(path: str, a: argparse.Namespace) -> tuple[list[dict], dict]:
    """The runs of `path` for methods not measured again, and the settings and command they came from."""
    old = json.loads(Path(path).read_text())
    new = settings(a)
    differ = [k for k in SAME if old["settings"].get(k) != new[k]]
    if differ:
        sys.exit(f"--keep {path} was measured with other settings ({', '.join(differ)}): measure every method")
    runs = [r for r in old["runs"] if r["method"] not in a.methods and r["level"] in a.levels]
    origin = {"json": rel(path), "command": old["command"], "machine": old["machine"],
              "baseline_perplexity": old["baseline_perplexity"]}
    if old.get("kept_from") and all(r["method"] not in old["settings"]["methods"] for r in runs):
        origin = {**old["kept_from"], "json": rel(path)}  # they were carried into `path` too: name where they ran
    return runs, origin


def machine(device: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = f"{torch.cuda.get_device_name()}, " if device.startswith("cuda") else ""
    return (f"{gpu}{cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"lopper {lopper.__version__}")


def settings(a: argparse.Namespace) -> dict:
    """The arguments as the JSON records them (paths beside the repository written relative to it)."""
    return {k: rel(v) if isinstance(v, str) else v for k, v in vars(a).items()}


def rel(path: str) -> str:
    near = str(ROOT.parent) + os.sep
    return os.path.relpath(path, ROOT) if path.startswith(near) else path


def main() -> int:
    a = parse()
    t_start = time.time()
    model, tok, adapter = load_model(a.model, a.device, a.dtype)
    windows = generated_windows(model, tok, a.calib_samples, a.seq_len) if a.calib == "self" else \
        calibration_windows(tok, a.calib, a.calib_samples, a.seq_len)  # the same windows for every method
    n_layers = len(adapter.layers())
    rt = default_round_to(adapter.hidden_size())
    base = count_params(model, adapter)["params_non_embedding"]

    def ppl(m) -> float:
        return perplexity(m, tok, a.eval_text, a.eval_seq_len, a.max_tokens, quiet=True)["perplexity"]

    def zero_shot(m) -> dict:
        names = zeroshot.check(a.tasks, a.task_data, a.limit, a.zs_batch)
        return zeroshot.run(m, tok, names, a.task_data, a.limit, a.zs_batch, quiet=True)

    result = {"command": "python " + " ".join(shlex.quote(rel(w)) for w in [rel(__file__), *sys.argv[1:]]),
              "machine": machine(a.device), "settings": settings(a),
              "params_non_embedding": base, "layers": n_layers, "scoring_seconds": {}, "runs": []}
    t = time.time()
    if a.keep:  # the same model and settings: the unpruned figures carry over with the runs
        old = json.loads(Path(a.keep).read_text())
        result.update({k: old[k] for k in ("baseline_perplexity", "baseline_zeroshot") if k in old})
    if "baseline_perplexity" not in result:
        result["baseline_perplexity"] = ppl(model)
    if a.tasks and "baseline_zeroshot" not in result:
        result["baseline_zeroshot"] = zero_shot(model)
    result["baseline_eval_seconds"] = round(time.time() - t, 1)

    def save() -> None:
        result["seconds"] = round(time.time() - t_start, 1)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        Path(a.doc).write_text(markdown(result, a.json))

    if a.keep:
        result["runs"], result["kept_from"] = kept_runs(a.keep, a)
    save()
    t = time.time()
    stats = collect(model, adapter, windows, quiet=True)
    result["scoring_seconds"]["forward statistics (bi, angular, magnitude, activation, fluctuation)"] = \
        round(time.time() - t, 1)
    magnitude = width_scores(adapter, stats, "magnitude")
    fisher = None
    if "fisher" in a.methods:
        t = time.time()
        fisher = fisher_scores(model, adapter, windows, quiet=True)
        result["scoring_seconds"]["fisher (one backward per window)"] = round(time.time() - t, 1)
    sleb = Sleb(model, adapter, windows, quiet=True)

    for level in a.levels:
        free = n_layers - 2  # lopper's default protection of the first and last layer
        k = max(1, min(free, round(level * n_layers)))
        for method in a.methods:
            t = time.time()
            trial = copy.deepcopy(model)
            trial_adapter = type(adapter)(trial)
            run = {"method": method, "level": level}
            p, extra = None, {}
            try:
                if method in DEPTH:
                    p = choose(adapter, Target(drop_layers=k, layer_metric=DEPTH[method], drop_fn=sleb, round_to=rt),
                               stats, magnitude)
                elif method in ("magnitude", "fisher"):
                    _, p = _fill_width(model, adapter, Target(round_to=rt), stats,
                                       magnitude if method == "magnitude" else fisher, level)
                elif method == "flap":
                    extra = flap(adapter, trial_adapter, stats, level, base)
                elif method == "torch-pruning":
                    trial, extra = torch_pruning(model, tok, level, base)
                    trial_adapter = type(adapter)(trial)
                else:
                    args = Selection(model=a.model, params=level, repair="lsq",
                                     width_metric="fisher" if method == "lopper-fisher" else "activation",
                                     allocation="global" if method == "lopper-global" else "uniform",
                                     calib=a.calib, calib_samples=a.calib_samples, seq_len=a.seq_len, quiet=True)
                    p = make_plan(args, model, adapter, windows)
                    with silenced():
                        run_repair(args, trial, trial_adapter, p, windows, quiet=True)  # as lopper prune does
                if p is not None:
                    with silenced():
                        apply(trial, trial_adapter, p)
                    widths = {key: [len(p.per_layer[i][key]) for i in p.layers] for key in ("mlp", "heads")}
                    extra = {"layers_kept": len(p.layers),
                             "dropped_layers": sorted(set(range(n_layers)) - set(p.layers)),
                             **{key: w[0] if len(set(w)) == 1 else w for key, w in widths.items()}}
            except Exception as e:  # a baseline that fails is recorded as failed, not hidden
                run.update(error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                           prune_seconds=round(time.time() - t, 1))
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
                save()
                continue
            prune_s = time.time() - t
            after = extra.pop("params_non_embedding", None) or \
                count_params(trial, trial_adapter)["params_non_embedding"]
            t = time.time()
            value = ppl(trial)
            run.update(target_removed=round(k / n_layers if method in DEPTH else level, 4),
                       removed=round(1 - after / base, 4), perplexity=value, **extra,
                       prune_seconds=round(prune_s, 1), eval_seconds=round(time.time() - t, 1))
            if a.tasks:
                run["zeroshot"] = zero_shot(trial)
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
            del trial
            save()
    save()
    return 0


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """FLAP's per-row standardization: each layer's scores of one structure to mean 0, std 1 ([L, units])."""
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-12)


@torch.no_grad()
def flap(adapter, trial_adapter, stats, frac: float, base: int) -> dict:
    """FLAP (An et al. 2024) on the copy behind `trial_adapter`, removing `frac` of `base` non-embedding parameters,
    by masking; `stats` were collected on the model behind `adapter`.

    Scores: Var(X_j) * ||W[:, j]||^2 for input channel j of o_proj ([L, heads * head_dim]) and down_proj ([L, mlp]),
    standardized per layer, averaged over each KV group's channels for attention (whole groups go, so the query
    heads per group stay equal). One ranking over all units, each weighing its parameters, removes the lowest
    until `frac` is reached (a layer may lose its whole attention or MLP). Bias compensation: the removed inputs'
    mean times their weight columns, W[:, R] @ mean(X_R), becomes the bias of o_proj / down_proj ([hidden]); those
    biases are counted as parameters. Returns the exact parameter count and the units kept per layer."""
    layers = list(adapter.layers())
    hidden = adapter.hidden_size()
    groups = adapter.layer_widths(layers[0])["kv_heads"]
    attn, mlp, attn_cost, mlp_cost = [], [], [], []
    for layer in layers:
        at, down = adapter.attention(layer), adapter.mlp_out(layer)
        o = at.o_proj
        attn.append(stats.input_mean_var(o)[1] * o.weight.float().pow(2).sum(0).cpu())
        mlp.append(stats.input_mean_var(down)[1] * down.weight.float().pow(2).sum(0).cpu())
        attn_cost.append(sum(m.weight.numel() for m in (at.q_proj, at.k_proj, at.v_proj, o)) // groups)
        mlp_cost.append(sum(m.weight.numel() for m in (*adapter.mlp_in(layer), down)) // down.weight.shape[1])
    n = len(layers)
    group_scores = _standardize(torch.stack(attn)).view(n, groups, -1).mean(-1)  # [L, G]
    mlp_scores = _standardize(torch.stack(mlp))  # [L, mlp]
    units = [(group_scores[i, g].item(), attn_cost[i], i, "attn", g) for i in range(n) for g in range(groups)]
    units += [(mlp_scores[i, c].item(), mlp_cost[i], i, "mlp", c) for i in range(n) for c in range(mlp_scores.shape[1])]
    units.sort(key=lambda u: u[0])
    cum = torch.tensor([u[1] for u in units], dtype=torch.float64).cumsum(0)
    cut = 0
    for _ in range(2):  # the second pass adds the bias parameters the first cut creates
        biases = hidden * len({(u[2], u[3]) for u in units[:cut]})
        cut = int((cum - frac * base - biases).abs().argmin()) + 1
    gone: dict[tuple[int, str], list[int]] = {}
    for u in units[:cut]:
        gone.setdefault((u[2], u[3]), []).append(u[4])
    d = adapter.head_dim()
    for (i, kind), idx in gone.items():
        layer = layers[i]
        if kind == "attn":
            at = adapter.attention(layer)
            per = at.q_proj.weight.shape[0] // groups
            cols = torch.cat([torch.arange(g * per, (g + 1) * per) for g in idx])
            kv = torch.cat([torch.arange(g * d, (g + 1) * d) for g in idx])
            out, rows = at.o_proj, [(at.q_proj, cols), (at.k_proj, kv), (at.v_proj, kv)]
        else:
            cols = torch.tensor(idx)
            out, rows = adapter.mlp_out(layer), [(m, cols) for m in adapter.mlp_in(layer)]
        mean = stats.input_mean_var(out)[0][cols].to(out.weight)
        out, rows = _same_modules(adapter, trial_adapter, i, out, rows)
        out.bias = nn.Parameter(out.weight[:, cols] @ mean)
        out.weight[:, cols] = 0
        for m, r in rows:
            m.weight[r] = 0
    removed = cum[cut - 1].item() if cut else 0
    kept = [[groups - len(gone.get((i, "attn"), [])), mlp_scores.shape[1] - len(gone.get((i, "mlp"), []))]
            for i in range(n)]
    return {"params_non_embedding": int(base - removed + hidden * len(gone)),
            "kept_groups_mlp_per_layer": kept}


def _same_modules(adapter, trial_adapter, i: int, out, rows):
    """The modules of layer i of the copy that match `out` and the `rows` modules of the original."""
    names = {m: n for n, m in adapter.layers()[i].named_modules()}
    twin = dict(trial_adapter.layers()[i].named_modules())
    return twin[names[out]], [(twin[names[m]], r) for m, r in rows]


@contextmanager
def _rope_hidden(model):
    """While torch-pruning traces the model, RoPE is the identity. On transformers 5.24 its dependency graph never
    finishes through RoPE's rotate_half (an endless loop in get_pruning_group, as in Torch-Pruning issue #527);
    RoPE mixes channels only within a head, and head dims are not cut, so the graph it needs is unchanged."""
    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    rope = modeling.apply_rotary_pos_emb
    modeling.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        modeling.apply_rotary_pos_emb = rope


def _tp_cut(model, ratio: float) -> float:
    """Prune `model` in place with torch-pruning at `ratio`, as its examples/LLMs/prune_llm.py does: MetaPruner,
    GroupMagnitudeImportance(p=2, group_reduction="mean"), one ratio for every channel group (hidden and MLP
    channels), round_to 4, lm_head ignored, no repair. Heads: the example's num_heads for q/k/v fails on
    grouped-query attention (RuntimeError "shape '[6, -1]' is invalid for input of size 128" in its _prune), so
    num_heads is given for q_proj only, and torch-pruning then keeps every head."""
    import torch_pruning as tp

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=next(model.parameters()).device)
    heads = {m.q_proj: model.config.num_attention_heads for m in model.modules() if hasattr(m, "q_proj")}
    with _rope_hidden(model):
        pruner = tp.pruner.MetaPruner(
            model, example_inputs=ids, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=heads,
            prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4,
            output_transform=lambda out: out.logits)
    for group in pruner.step(interactive=True):
        group.prune()
    for m in model.modules():
        if hasattr(m, "q_proj") and hasattr(m, "num_key_value_groups"):
            m.num_key_value_groups = m.q_proj.out_features // m.k_proj.out_features
    model.config.hidden_size = model.lm_head.in_features
    return sum(p.numel() for p in model.parameters()) - model.lm_head.weight.numel() - \
        model.get_input_embeddings().weight.numel()


def torch_pruning(model, tok, frac: float, base: int):
    """The torch-pruning package (Fang et al. 2023, DepGraph) on a copy of `model` (see _tp_cut). Its widths are
    uniform and depend on the ratio alone, so the ratio is bisected on a one-layer model of the same config
    (random weights: cheap), then applied once to the copy. Returns (pruned model, details)."""
    one = copy.deepcopy(model.config)
    one.num_hidden_layers = 1
    if getattr(one, "layer_types", None):
        one.layer_types = one.layer_types[:1]
    n = model.config.num_hidden_layers

    def predicted(ratio: float) -> float:
        shell = type(model)(copy.deepcopy(one)).float().eval()  # _tp_cut rewrites config.hidden_size
        after = _tp_cut(shell, ratio)
        norm = shell.model.norm.weight.numel()
        return 1 - (n * (after - norm) + norm) / base

    lo, hi, best = 0.0, 0.9, (0.0, 0.0)
    for _ in range(12):
        ratio = (lo + hi) / 2
        got = predicted(ratio)
        if abs(got - frac) < abs(best[1] - frac):
            best = (ratio, got)
        lo, hi = (ratio, hi) if got < frac else (lo, ratio)
    m = copy.deepcopy(model)
    after = _tp_cut(m, best[0])
    layer = m.model.layers[0]
    d = layer.self_attn.head_dim
    return m, {"params_non_embedding": after, "ratio": round(best[0], 4), "predicted_removed": round(best[1], 4),
               "version": importlib.metadata.version("torch-pruning"), "hidden": m.lm_head.in_features,
               "heads": layer.self_attn.q_proj.out_features // d, "kv_heads": layer.self_attn.k_proj.out_features // d,
               "mlp": layer.mlp.down_proj.in_features}


def markdown(r: dict, json_path: str) -> str:
    s = r["settings"]
    levels = sorted({x["level"] for x in r["runs"]} | set(s["levels"]))
    n = r["layers"]
    cap = f"first {s['max_tokens']} tokens" if s["max_tokens"] else "the whole split"
    lines = ["# Quality: pruning criteria at equal parameter counts", "",
             f"Model `{rel(s['model'])}` ({n} layers, {r['params_non_embedding']:,} non-embedding parameters), "
             f"no healing. WikiText-2 raw test perplexity ({cap}, non-overlapping {s['eval_seq_len']}-token windows); "
             f"unpruned: **{r['baseline_perplexity']:.2f}**"
             + (f", zero-shot average **{r['baseline_zeroshot']['average']:.2%}** (lm-eval {s['tasks']}, first "
                f"{s['limit']} examples of each, main metric per task in lopper.zeroshot.MAIN_METRIC)"
                if r.get("baseline_zeroshot") else "")
             + f". Calibration: `{rel(s['calib'])}` only, "
             f"{s['calib_samples']} x {s['seq_len']} tokens (every method that uses data). Each cell: perplexity "
             "(non-embedding parameters removed). Depth methods drop the nearest whole number of layers; width "
             "methods (MLP channels, then heads, no repair), FLAP, torch-pruning and lopper are matched to the level.",
             "", "| method | " + " | ".join(f"{f:.0%}" for f in levels) + " |",
             "|---|" + "---:|" * len(levels)]
    for m, label in METHODS.items():
        cells = []
        for f in levels:
            hit = [x for x in r["runs"] if x["method"] == m and x["level"] == f]
            if not hit:
                cells.append("not run")
            elif "error" in hit[0]:
                cells.append(f"failed: {hit[0]['error'][:80]}")
            else:
                zs = hit[0].get("zeroshot")
                cells.append(f"{hit[0]['perplexity']:.2f} ({hit[0]['removed']:.2%})"
                             + (f", zero-shot {zs['average']:.2%}" if zs else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "FLAP is applied by masking (its widths differ per layer, and a layer may lose its whole attention "
              "or MLP); its count includes the compensation biases of o_proj / down_proj; grouped-query attention is "
              "cut by whole KV groups (FLAP's GQA variant). torch-pruning 1.6.1 runs as its LLM example prunes Llama "
              "(magnitude, one ratio for hidden and MLP channels, no repair) with two changes it needs to run at all "
              "on this model with transformers 5.24: RoPE is hidden while it traces (its dependency graph never "
              "finishes through rotate_half, as in Torch-Pruning issue #527), and head counts are given for q_proj "
              "only (the example's q/k/v head counts crash on grouped-query attention); it then keeps every head. "
              "Its ratio per level is in the JSON.", "",
              "Details per run (dropped layers, kept widths, seconds) are in "
              f"`{os.path.relpath(json_path, ROOT) if json_path.startswith(str(ROOT)) else json_path}`. "
              "Scoring time shared by the runs: "
              + ", ".join(f"{k}: {v} s" for k, v in r["scoring_seconds"].items()) + ".", "",
              f"Command: `{r['command']}`", "",
              *([f"Runs of the methods not named in `--methods` were carried over from `{r['kept_from']['json']}` "
                 f"(`{r['kept_from']['command']}`, unpruned {r['kept_from']['baseline_perplexity']:.2f}; "
                 f"{r['kept_from']['machine']}).", ""] if r.get("kept_from") else []),
              f"Machine: {r['machine']}; shared with other jobs (contended), so seconds are indicative only. "
              f"Total {r.get('seconds', 0):.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
