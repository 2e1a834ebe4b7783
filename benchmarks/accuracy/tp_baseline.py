"""Torch-Pruning's data-free magnitude pruning, driven to a FLOPs target like graphprune's target="flops".

Torch-Pruning takes a channel ratio, not a FLOPs budget, so the ratio is bisected until its own MACs
counter (torch_pruning.utils.count_ops_and_params) reports the requested reduction within
TOLERANCE (or, optionally, until graphprune's counter on the re-exported net does: the two counters
disagree on what a channel costs, see RESULTS.md). Each attempt prunes a fresh deep copy of the net.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks.accuracy.common import TorchNet

if TYPE_CHECKING:
    import torch
    from torch import nn

TOLERANCE = 0.005  # well inside the 1-point band the tables treat as "equal FLOPs"
MAX_STEPS = 16
MAX_RATIO = 0.9  # per-layer cap, the same as graphprune's default max_group_sparsity


@dataclass
class Pruned:
    model: nn.Module
    ratio: float  # Torch-Pruning's pruning_ratio that hit the target
    reduction: float  # MACs removed by Torch-Pruning's own counter


def _inputs(net: TorchNet) -> torch.Tensor | tuple[torch.Tensor, ...]:
    values = tuple(net.example.values())
    return values[0] if len(values) == 1 else values


def macs(model: nn.Module, net: TorchNet) -> int:
    import torch_pruning as tp

    return int(tp.utils.count_ops_and_params(model, _inputs(net))[0])


def prune_once(net: TorchNet, ratio: float, global_pruning: bool) -> nn.Module:
    """GroupMagnitudeImportance(p=2) through MetaPruner: Torch-Pruning's data-free L2 baseline."""
    import torch_pruning as tp

    net = copy.deepcopy(net)  # one memo: the ignored layers and heads stay those of the copied model
    pruner = tp.pruner.MetaPruner(
        net.model, _inputs(net), importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, global_pruning=global_pruning, max_pruning_ratio=MAX_RATIO,
        ignored_layers=net.ignored, num_heads=net.num_heads)
    pruner.step()
    return net.model.eval()


def prune_to_flops(net: TorchNet, target: float, global_pruning: bool,
                   counter: Callable[[nn.Module], int] | None = None) -> Pruned:
    """Bisect the channel ratio until the MACs reduction is within TOLERANCE of `target`; the closest
    attempt is returned when the discrete channel counts never land inside it. `counter` counts a
    model's MACs: Torch-Pruning's own unless another yardstick is given."""
    count = counter or (lambda model: macs(model, net))
    before = count(net.model)
    lo, hi = 0.0, MAX_RATIO
    best: Pruned | None = None
    for _ in range(MAX_STEPS):
        ratio = (lo + hi) / 2
        model = prune_once(net, ratio, global_pruning)
        got = Pruned(model, ratio, 1.0 - count(model) / before)
        if best is None or abs(got.reduction - target) < abs(best.reduction - target):
            best = got
        if abs(got.reduction - target) <= TOLERANCE:
            break
        lo, hi = (ratio, hi) if got.reduction < target else (lo, ratio)
    assert best is not None
    return best
