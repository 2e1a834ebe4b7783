"""Recovery: distil the pruned model from the dense one (torch is imported only in this package)."""
