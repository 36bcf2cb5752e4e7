"""The public functions. Each takes one typed dataclass of arguments (or the same names as keywords); the CLI is
generated from these dataclasses, so a flag and a keyword are always the same thing."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .version import __version__
from .errors import LopperError, one_line
from .evaluate import STREAMED_WINDOWS, count_params, perplexity, planned_params, weights_size
from .arch import adapter_for
from .importance import collect, width_scores
from .layerwise import is_streamed
from .io import (DTYPES, PLAN_FILE, REPORT_FILE, check_output, checkpoint_dtype, is_gguf, load_model, model_class,
                 model_source, read_config, resolve_dtype, save, staged, write_beside)
from . import gguf_out, memory, stream
from . import report as report_page
from .options import Options, arg_field, command_line, existing, flag, resolve_args, set_quiet
from .plan import Plan
from .repair import TeacherStream, repair, teacher_stream
from .search import Candidates
from . import sparsity as sp
from . import zeroshot
from .select import SEARCH_FIT, SEARCH_HELD, Target, choose, default_round_to, solve_params
from .surgery import apply
from .text import BUILTIN, SELF, calibration_windows, generated_windows, start_token

log = logging.getLogger("lopper")


@dataclass(kw_only=True)
class ModelOptions(Options):
    """Model"""

    model: str = arg_field("", "Hugging Face model folder, hub id or .gguf file", positional=True)
    gguf_file: str = arg_field("", "read this .gguf file inside the MODEL folder (dequantized)")

    def check_group(self) -> None:
        if not self.model:
            raise LopperError("no model given: pass a Hugging Face model folder or hub id")


@dataclass(kw_only=True)
class RemoveOptions(Options):
    """What to remove: a fraction of the parameters, counts per structure, or a saved plan"""

    params: float = arg_field(0.0, "fraction of non-embedding parameters to remove; lopper picks depth and width")
    drop_layers: int = arg_field(0, "decoder/encoder layers to remove")
    heads: float = arg_field(0.0, "fraction of attention heads to remove (whole KV groups when a multiple of 1/kv_heads)")
    mlp: float = arg_field(0.0, "fraction of MLP channels to remove")
    hidden: float = arg_field(0.0, "fraction of hidden (embedding) channels to remove")
    experts: float = arg_field(0.0, "mixture-of-experts: fraction of each layer's experts to remove (--mlp also cuts "
                               "channels inside every kept expert)")
    plan: str = arg_field("", "replay this plan JSON instead of choosing")
    params_search: str = arg_field("auto", "how --params splits depth and width: kl = cut and repair candidate "
                                   "mixes (width only and half of the cut by depth, then more depth while it wins "
                                   "by more than one standard error) scored by their KL divergence to the unpruned "
                                   "model on held-back calibration windows, keeping the fewest dropped layers within "
                                   "one standard error of the lowest; loss = the same by cross-entropy; rule = half "
                                   "by depth without measuring (none up to 35%% with --allocation global); cut = "
                                   "the KL of each candidate cut before any repair (one repair in all, of the "
                                   "kept candidate); auto "
                                   "(default) = kl, except rule for --allocation global and streamed runs; "
                                   "--depth-share overrides (docs/decisions.md)",
                                   choices=("auto", "kl", "loss", "cut", "rule"))
    depth_share: float = arg_field(-1.0, "with --params: the fraction of the cut taken as whole layers, the rest "
                                   "as width, instead of the search (-1: --params-search decides)")
    allocation: str = arg_field("uniform", "per-layer widths: uniform (a standard checkpoint), or global (one ranking "
                                "of each structure's units across layers; widths differ, saved in a lopper layout "
                                "that lopper.load() rebuilds; no better than uniform on SmolLM2: "
                                "docs/allocation.md)", choices=("uniform", "global"))
    min_keep: float = arg_field(0.25, "with --allocation global: every layer keeps at least this fraction of each width")
    protect_first: int = arg_field(1, "first layers never removed")
    protect_last: int = arg_field(1, "last layers never removed")
    round_to: int = arg_field(0, "kept widths are multiples of this (0: from the model's size, --device and --dtype)")

    def removes(self) -> bool:
        return bool(self.params or self.drop_layers or self.heads or self.mlp or self.hidden or self.experts)

    def check_group(self) -> None:
        existing("plan", self.plan, "a plan JSON, as `lopper plan MODEL --out PLAN.json` writes")
        if not 0.0 <= self.params < 1.0:
            raise LopperError(f"--params {self.params} is out of range: give the fraction to remove, 0 <= F < 1")
        if self.params and (self.drop_layers or self.heads or self.mlp or self.hidden):
            raise LopperError("--params chooses depth and width itself: drop --drop-layers/--heads/--mlp/--hidden")
        if self.depth_share != -1.0 and not (self.params and 0.0 <= self.depth_share <= 1.0):
            raise LopperError(f"--depth-share {self.depth_share} needs --params and a fraction 0 <= F <= 1 (-1: the "
                              "default rule)")
        if self.depth_share != -1.0 and self.params_search == "loss":
            raise LopperError("--params-search loss tries the depth shares itself: drop --depth-share")
        if self.plan and self.removes():
            raise LopperError("--plan replays a plan as it is: drop the other selection options (--params/"
                              "--drop-layers/--heads/--mlp/--hidden/--experts)")
        for name in ("protect_first", "protect_last", "round_to"):
            if getattr(self, name) < 0:
                raise LopperError(f"{flag(name)} {getattr(self, name)} must not be negative")
        Target(drop_layers=self.drop_layers, heads=self.heads, mlp=self.mlp, hidden=self.hidden,
               experts=self.experts, allocation=self.allocation, min_keep=self.min_keep).check_fractions()


@dataclass(kw_only=True)
class SpeedOptions(Options):
    """Speed target: a measured prefill speed-up instead of a size"""

    target_speedup: float = arg_field(0.0, "measured prefill speed-up S > 1 to reach on --device at --speed-batch x "
                                      "--speed-len; lopper picks depth and width from per-layer timings (0: off)")
    speed_batch: int = arg_field(8, "batch of the prefill that --target-speedup times")
    speed_len: int = arg_field(256, "tokens per sequence of the prefill that --target-speedup times")

    def check_group(self) -> None:
        if self.target_speedup and self.target_speedup <= 1.0:
            raise LopperError(f"--target-speedup {self.target_speedup} is not a speed-up: give a factor above 1, "
                              "e.g. 1.5 (or 0 for off)")
        if self.target_speedup and min(self.speed_batch, self.speed_len) < 1:
            raise LopperError("--speed-batch and --speed-len must be at least 1")


@dataclass(kw_only=True)
class ScoringOptions(Options):
    """Scoring: calibration text and importance criteria"""

    calib: str = arg_field("", "calibration text: a file, self (text sampled from the model itself; the default for "
                           "causal LMs) or builtin (the shipped public-domain English; the default for encoders)")
    calib_samples: int = arg_field(64, "calibration windows (64: twice the calibration and repair time of 32, and "
                                   "lower perplexity on a real model; docs/calibration.md)")
    seq_len: int = arg_field(256, "tokens per calibration window")
    layer_metric: str = arg_field("bi", "layer importance (sleb: greedy removal by calibration loss, slower)",
                                  choices=("bi", "angular", "sleb"))
    width_metric: str = arg_field("activation", "width importance (fisher: squared first-order Taylor mask gradients "
                                  "of the LM loss, one backward per window; fluctuation: FLAP's input variance x "
                                  "squared weight column)", choices=("magnitude", "activation", "fisher", "fluctuation"))

    def check_group(self) -> None:
        if self.calib_samples < 1 or self.seq_len < 2:
            raise LopperError(f"--calib-samples {self.calib_samples} / --seq-len {self.seq_len} too small: use at "
                              "least 1 and 2")


@dataclass(kw_only=True)
class RepairOptions(Options):
    """Repair: refit what is kept so the cut model's outputs match the original's"""

    repair: str = arg_field("auto", "after cutting: lsq = least-squares refit of output projections on calibration "
                            "text; auto (default) = lsq whenever something is removed and the model has a tokenizer "
                            "(a replayed --plan: as its run did); none = off", choices=("auto", "none", "lsq"))
    repair_damp: float = arg_field(0.001, "ridge term of --repair lsq, a fraction of the mean diagonal of each Gram "
                                   "matrix")
    repair_units: str = arg_field("obs", "with --repair lsq: obs = the repair re-chooses which MLP channels each layer "
                                  "keeps (the plan's counts) by greedy OBS on its calibration inputs, and the saved "
                                  "plan says which; plan = keep the plan's channels (always so with --plan)",
                                  choices=("obs", "plan"))
    repair_correct: float = arg_field(0.3, "with --repair lsq in pre-norm decoders: the share of the gap to the "
                                      "unpruned model's residual stream each refit layer also closes (0: its own "
                                      "output only)")

    def check_group(self) -> None:
        if self.repair_damp <= 0:
            raise LopperError(f"--repair-damp {self.repair_damp} must be positive (it keeps the least squares "
                              "solvable): e.g. 0.001")
        if not 0.0 <= self.repair_correct <= 1.0:
            raise LopperError(f"--repair-correct {self.repair_correct} is out of range: give a share 0 <= A <= 1, "
                              "e.g. 0.3 (0: each layer reconstructs its own output only)")


@dataclass(kw_only=True)
class SparsityOptions(Options):
    """Sparsity: zero weights inside what is kept (unstructured or N:M)"""

    sparsity: float = arg_field(0.0, "then zero this fraction of the remaining Linear weights in the layers (0: off; "
                                "an N:M pattern implies 1 - N/M)")
    sparsity_pattern: str = arg_field("unstructured", "unstructured, or N:M (N nonzeros in every M inputs: 2:4, 4:8)")
    sparsity_criterion: str = arg_field("wanda", "which weights to zero", choices=sp.CRITERIA)
    sparsity_scope: str = arg_field("row", "unstructured counts per output row, per module, or one global threshold",
                                    choices=sp.SCOPES)
    sparsity_ignore: str = arg_field("", "regex: modules whose name matches are left dense (lm_head and embeddings "
                                     "always are)")
    sparsity_allocation: str = arg_field("uniform", "per-layer fractions: uniform, or owl (fewer zeros where "
                                         "activations have more outliers)", choices=sp.ALLOCATIONS)

    def check_group(self) -> None:
        sp.Spec.from_args(self).check()


@dataclass(kw_only=True)
class RunOptions(Options):
    """Run"""

    device: str = arg_field("cpu", "cpu or cuda")
    dtype: str = arg_field("auto", "compute dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, "
                           "float16", choices=("auto", *DTYPES))
    config: str = arg_field("", "recipe: a YAML or JSON file of these options (a lopper_report.json replays its run); "
                            "flags override it")
    quiet: bool = arg_field(False, "no progress bars or logs")


@dataclass(kw_only=True)
class StreamOptions(Options):
    """Memory"""

    stream: str = arg_field("auto", "read one decoder layer at a time from the checkpoint, so that memory does not "
                            "grow with depth: on, off, or auto (on when the in-memory estimate does not fit)",
                            choices=("auto", "on", "off"))


@dataclass(kw_only=True)
class Selection(ModelOptions, RemoveOptions, SpeedOptions, ScoringOptions, RepairOptions, SparsityOptions,
                StreamOptions, RunOptions):
    """What to remove and how to choose it; shared by `plan` and `prune`."""

    def target(self) -> Target:
        return Target(drop_layers=self.drop_layers, heads=self.heads, mlp=self.mlp, hidden=self.hidden,
                      experts=self.experts,
                      layer_metric=self.layer_metric, protect_first=self.protect_first,
                      protect_last=self.protect_last, round_to=self.round_to, allocation=self.allocation,
                      min_keep=self.min_keep)

    def check_group(self) -> None:
        """The rules between groups."""
        if self.target_speedup and self.removes():
            raise LopperError("--target-speedup chooses depth and width itself: drop --params/--drop-layers/--heads/"
                              "--mlp/--hidden/--experts")
        if self.target_speedup and self.allocation != "uniform":
            raise LopperError("--target-speedup times uniform widths only: drop --allocation global")
        if self.plan and self.target_speedup:
            raise LopperError("--plan replays a plan as it is: drop --target-speedup")
        sp.check_args(self)
        if self.stream == "on" and self.not_streamed():
            raise LopperError(f"--stream on cannot stream {self.not_streamed()}: drop it, or use --stream off")

    def mix_search(self, streamed: bool) -> str:
        """How a --params cut splits depth and width in this run: "share" (--depth-share), "rule", "kl", "loss" or "cut".
        auto is kl, but rule for --allocation global (its rule was measured against the loss search,
        select.global_depth_share; kl was not) and for a streamed model (no copy per candidate)."""
        if self.depth_share != -1.0:
            return "share"
        search = self.params_search
        if search == "auto":
            search = "rule" if self.allocation == "global" else "kl"
        return "rule" if streamed else search

    def scored_search(self, streamed: bool) -> str:
        """"kl", "loss" or "cut" when this run cuts and scores --params candidates (it then draws SEARCH_HELD more
        calibration windows to score them on), else ""."""
        search = self.mix_search(streamed) if self.params and not self.plan else ""
        return search if search in ("kl", "loss", "cut") else ""

    def not_streamed(self) -> str:
        """The options that the layer-streamed path (stream.py) does not take yet, or ''."""
        spec = sp.Spec.from_args(self)
        found = [self.layer_metric == "sleb" and "--layer-metric sleb",
                 self.params_search == "loss" and bool(self.params) and "--params-search loss",
                 bool(self.target_speedup) and "--target-speedup",
                 self.calib == SELF and "--calib self (sampling reads every layer once per token; give a file or "
                 "builtin)",
                 spec.active and spec.scope == "global" and not spec.nm and "--sparsity-scope global (one "
                 "threshold over every weight at once)"]
        return ", ".join(f for f in found if f)


@dataclass(kw_only=True)
class OutputOptions(Options):
    """Output"""

    out: str = arg_field("", "output path (written atomically)", required=True)
    force: bool = arg_field(False, "replace an existing output")

    def check_group(self) -> None:
        if not self.out:
            raise LopperError("no --out given: name the output to write")


@dataclass(kw_only=True)
class PlanArgs(Selection, OutputOptions):
    """Arguments of `lopper plan` (--out: the plan JSON to write)."""


@dataclass(kw_only=True)
class EvalTextOptions(Options):
    """Evaluation"""

    eval_text: str = arg_field("", "also report perplexity before and after on this text file")
    eval_seq_len: int = arg_field(512, "window for --eval-text")
    eval_max_tokens: int = arg_field(0, "cap on --eval-text tokens (0: all)")

    def check_group(self) -> None:
        existing("eval_text", self.eval_text, "the path of a UTF-8 text file")


@dataclass(kw_only=True)
class PruneArgs(Selection, OutputOptions, EvalTextOptions, gguf_out.GgufOptions):
    """Arguments of `lopper prune` (--out: the model folder to write, or a .gguf file)."""


@dataclass(kw_only=True)
class EvalOptions(Options):
    """Evaluation: perplexity and zero-shot tasks"""

    text: str = arg_field("", "text file for perplexity (causal LMs)")
    seq_len: int = arg_field(512, "tokens per non-overlapping window")
    max_tokens: int = arg_field(0, "cap on tokens read (0: all)")
    tasks: str = arg_field("", "zero-shot tasks through lm-evaluation-harness, comma separated: lambada "
                           "(lambada_openai), hellaswag, piqa, arc_easy, arc_challenge or any lm-eval task name "
                           "(needs lopper[eval])")
    limit: int = arg_field(0, "with --tasks: the first N examples of each task (0: all)")
    task_data: str = arg_field("", "with --tasks: read the data from this local folder (layout: docs/zeroshot.md) "
                               "instead of the Hugging Face hub")
    batch: int = arg_field(8, "with --tasks: batch size of the log-likelihood requests")
    json: str = arg_field("", "also write the results to this JSON file")

    def check_group(self) -> None:
        if (self.limit or self.task_data) and not self.tasks:
            raise LopperError("--limit and --task-data apply to zero-shot tasks: add --tasks, e.g. --tasks lambada,piqa")
        existing("text", self.text, "the path of a UTF-8 text file")
        existing("task_data", self.task_data, "a folder of task data (layout: docs/zeroshot.md)", folder=True)
        if self.seq_len < 2:
            raise LopperError(f"--seq-len {self.seq_len} is too small: use at least 2")


@dataclass(kw_only=True)
class EvalArgs(ModelOptions, EvalOptions, StreamOptions, RunOptions):
    """Arguments of `lopper eval` (MODEL: also a folder saved by lopper, standard or not)."""


def resolve_repair(args: Selection, tokenizer) -> Selection:
    """`--repair auto` made concrete: least squares whenever the selection removes something and calibration text
    can be tokenized, since the plain command should give lopper's best cut (docs/quality_smollm2.md); its time is
    the report's `repair_seconds`. A replayed --plan repairs as the run that saved it did (plan meta "repair";
    absent in older plans: none), so replay reproduces."""
    if args.repair != "auto":
        return args
    if args.plan:
        return replace(args, repair=Plan.load(args.plan).meta.get("repair", "none"))
    removes = args.removes() or args.target_speedup
    return replace(args, repair="lsq" if removes and tokenizer is not None else "none")


def calibration(args: Selection, model, tokenizer) -> list[torch.Tensor] | None:
    """Calibration windows, if the chosen criteria or repair need any; SEARCH_HELD more at the end when a --params
    search runs (mix_candidates splits them off; a text too short for them holds back a half or a quarter)."""
    needs = not args.plan and (args.width_metric in ("activation", "fisher", "fluctuation") or args.params
                               or args.target_speedup or args.drop_layers)
    if not (needs or args.repair != "none" or sp.needs_calibration(args)):
        return None
    if tokenizer is None:
        raise LopperError(f"{args.model} has no tokenizer files, which calibration needs: add them, or use "
                          "--width-metric magnitude without --drop-layers/--params/--repair and --sparsity-criterion wanda/sparsegpt")
    seq_len = min(args.seq_len, getattr(model.config, "max_position_embeddings", None) or args.seq_len)
    source = default_calib(args, model, tokenizer)
    streamed = any(is_streamed(layer) for layer in adapter_for(model).layers())
    held = SEARCH_HELD if args.scored_search(streamed) else 0
    if source == SELF:
        if not can_generate(model):
            raise LopperError(f"--calib self samples text from the model, which {args.model} (an encoder) cannot "
                              "generate: give --calib FILE or --calib builtin")
        log.info(f"calibration: {args.calib_samples} x {seq_len} tokens sampled from the model (--calib self)"
                 + (f", and {SEARCH_HELD} more to score the --params search on" if held else ""))
        return generated_windows(model, tokenizer, args.calib_samples + held, seq_len)
    for n in (held, held // 2, held // 4) if held else (0,):  # a short text holds back fewer windows
        try:
            return calibration_windows(tokenizer, source, args.calib_samples + n, seq_len)
        except LopperError as e:
            error = e
    raise LopperError(f"{error} (the --params search scores its candidates on {held} windows beyond "
                      f"--calib-samples {args.calib_samples}; or pass --params-search rule)") from None


def default_calib(args: Selection, model, tokenizer, streamed: bool = False) -> str:
    """--calib made concrete: the model's own samples for causal LMs (docs/calibration.md), the shipped text for
    encoders, for models with no token to start sampling from, and for a streamed model (sampling would read every
    layer once per token)."""
    if args.calib:
        return args.calib
    if streamed:
        log.info("calibration: the built-in text (a streamed model does not sample its own; --calib FILE for another)")
        return BUILTIN
    return SELF if can_generate(model) and tokenizer is not None and start_token(model, tokenizer) is not None \
        else BUILTIN


def can_generate(model) -> bool:
    return hasattr(model, "lm_head") and hasattr(model, "generate")


def make_plan(args: Selection, model, adapter, windows: list[torch.Tensor] | None, search: Candidates | None = None
              ) -> Plan:
    """Choose the plan for `args` on a loaded model (or read it from args.plan); `search` scores --params candidates
    (mix_candidates)."""
    if getattr(model.config, "lopper_layout", None):
        raise LopperError(f"{args.model} was saved with a lopper layout (its config keeps the original widths), "
                          "which cannot be pruned again yet: prune the original model with the combined cut instead")
    if args.plan:
        return Plan.load(args.plan)
    target = args.target()
    target.round_to = target.round_to or default_round_to(adapter.hidden_size(), args.device,
                                                          resolve_dtype(args.dtype, args.device))
    if target.layer_metric == "sleb" and (args.params or args.target_speedup or target.drop_layers):
        from .sleb import Sleb
        target.drop_fn = Sleb(model, adapter, windows, quiet=args.quiet)
    if not (args.params or args.target_speedup or target.drop_layers or target.heads or target.mlp or target.hidden
            or target.experts):
        # nothing structured to remove (e.g. --sparsity alone): the same identity plan, without a calibration pass
        return choose(adapter, target, None, width_scores(adapter, None, "magnitude"))
    needs_stats = (args.width_metric in ("activation", "fluctuation") or args.params or args.target_speedup
                   or target.drop_layers)
    stats = collect(model, adapter, windows, quiet=args.quiet, all_pairs=args.layer_metric == "angular") \
        if needs_stats else None
    if args.width_metric == "fisher" and (args.params or args.target_speedup or target.heads or target.mlp
                                          or target.hidden or target.experts):
        from .gradient import fisher_scores
        scores = fisher_scores(model, adapter, windows, quiet=args.quiet)
    else:
        scores = width_scores(adapter, stats, "magnitude" if args.width_metric == "fisher" else args.width_metric)
    if args.params:
        return _solve_params(args, model, adapter, target, stats, scores, search)
    if args.target_speedup:
        from . import latency
        loss = candidate_score(args, model, adapter, windows) if args.params_search == "loss" else None
        timer = latency.prefill_timer(args.speed_batch, args.speed_len, args.device)
        return latency.solve_speedup(model, adapter, target, stats, scores, args.target_speedup, timer, loss=loss)
    return choose(adapter, target, stats, scores)


def _solve_params(args: Selection, model, adapter, target: Target, stats, scores, search) -> Plan:
    """--params: the depth share given (--depth-share), the rule, or the measured search (`search`, from
    mix_candidates: kl or loss)."""
    how = args.mix_search(any(is_streamed(layer) for layer in adapter.layers()))
    if how == "share":
        return solve_params(model, adapter, target, stats, scores, args.params, shares=(args.depth_share,))
    if search is None:
        if how != args.mix_search(False):
            log.info("--params-search %s needs a copy of the model per candidate: a streamed run takes the rule",
                     args.mix_search(False))
        return solve_params(model, adapter, target, stats, scores, args.params)
    t = time.time()
    p = solve_params(model, adapter, target, stats, scores, args.params, metric=search.label, score=search)
    p.meta["params"]["seconds"] = round(time.time() - t, 1)
    log.info("--params %s: %d layers dropped and the rest by width, the fewest dropped layers within one standard "
             "error of the lowest %s of %d candidates (%.0f s)", args.params,
             p.meta["params"]["choice"]["drop_layers"], search.label, len(p.meta["params"]["candidates"]),
             p.meta["params"]["seconds"])
    return p


def candidate_score(args: Selection, model, adapter, windows: list[torch.Tensor], metric: str = "loss"):
    """plan -> score (search.Candidates) with a short repair: on the first SEARCH_FIT windows (at most three
    quarters), scored on the last SEARCH_HELD (the rest). --target-speedup's loss search uses it; a --params search
    scores the whole repair instead (mix_candidates)."""
    cut = min(SEARCH_FIT, max(1, len(windows) * 3 // 4))
    fit, held = windows[:cut], windows[cut:][-SEARCH_HELD:] or windows
    return Candidates(model, adapter, fit, held, metric, _repair_for(args), keep=False)


def mix_candidates(args: Selection, model, adapter, windows: list[torch.Tensor] | None,
                   streamed: bool) -> tuple[list[torch.Tensor] | None, Candidates | None]:
    """(the windows the run calibrates and repairs on, the --params search's scorer or None). calibration() drew
    SEARCH_HELD windows more than --calib-samples when this run searches; the scorer reads those, which nothing
    else sees, and repairs each candidate on the others as the run would."""
    search = args.scored_search(streamed)
    if not search:
        return windows, None
    fit, held = windows[:args.calib_samples], windows[args.calib_samples:]
    if search == "cut":  # each candidate scored as cut, before any repair; the run repairs the one it keeps
        return fit, Candidates(model, adapter, fit, held, "kl", None, keep=False, label="kl_cut")
    return fit, Candidates(model, adapter, fit, held, search, _repair_for(args))


def _repair_for(args: Selection):
    """The repair of each search candidate: the run's, with the unpruned model's stream on the windows computed
    once, from the first candidate's copy before it is cut (repair.TeacherStream: the same values, a fifth less
    work per candidate)."""
    if args.repair != "lsq":
        return None
    streams: dict[int, TeacherStream | None] = {}

    def run(model, adapter, p, windows):
        if args.repair_correct > 0 and id(windows) not in streams:
            streams[id(windows)] = teacher_stream(model, adapter, windows)
        run_repair(args, model, adapter, p, windows, quiet=True, stream=streams.get(id(windows)))
    return run


def run_repair(args: Selection, model, adapter, p: Plan, windows: list[torch.Tensor], quiet: bool,
               after=None, stream: TeacherStream | None = None) -> None:
    """`--repair lsq` with the options in `args`; a replayed --plan keeps its channels (a plan is what is kept),
    else (--repair-units obs) the repair re-chooses the MLP channels in `p` and says so in its meta. So `lopper plan`
    predicts a direct prune's counts exactly and its MLP channels only with --repair-units plan or --repair none."""
    reselect = args.repair_units == "obs" and not args.plan
    repair(model, adapter, p, windows, damp=args.repair_damp, correct=args.repair_correct, reselect=reselect,
           quiet=quiet, after=after, stream=stream)
    if reselect:
        p.meta["units"] = "MLP channels chosen by the repair (greedy OBS on calibration inputs)"


def plan(args: PlanArgs | None = None, /, **kwargs) -> Plan:
    """Score and choose without cutting; writes the plan JSON (a dry run of `prune`)."""
    args = resolve_args(PlanArgs, args, kwargs)
    args.check()
    out = Path(args.out)
    if out.exists() and not args.force:
        raise LopperError(f"--out {out} already exists: choose another path or pass --force")
    set_quiet(args.quiet)
    source = model_source(args.model, args.gguf_file)
    model, tok, adapter, _, streamed = load_for(args, source, read_config(source), f"planning {source}")
    args = replace(resolve_repair(args, tok), calib=default_calib(args, model, tok, streamed))
    windows, search = mix_candidates(args, model, adapter, calibration(args, model, tok), streamed)
    p = make_plan(args, model, adapter, windows, search)
    if search is not None and search.kept:
        p = search.take(p)[2]  # with the MLP channels the repair chose: what `prune` will keep
    p.meta["source"] = source
    p.meta["repair"] = args.repair  # what `prune --plan` with --repair auto replays
    p.meta["predicted"] = planned_params(model, type(adapter), p)
    p.sparsity = sp.plan_settings(args) or p.sparsity
    _write_atomic(out, p.to_json())
    return p


def prune(args: PruneArgs | None = None, /, **kwargs) -> dict:
    """Load, score, plan, cut, save (atomically); returns the report also written as DIR/lopper_report.json."""
    args = resolve_args(PruneArgs, args, kwargs)
    args.check()
    source = model_source(args.model, args.gguf_file)
    to_gguf = is_gguf(args.out)
    (gguf_out.check_output if to_gguf else check_output)(args.out, args.force, source)
    if to_gguf:
        _check_gguf_out(args, source)
    set_quiet(args.quiet)
    t0 = time.time()
    config = read_config(source)
    saved_dtype = checkpoint_dtype(config)  # a GGUF's: io.gguf_dtype
    phases = Phases()
    model, tok, adapter, estimate, streamed = load_for(args, source, config, f"pruning {source}")
    phases.lap("load")
    if to_gguf and not args.round_to:  # every matrix row a whole number of its type's blocks
        rt = default_round_to(adapter.hidden_size(), args.device, resolve_dtype(args.dtype, args.device))
        args = replace(args, round_to=math.lcm(rt, gguf_out.block_size(source, args.gguf_type)))
    args = replace(resolve_repair(args, tok), calib=default_calib(args, model, tok, streamed))
    before = {**count_params(model, adapter), "structures": structures(adapter)}
    ppl_before = _maybe_ppl(model, tok, args)
    phases.lap("perplexity_before")
    windows = calibration(args, model, tok)
    phases.lap("calibration")
    windows, search = mix_candidates(args, model, adapter, windows, streamed)
    p = make_plan(args, model, adapter, windows, search)
    phases.lap("plan", ("search", p.meta.get("params", {}).get("seconds", 0.0)))
    p.meta["source"] = source
    p.meta["repair"] = args.repair
    t_repair = time.time()
    if streamed:
        with staged(args.out, args.force, source) as tmp:
            fix = (lambda after: run_repair(args, model, adapter, p, windows, quiet=args.quiet, after=after)) \
                if args.repair == "lsq" else None
            standard = stream.cut_and_write(model, adapter, p, tmp, saved_dtype, fix)
            stream.reopen(model, adapter, tmp)
            sparse = stream.sparsify_written(model, adapter, tmp, saved_dtype, lambda after: sp.for_prune(
                args, p, model, adapter, windows, after=after))
            report = _report(args, source, standard, before, model, adapter, p, sparse, estimate, t0,
                             time.time() - t_repair)
            _add_perplexity(report, ppl_before, model, tok, args)
            write_beside(tmp, source=source, tokenizer=tok, plan=p, report=_finisher(report, phases, source, p),
                         files=sparse.files() if sparse else None)
    else:
        if search is not None and search.kept:
            model, adapter, p, standard = search.take(p)  # the search's winner, cut and repaired already
        else:
            if args.repair == "lsq":
                run_repair(args, model, adapter, p, windows, quiet=args.quiet)
            standard = apply(model, adapter, p)
        t_repair = time.time() - t_repair
        sparse = sp.for_prune(args, p, model, adapter, windows)
        report = _report(args, source, standard, before, model, adapter, p, sparse, estimate, t0, t_repair)
        _add_perplexity(report, ppl_before, model, tok, args)
        if to_gguf:
            report["gguf"] = gguf_out.write(model, adapter, source, args.out, args.gguf_type)
            _write_atomic(gguf_out.beside(args.out, PLAN_FILE), p.to_json())
            _write_atomic(gguf_out.beside(args.out, REPORT_FILE),
                          json.dumps(_finisher(report, phases, source, p)(Path(args.out)), indent=2) + "\n")
        else:
            save(model, args.out, source=source, tokenizer=tok, plan=p, report=_finisher(report, phases, source, p),
                 dtype=saved_dtype, force=args.force, files=sparse.files() if sparse else None)
    return report


def _finisher(report: dict, phases: Phases, source: str, p: Plan):
    """written -> the final report: sizes on disk of what was written (the staged folder, or the .gguf) and of the
    source, and the time of each phase; called once the weights are written, before the folder is renamed, so the
    report is written once. The report page (report.py) goes beside it when matplotlib is installed."""
    def finish(written: Path) -> dict:
        report["size_bytes_after"] = weights_size(written)
        report["phases_seconds"] = phases.lap("cut_save_evaluate", ("repair", report["repair_seconds"]))
        if Path(source).exists():  # a folder, or a .gguf file
            report["size_bytes_before"] = weights_size(source)
        if report_page.available():
            page = written / report_page.PAGE_FILE if written.is_dir() else gguf_out.beside(written, report_page.PAGE_FILE)
            try:
                page.write_text(report_page.render(report, p))
            except Exception as e:  # a plot must never cost the cut model
                log.warning("the report page could not be drawn (%s): `lopper report` draws it again", one_line(e))
        return report
    return finish


def _check_gguf_out(args: PruneArgs, source: str) -> None:
    """What a .gguf output cannot carry, refused before any work."""
    gguf_out.check_source(source)
    found = [b for b in (args.allocation == "global" and "--allocation global (per-layer widths need llama.cpp's "
                         "deci layout, not written yet)", args.stream == "on" and "--stream on") if b]
    if found:
        raise LopperError(f"--out {args.out} is a GGUF file, which cannot be written with {', '.join(found)}: "
                          "write a folder (--out DIR) instead")


def _write_atomic(path: Path, text: str) -> None:
    """A whole file or none: written beside, then renamed over `path`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.lopper-tmp"
    tmp.write_text(text)
    tmp.replace(path)


class Phases(dict):
    """Seconds of each phase of a run, for the report: lap(name) closes the phase that ran since the last lap;
    `part` (name, seconds): a part of it timed inside (the --params search within planning, the repair within
    the cut), reported under its own name and not counted twice."""

    def __init__(self):
        super().__init__()
        self.clock = time.time()

    def lap(self, name: str, part: tuple[str, float] | None = None) -> dict:
        now, (inner, seconds) = time.time(), part or ("", 0.0)
        self[name] = round(now - self.clock - seconds, 2)
        if part:
            self[inner] = round(seconds, 2)
        self.clock = now
        return dict(self)


def load_for(args: Selection, source: str, config, what: str):
    """(model, tokenizer, adapter, memory estimate, streamed): the model in memory, or with its layers streamed from
    the checkpoint (stream.py) when --stream on, or --stream auto and the in-memory estimate does not fit."""
    estimate = memory_estimate(args, source, config)
    blocked = args.not_streamed() or ("a .gguf file" if is_gguf(source) else "")
    streamed = args.stream == "on" or (args.stream == "auto" and not blocked and not memory.fits(estimate, args.device))
    if args.stream == "on" and is_gguf(source):
        raise LopperError(f"--stream on reads safetensors, and {source} is a GGUF file: use --stream off")
    if streamed:
        estimate = memory_estimate(args, source, config, streamed=True)
        log.info("streaming the layers from the checkpoint (estimated peak %.2f GB)", estimate["peak_bytes"] / 1e9)
    hint = None if streamed else (f"--stream on (not with {blocked})" if blocked else "--stream on")
    memory.check_fits(estimate, args.device, what, first=hint)
    model, tok, adapter = (stream.load_streamed if streamed else load_model)(source, args.device, args.dtype)
    return model, tok, adapter, estimate, streamed


def _report(args, source, standard, before, model, adapter, p, sparse, estimate, t0, t_repair) -> dict:
    after = {**count_params(model, adapter), "structures": structures(adapter)}
    report = {
        "lopper_version": __version__, "source": source, "standard_checkpoint": standard,
        "params_before": before["params"], "params_after": after["params"],
        "params_non_embedding_before": before["params_non_embedding"],
        "params_non_embedding_after": after["params_non_embedding"],
        "structures": {k: {"before": before["structures"][k], "after": after["structures"][k]}
                       for k in before["structures"]},
        "plan": p.meta, "args": asdict(args), "command": command_line("prune", args),
    }
    if sparse:
        report["sparsity"] = sparse.report()
    report["memory"] = {"estimate": estimate, "measured": memory.peak(args.device)}
    report["repair_seconds"] = round(t_repair, 2)
    report["seconds"] = round(time.time() - t0, 2)
    return report


def evaluate(args: EvalArgs | None = None, /, **kwargs) -> dict:
    """Parameters, size on disk and (for causal LMs) perplexity on --text and zero-shot accuracy on --tasks."""
    args = resolve_args(EvalArgs, args, kwargs)
    args.check()
    names = zeroshot.check(args.tasks, args.task_data, args.limit, args.batch) if args.tasks else []
    set_quiet(args.quiet)
    source = model_source(args.model, args.gguf_file)
    model, tok, adapter, estimate = _load_for_eval(args, source)
    result = {"model": source, **count_params(model, adapter), "structures": structures(adapter)}
    if Path(source).exists():  # a folder, or a .gguf file
        result["size_bytes"] = weights_size(source)
    if args.text:
        if adapter.is_encoder or not hasattr(model, "lm_head"):
            raise LopperError(f"{args.model} is not a causal LM, so it has no perplexity: drop --text")
        if tok is None:
            raise LopperError(f"{args.model} has no tokenizer files: add them to measure perplexity")
        result.update(perplexity(model, tok, args.text, args.seq_len, args.max_tokens, args.quiet))
    if names:
        if adapter.is_encoder or not hasattr(model, "lm_head"):
            raise LopperError(f"{args.model} is not a causal LM, so lm-eval's zero-shot tasks do not apply: drop "
                              "--tasks")
        if tok is None:
            raise LopperError(f"{args.model} has no tokenizer files: add them to run --tasks")
        result["zeroshot"] = zeroshot.run(model, tok, names, args.task_data, args.limit, args.batch, args.quiet)
    result["memory"] = {"estimate": estimate, "measured": memory.peak(args.device)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _load_for_eval(args: EvalArgs, source: str):
    """(model, tokenizer, adapter, memory estimate): in memory, or with the layers streamed (--stream on, or auto
    when the model does not fit; perplexity then runs one layer at a time, lm-eval's tasks need the whole model)."""
    config = read_config(source)
    streamable = not is_gguf(source) and not getattr(config, "lopper_layout", None)
    estimate = eval_estimate(args, source, config)
    streamed = args.stream == "on" or (args.stream == "auto" and streamable and not args.tasks
                                       and not memory.fits(estimate, args.device))
    if streamed and args.tasks:
        raise LopperError("--tasks runs the whole model through lm-eval, which --stream on does not: use --stream off")
    if streamed:
        estimate = eval_estimate(args, source, config, streamed=True)
    hint = "--stream on" if streamable and not streamed and not args.tasks else None
    memory.check_fits(estimate, args.device, f"evaluating {source}", first=hint)
    model, tok, adapter = (stream.load_streamed if streamed else load_model)(source, args.device, args.dtype)
    return model, tok, adapter, estimate


def eval_estimate(args: EvalArgs, source: str, config, streamed: bool = False) -> dict:
    """memory.estimate_prune with nothing but the forward passes of perplexity: one window at a time in memory,
    evaluate.STREAMED_WINDOWS at a time streamed."""
    shape = memory.model_shape(config, model_class(config))
    on_disk = weights_size(source) if Path(source).exists() else 2 * shape["params"]
    return memory.estimate_prune(
        shape, dtype=resolve_dtype(args.dtype, args.device), device=args.device, checkpoint_bytes=on_disk,
        samples=STREAMED_WINDOWS if streamed else 1, seq_len=args.seq_len, repair=False, correct=0.0,
        sparsegpt=False, search=False, streamed=streamed)


def load(path: str, device: str = "cpu", dtype: str = "auto", semi_structured: bool = False):
    """Load a model folder, standard or with a lopper layout (non-uniform widths, BERT heads), for use.

    semi_structured=True: the 2:4-sparse nn.Linear weights of the layers become torch semi-structured sparse
    tensors (`torch.sparse.to_sparse_semi_structured`). Those kernels exist only on CUDA, so this raises LopperError
    on a machine without CUDA or with device other than cuda (it never silently keeps the model dense); shapes
    or dtypes the kernels refuse stay dense, with a warning. Whether it is faster must be measured per GPU."""
    model, _, adapter = load_model(path, device, dtype)
    if semi_structured:
        sp.to_semi_structured(model, adapter)
    return model


def structures(adapter) -> dict[str, int | list[int]]:
    """Counts per structure; a per-layer list where layers differ."""
    layers = adapter.layers()
    per = [adapter.layer_widths(l) for l in layers]
    out: dict = {"layers": len(layers), "hidden": adapter.hidden_size()}
    for k in per[0]:
        vals = [w[k] for w in per]
        out[k] = vals[0] if len(set(vals)) == 1 else vals
    return out


def memory_estimate(args: Selection, source: str, config, streamed: bool = False) -> dict:
    """memory.estimate_prune for these arguments, from the source's config alone (nothing is loaded)."""
    if getattr(config, "lopper_layout", None):
        return {"peak_bytes": 0, "weights_bytes": 0, "phases_bytes": {}, "largest_phase": None}  # refused later
    shape = memory.model_shape(config, model_class(config))
    on_disk = weights_size(source) if Path(source).exists() else 2 * shape["params"]
    spec = sp.Spec.from_args(args)
    return memory.estimate_prune(
        shape, dtype=resolve_dtype(args.dtype, args.device), device=args.device, checkpoint_bytes=on_disk,
        samples=args.calib_samples, seq_len=args.seq_len, repair=args.repair != "none",
        correct=args.repair_correct, sparsegpt=spec.active and spec.criterion == "sparsegpt",
        search=bool(args.scored_search(streamed)) or (bool(args.target_speedup) and args.params_search == "loss"),
        all_pairs=args.layer_metric == "angular", streamed=streamed, sparse=spec.active,
        fisher=args.width_metric == "fisher")


def _add_perplexity(report: dict, before: dict | None, model, tok, args: PruneArgs) -> None:
    if before:
        report["perplexity_before"] = before
        report["perplexity_after"] = _maybe_ppl(model, tok, args)


def _maybe_ppl(model, tok, args: PruneArgs):
    if not getattr(args, "eval_text", "") or tok is None or not hasattr(model, "lm_head"):
        return None
    return perplexity(model, tok, args.eval_text, args.eval_seq_len, args.eval_max_tokens, args.quiet)
