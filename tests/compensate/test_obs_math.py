"""The OBS math on random linear layers: greedy block removal equals the least-squares refit."""

from __future__ import annotations

import numpy as np
import pytest

from graphprune.obs import energy, least_squares_refit, obs_remove, removal_errors


def _layer(seed: int, d: int = 24, n: int = 400, out: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((d, d)) @ rng.standard_normal((d, n)) * 0.3 + rng.standard_normal((d, 1))
    x = np.vstack([x, np.ones((1, n))])  # the constant row: bias absorption
    return rng.standard_normal((out, d + 1)), x, x @ x.T / n


@pytest.mark.parametrize("block", [None, 1, 3])
def test_greedy_obs_equals_least_squares_refit(block: int | None) -> None:
    w, _, h = _layer(0)
    remove = np.array([2, 5, 6, 11, 17, 20])
    kept = np.setdiff1d(np.arange(w.shape[1]), remove)
    res = obs_remove(w, h, remove, damping=1e-3, block=block)
    np.testing.assert_allclose(res.weights, least_squares_refit(w, h, kept, damping=1e-3), rtol=1e-7, atol=1e-9)


def test_predicted_error_is_the_output_error() -> None:
    w, x, h = _layer(1)
    remove = np.array([0, 3, 4, 9])
    kept = np.setdiff1d(np.arange(w.shape[1]), remove)
    res = obs_remove(w, h, remove, damping=0.0)
    measured = np.mean(np.sum((w @ x - res.weights @ x[kept]) ** 2, axis=0))
    assert res.error == pytest.approx(measured, rel=1e-6)


def test_compensation_beats_plain_removal_and_bias_absorbs_the_mean() -> None:
    w, x, h = _layer(2)
    remove = np.array([1, 2, 3, 7, 8])
    kept = np.setdiff1d(np.arange(w.shape[1]), remove)
    comp = obs_remove(w, h, remove).weights
    err_comp = np.mean((w @ x - comp @ x[kept]) ** 2)
    err_plain = np.mean((w @ x - w[:, kept] @ x[kept]) ** 2)
    assert err_comp < 0.5 * err_plain
    # a removed channel that is constant is carried exactly by the bias column
    x2 = x.copy()
    x2[4] = 2.5
    h2 = x2 @ x2.T / x2.shape[1]
    comp2 = obs_remove(w, h2, np.array([4]), damping=1e-10).weights
    keep2 = np.setdiff1d(np.arange(w.shape[1]), [4])
    np.testing.assert_allclose(comp2 @ x2[keep2], w @ x2, atol=1e-5)


def test_zero_removal_changes_nothing() -> None:
    w, _, h = _layer(3)
    res = obs_remove(w, h, np.array([], dtype=np.int64))
    np.testing.assert_array_equal(res.weights, w)
    assert res.error == 0.0


def test_removal_errors_are_obs_remove_errors_block_by_block() -> None:
    w, _, h = _layer(4)
    blocks = [np.array([0]), np.array([3, 4]), np.array([7, 8]), np.array([10, 11, 12]), np.array([], dtype=np.int64)]
    got = removal_errors(w, h, blocks, damping=0.01)
    want = [obs_remove(w, h, m, damping=0.01).error for m in blocks]
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("block", [None, 2])
def test_obs_remove_reports_the_undamped_output_energy(block: int | None) -> None:
    w, _, h = _layer(5)
    h[3] = h[:, 3] = 0.0  # a dead input: damping puts 1 alone on its diagonal
    res = obs_remove(w, h, np.array([1, 4, 9, 10]), damping=0.05, block=block)
    assert res.energy == pytest.approx(energy(w, h), rel=1e-10)
