"""The sparsity settings: the `--sparsity-*` options checked, and what they need (calibration) and record (the plan's
"sparsity" entry)."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path


from ..errors import LopperError

log = logging.getLogger("lopper")

CRITERIA = ("magnitude", "wanda", "sparsegpt")
SCOPES = ("row", "layer", "global")
ALLOCATIONS = ("uniform", "owl")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


# ---- settings ---------------------------------------------------------------------------------------------------
@dataclass
class Spec:
    """The sparsity settings (the `sparsity_*` fields of api.Selection without the prefix)."""

    sparsity: float = 0.0
    pattern: str = "unstructured"
    criterion: str = "wanda"
    scope: str = "row"
    ignore: str = ""
    allocation: str = "uniform"

    @classmethod
    def from_args(cls, args) -> Spec:
        return cls(sparsity=args.sparsity, pattern=args.sparsity_pattern, criterion=args.sparsity_criterion,
                   scope=args.sparsity_scope, ignore=args.sparsity_ignore, allocation=args.sparsity_allocation)

    @classmethod
    def from_settings(cls, d: dict) -> Spec:
        return cls(**{k: d[k] for k in asdict(cls()) if k in d})

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, None for unstructured."""
        if self.pattern == "unstructured":
            return None
        m = _NM.match(str(self.pattern))
        if not m:
            raise LopperError(f"--sparsity-pattern {self.pattern!r} is unknown: use unstructured or N:M such as 2:4 "
                              "or 4:8 (N nonzeros in every M inputs)")
        return int(m.group(1)), int(m.group(2))

    @property
    def active(self) -> bool:
        return self.sparsity > 0 or self.pattern != "unstructured"

    @property
    def target(self) -> float:
        """The fraction zeroed: --sparsity, or 1 - N/M for N:M."""
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else self.sparsity

    def check(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise LopperError(f"--sparsity {self.sparsity} is out of range: give the fraction of the remaining "
                              "weights to zero, 0 <= F < 1")
        for flag, value, allowed in (("--sparsity-criterion", self.criterion, CRITERIA),
                                     ("--sparsity-scope", self.scope, SCOPES),
                                     ("--sparsity-allocation", self.allocation, ALLOCATIONS)):
            if value not in allowed:
                raise LopperError(f"{flag} {value!r} is unknown: use {', '.join(allowed)}")
        try:
            re.compile(self.ignore)
        except re.error as e:
            raise LopperError(f"--sparsity-ignore {self.ignore!r} is not a regular expression ({e}): fix it")
        nm = self.nm
        if not self.active:
            if self != Spec(sparsity=self.sparsity):
                raise LopperError("the --sparsity-* options do nothing without --sparsity F or an N:M "
                                  "--sparsity-pattern: add one or drop them")
            return
        if nm:
            n, m = nm
            if not 0 < n < m:
                raise LopperError(f"--sparsity-pattern {self.pattern} keeps {n} of every {m} weights: N:M needs "
                                  "0 < N < M")
            if self.sparsity and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise LopperError(f"--sparsity-pattern {self.pattern} zeroes {1 - n / m:g} of the weights, not "
                                  f"{self.sparsity:g}: pass --sparsity {1 - n / m:g} or leave --sparsity at 0")
            if self.scope != "row":
                raise LopperError(f"--sparsity-scope {self.scope} is for unstructured sparsity; N:M always counts "
                                  "per group of M inputs: drop --sparsity-scope")
            if self.allocation == "owl":
                raise LopperError("--sparsity-allocation owl varies the fraction per layer, which a fixed N:M "
                                  "pattern cannot: use --sparsity-pattern unstructured or uniform allocation")
        if self.scope == "global" and self.criterion == "sparsegpt":
            raise LopperError("--sparsity-criterion sparsegpt prunes layer by layer and cannot rank weights "
                              "globally: use --sparsity-scope row or layer")
        if self.scope == "global" and self.allocation == "owl":
            raise LopperError("--sparsity-allocation owl sets a fraction per layer and --sparsity-scope global one "
                              "threshold for all: choose one of them")

    def needs_calibration(self, have_masks: bool = False) -> bool:
        if not self.active:
            return False
        if have_masks:
            return self.criterion == "sparsegpt"  # the weight updates are recomputed for the recorded masks
        return self.criterion != "magnitude" or self.allocation == "owl"

    def settings(self) -> dict:
        return {**asdict(self), "target": round(self.target, 6)}


def check_args(args) -> None:
    """Validate the --sparsity-* options of an api.Selection (LopperError one-liners)."""
    spec = Spec.from_args(args)
    if args.plan and spec != Spec() and _plan_entry_on_disk(args.plan):
        raise LopperError("--plan replays a plan as it is, its sparsity included: drop the --sparsity options")
    spec.check()


def _plan_entry_on_disk(plan_path: str) -> dict | None:
    try:
        return json.loads(Path(plan_path).read_text()).get("sparsity")
    except (OSError, ValueError, AttributeError):
        return None  # Plan.load reports the problem


def needs_calibration(args) -> bool:
    """Whether the sparsity requested by `args` (or recorded in the plan it replays) needs calibration windows."""
    entry = _plan_entry_on_disk(args.plan) if args.plan else None
    if entry:
        return Spec.from_settings(entry).needs_calibration(bool(entry.get("masks")))
    return Spec.from_args(args).needs_calibration()


def plan_settings(args) -> dict | None:
    """The plan's "sparsity" entry for a dry run (`lopper plan`): the settings, no masks yet (None: none asked)."""
    spec = Spec.from_args(args)
    return spec.settings() if spec.active else None
