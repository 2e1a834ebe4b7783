"""Clean-up passes on a finished model (after pruning, before validation)."""

from graphprune.passes.activations import fuse_hardswish
from graphprune.passes.fold import fold_batchnorms, folded_affine
from graphprune.passes.retie import retie

__all__ = ["fold_batchnorms", "folded_affine", "fuse_hardswish", "retie"]
