"""lopper: structured pruning of transformer models into standard Hugging Face checkpoints."""
__version__ = "0.1.0"

from .api import EvalArgs, PlanArgs, PruneArgs, evaluate, load, plan, prune  # noqa: E402
from .bench import BenchArgs, bench  # noqa: E402
from .errors import LopperError  # noqa: E402
from .export import ExportArgs, export  # noqa: E402
from .heal import HealArgs, heal  # noqa: E402
from .plan import Plan  # noqa: E402

__all__ = ["BenchArgs", "EvalArgs", "ExportArgs", "HealArgs", "LopperError", "Plan", "PlanArgs", "PruneArgs", "bench",
           "evaluate", "export", "heal", "load", "plan", "prune"]
