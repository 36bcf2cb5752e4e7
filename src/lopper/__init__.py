"""lopper: structured pruning of transformer models into standard Hugging Face checkpoints."""
from .api import EvalArgs, PlanArgs, PruneArgs, evaluate, load, plan, prune
from .bench import BenchArgs, bench
from .errors import LopperError
from .export import ExportArgs, export
from .heal import HealArgs, heal
from .plan import Plan
from .version import __version__

__all__ = ["__version__", "BenchArgs", "EvalArgs", "ExportArgs", "HealArgs", "LopperError", "Plan", "PlanArgs", "PruneArgs", "bench",
           "evaluate", "export", "heal", "load", "plan", "prune"]
