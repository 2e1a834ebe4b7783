"""graphprune: framework-agnostic, data-free structured pruning of ONNX graphs."""

from graphprune.api import Analysis, PruneResult, analyze, prune
from graphprune.config import PruneConfig
from graphprune.errors import (
    GraphpruneError,
    InvalidModelError,
    ModelTooLargeError,
    TargetImpossibleError,
    UsageError,
    ValidationFailedError,
)

__all__ = [
    "Analysis",
    "GraphpruneError",
    "InvalidModelError",
    "ModelTooLargeError",
    "PruneConfig",
    "PruneResult",
    "TargetImpossibleError",
    "UsageError",
    "ValidationFailedError",
    "analyze",
    "prune",
]
__version__ = "0.1.0"
