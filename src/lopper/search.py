"""Scoring candidate plans by the model each one gives: the --params search (kl, loss) and --target-speedup's loss.

A candidate is cut and repaired on a copy of the model exactly as the run will cut and repair it, then scored on
calibration windows that the repair never saw: with `kl`, the mean per-token KL(unpruned || cut) of the next-token
distributions (all of them, not only the sampled token, so a window says more than a cross-entropy on the same
tokens would), window by window so that two candidates are compared with a standard error; with `loss`, the cross-entropy on the windows' own tokens; encoders: 1 - cosine of the pooled
outputs. The scored candidates' models are kept, so the run saves the very model it chose and does not repair
again.

Why the whole repair and not a short one: a score is only as good as its likeness to the model that will be saved.
Repaired on 16 windows instead of 64, SmolLM2's candidates ranked by KL put the depth-only cut first and the
half-by-depth cut second; repaired as the run repairs them, half by depth is first and depth only third
(docs/mix_smollm2_25.md; the two scores read different held-out windows, and the cuts' KLs moved by 0.02 to 0.08,
each by its own amount). So the search scores the saved model itself, at the price of one full repair per
candidate.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .arch import Adapter
from .evaluate import teacher_outputs, window_losses
from .plan import Plan
from .surgery import apply, log, recorded, silenced


class Score(float):
    """A candidate's score (the mean over the held-out windows) that also carries the value of each window, so that
    two candidates can be compared window by window (select.least_depth_within_noise)."""
    windows: list[float]

    def __new__(cls, windows: list[float]):
        score = super().__new__(cls, sum(windows) / len(windows))
        score.windows = windows
        return score


@dataclass
class Scored:
    value: float
    model: nn.Module  # cut and repaired
    plan: Plan  # the candidate's plan as the repair left it (it may re-choose MLP channels)
    standard: bool  # surgery.apply's answer: a standard checkpoint
    lines: list  # surgery's `old -> new` log records of this cut, logged if it wins


class Candidates:
    """plan -> score (lower is better; a Score, with each window's value) of the model cut and repaired by that
    plan; with `keep`, every scored candidate's model is kept until `take` hands over the chosen one (the choice
    need not be the lowest mean: select.least_depth_within_noise). `repair(model, adapter, plan, windows)` is the
    run's repair (None: no repair)."""

    def __init__(self, model: nn.Module, adapter: Adapter, fit: list[torch.Tensor], held: list[torch.Tensor],
                 metric: str, repair: Callable | None, keep: bool = True, label: str = ""):
        self.model, self.adapter, self.fit, self.held = model, adapter, fit, held
        self.metric, self.repair, self.keep = metric, repair, keep
        self.label = label or metric  # the score's name in the plan's record
        self.reference = teacher_outputs(model, held, log_probs=metric == "kl")
        self.kept: dict[tuple, Scored] = {}  # every scored candidate's model, by kept layers, until one is taken

    def __call__(self, plan: Plan) -> float:
        trial, p = copy.deepcopy(self.model), copy.deepcopy(plan)
        trial_adapter = type(self.adapter)(trial)
        with silenced():
            if self.repair is not None:
                self.repair(trial, trial_adapter, p, self.fit)
        with recorded() as lines:
            standard = apply(trial, trial_adapter, p)
        value = Score(window_losses(trial, self.held, self.reference))
        if self.keep:
            self.kept[tuple(p.layers)] = Scored(value, trial, p, standard, lines)
        return value

    def take(self, chosen: Plan) -> tuple[nn.Module, Adapter, Plan, bool]:
        """(model, adapter, plan, standard) of the chosen candidate: the plan carries the search's record
        (chosen.meta) and the channels the repair kept."""
        best = self.kept.get(tuple(chosen.layers))
        assert best is not None, "the search did not keep the chosen candidate"
        best.plan.meta = {**chosen.meta, **best.plan.meta}
        self.kept, self.model, self.reference = {}, None, None  # the unpruned model may go once the caller lets go
        for line in best.lines:
            log.handle(line)
        return best.model, type(self.adapter)(best.model), best.plan, best.standard
