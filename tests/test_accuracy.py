"""Real-data accuracy of pruned digits nets: the problem OBS compensation must solve, and whether it does.

The nets are trained on scikit-learn's digits (seconds each, cached under benchmarks/.cache/accuracy/);
cells come from the benchmark's own runner (benchmarks/accuracy/run.py), so the test and the published
table cannot drift apart.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from benchmarks.accuracy import models, run

pytestmark = pytest.mark.slow

HALF = 0.5
# Best-of(global, local) L2 magnitude pruning without compensation at -50% FLOPs, on nets trained fresh
# (as CI does) with torch 2.13.0+cpu. A large move means the selector or the training changed: re-run the
# benchmark and update. (ResNet was recorded at 0.443 on an older cached net; trained fresh, the same
# selector gives 0.385 at every commit back to d0eb350; with --round-to auto the default, at the widths
# tests/conftest.py pins, 0.278 and MobileNetV2 0.150, from 0.119.)
RECORDED_MAGNITUDE = {"resnet": 0.278, "mobilenetv2": 0.150, "vit": 0.539, "mlp": 0.959}
RECORD_TOLERANCE = 0.05
# The wide MLP loses little to magnitude pruning at -50% (it does at -70%): no drop to show there.
COLLAPSES_AT_HALF = ("resnet", "mobilenetv2", "vit")
METHODS = {m.key: m for m in run.METHODS}


@functools.cache
def dense(arch: str) -> float:
    task = models.task(arch)
    return task.score(task.onnx_path)["accuracy"]


@functools.cache
def pruned(arch: str, method: str) -> run.Cell:
    m = METHODS[method]
    if m.ranking_of:  # as the benchmark runs it: with the ranking that method chose
        chosen = pruned(arch, m.ranking_of).ranking
        return run.run_cell(models.task(arch), m, HALF, {chosen: run.RANKINGS[chosen]})
    return run.run_cell(models.task(arch), m, HALF)


@pytest.mark.parametrize("arch", models.ARCHS)
def test_dense_accuracy(arch: str) -> None:
    assert dense(arch) >= 0.95


@pytest.mark.parametrize("arch", models.ARCHS)
def test_magnitude_at_half_flops_is_as_recorded(arch: str) -> None:
    cell = pruned(arch, "magnitude")
    assert not cell.error, cell.detail
    assert cell.reduction is not None and cell.reduction >= HALF - 0.005
    acc = cell.scores["accuracy"]
    assert abs(acc - RECORDED_MAGNITUDE[arch]) <= RECORD_TOLERANCE, f"{arch}: {acc:.3f} ({cell.ranking})"
    if arch in COLLAPSES_AT_HALF:
        assert acc < dense(arch) - 0.05, "magnitude pruning no longer hurts: the benchmark shows nothing"


def _losers(method: str) -> dict[str, str]:
    results = {arch: (pruned(arch, method).headline, pruned(arch, "magnitude").headline) for arch in models.ARCHS}
    return {arch: f"{method} {o:.3f} <= magnitude {m:.3f}" for arch, (o, m) in results.items() if not o > m}


def test_obs_with_calibration_beats_magnitude_at_half_flops() -> None:
    assert not _losers("obs_calib")


@pytest.mark.parametrize("method", ["obs", "obs_crit"])
def test_data_free_obs_beats_magnitude_at_half_flops(method: str) -> None:
    """Without any data: L2 selection + OBS, and OBS importance + OBS (issue 5's goal on these nets)."""
    assert not _losers(method)


# Recovery (issue 11) at -50% FLOPs, the benchmark's own cells, as fractions of dense accuracy. Measured
# when written (benchmarks/accuracy/RESULTS.md, ResNet / MobileNetV2 / ViT / MLP): with 256 unlabelled
# training images .996 / .979 / .987 / 1.00 (mean .991, 2000 steps), data-free .989 / .912 / .944 / .998
# (mean .961); with --round-to auto the default: .994 / .987 / .987 / 1.00 (mean .992) and .981 / .936 /
# .944 / .998 (mean .965).
# The floors leave room for run-to-run noise (about ±.01 per net).
RECOVERED_FLOOR = {"recover_unlabelled": (0.95, 0.98), "recover": (0.85, 0.95)}  # (every net, mean)


@pytest.mark.parametrize("method", ["recover_unlabelled", "recover"])
def test_recovery_brings_back_dense_accuracy(method: str) -> None:
    fractions = {arch: pruned(arch, method).headline / dense(arch) for arch in models.ARCHS}
    each, mean_floor = RECOVERED_FLOOR[method]
    assert min(fractions.values()) >= each, fractions
    one_shot = {arch: pruned(arch, "obs_crit").headline / dense(arch) for arch in models.ARCHS}
    mean = sum(fractions.values()) / len(fractions)
    assert mean >= mean_floor and mean > sum(one_shot.values()) / len(one_shot) + 0.1, (fractions, one_shot)
