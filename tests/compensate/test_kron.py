"""The Kronecker-factored H of wide Convs (obs.Kron, H ≈ A ⊗ S over channels ⊗ kernel taps): where H
really is A ⊗ S it is exact OBS, at O(C³) instead of O((C·k)³); its statistics are the tap-averaged
channel moments of the same im2col rows; the constant channel carries the bias."""

from __future__ import annotations

import numpy as np
import pytest

from graphprune.compensate import MomentSums, factored
from graphprune.config import PruneConfig
from graphprune.consumers import LinearView
from graphprune.errors import UsageError
from graphprune.obs import Kron, energy, obs_remove, removal_errors


def _kron(seed: int, c: int = 6, taps: int = 9, out: int = 5, n: int = 500) -> tuple[np.ndarray, Kron]:
    """W over (C + 1 constant) channels × taps, and A ⊗ S with A from channels that have a mean."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((c, c)) @ rng.standard_normal((c, n)) * 0.5 + rng.standard_normal((c, 1))
    x = np.vstack([x, np.ones((1, n))])
    t = rng.standard_normal((taps, taps))
    s = t @ t.T + taps * np.eye(taps)
    return rng.standard_normal((out, (c + 1) * taps)), Kron(x @ x.T / n, s / np.diagonal(s).mean())


def _cols(channels: list[int], taps: int) -> np.ndarray:
    return (np.array(channels)[:, None] * taps + np.arange(taps)).reshape(-1)


@pytest.mark.parametrize("channels", [[0], [1, 4], [0, 2, 3, 5]])
def test_on_an_exactly_kronecker_h_factored_obs_is_exact_obs(channels: list[int]) -> None:
    w, h = _kron(0)
    remove = _cols(channels, h.taps)
    fact, exact = obs_remove(w, h, remove, damping=0.0), obs_remove(w, h.full(), remove, damping=0.0)
    np.testing.assert_allclose(fact.weights, exact.weights, rtol=1e-8, atol=1e-9)
    assert fact.error == pytest.approx(exact.error, rel=1e-8)
    assert energy(w, h) == pytest.approx(energy(w, h.full()), rel=1e-12)


def test_removal_errors_match_the_exact_ones_and_obs_remove() -> None:
    w, h = _kron(1)
    blocks = [_cols([0], h.taps), _cols([2], h.taps), _cols([1, 3], h.taps), _cols([4, 5], h.taps),
              np.array([], dtype=np.int64)]
    fact = removal_errors(w, h, blocks, damping=0.0)
    np.testing.assert_allclose(fact, removal_errors(w, h.full(), blocks, damping=0.0), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fact, [obs_remove(w, h, m, damping=0.0).error for m in blocks], rtol=1e-8, atol=1e-10)


def test_the_update_refits_each_tap_on_the_channel_moments_and_ignores_s() -> None:
    w, h = _kron(2)
    remove = _cols([1, 3], h.taps)
    res = obs_remove(w, h, remove, damping=0.01)
    other = obs_remove(w, Kron(h.a, np.eye(h.taps)), remove, damping=0.01)
    np.testing.assert_allclose(res.weights, other.weights, rtol=1e-10)
    kept_ch = np.setdiff1d(np.arange(h.a.shape[0]), [1, 3])
    a = h.a + 0.01 * np.diagonal(h.a).mean() * np.eye(h.a.shape[0])
    w3 = w.reshape(w.shape[0], -1, h.taps)
    want = np.einsum("ocs,ck->oks", w3, a[:, kept_ch] @ np.linalg.inv(a[np.ix_(kept_ch, kept_ch)]))
    np.testing.assert_allclose(res.weights, want.reshape(w.shape[0], -1), rtol=1e-8, atol=1e-10)


def test_zero_removal_changes_nothing() -> None:
    w, h = _kron(3)
    res = obs_remove(w, h, np.array([], dtype=np.int64))
    np.testing.assert_array_equal(res.weights, w)
    assert res.error == 0.0


def test_partial_channels_are_refused() -> None:
    w, h = _kron(4)
    with pytest.raises(ValueError, match="whole channels"):
        obs_remove(w, h, np.array([0, 1]))


def test_the_constant_channel_absorbs_a_constant_removed_channel_into_the_bias() -> None:
    rng = np.random.default_rng(5)
    c, taps, n = 5, 9, 400
    x = rng.standard_normal((c, n))
    x[2] = 2.5  # channel 2 is constant at every position and tap
    x = np.vstack([x, np.ones((1, n))])
    w = rng.standard_normal((4, (c + 1) * taps))
    w[:, c * taps:] = 0.0
    w[:, c * taps + taps // 2] = rng.standard_normal(4)  # the bias on the centre tap, as `augmented` puts it
    res = obs_remove(w, Kron(x @ x.T / n, np.eye(taps)), _cols([2], taps), damping=1e-12)
    w3, v3 = w.reshape(4, c + 1, taps), res.weights.reshape(4, c, taps)
    np.testing.assert_allclose(v3[:, :4], w3[:, [0, 1, 3, 4]], atol=1e-6)  # the others untouched
    bias_before, bias_after = w3[:, c].sum(axis=1), v3[:, -1].sum(axis=1)
    np.testing.assert_allclose(bias_after - bias_before, 2.5 * w3[:, 2].sum(axis=1), rtol=1e-6)
    assert res.error == pytest.approx(0.0, abs=1e-8)


def _conv_view(c: int, kernel: tuple[int, int], pads: tuple[int, ...] = (1, 1, 1, 1),
               strides: tuple[int, int] = (1, 1), dilations: tuple[int, int] = (1, 1)) -> LinearView:
    return LinearView("conv", "Conv", "x", 1, "w", "b", np.ones(c, dtype=bool), kernel, strides, pads, dilations)


@pytest.mark.parametrize(("pads", "strides", "dilations"), [((1, 1, 1, 1), (1, 1), (1, 1)),
                                                            ((0, 1, 1, 0), (2, 2), (1, 1)),
                                                            ((2, 2, 2, 2), (1, 2), (2, 1))])
def test_moment_sums_factor_the_im2col_moments(pads: tuple[int, ...], strides: tuple[int, int],
                                               dilations: tuple[int, int]) -> None:
    """A (from pixels weighted by tap coverage) = the tap-averaged channel block of the exact H over
    all patches, padding zeros included, its last row the channel means; S = the channel-summed tap
    block, normalised to mean diagonal 1 (all patches are sampled here: fewer than the row limits)."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((2, 4, 7, 6)) + 0.5).astype(np.float32)
    view = _conv_view(4, (3, 3), pads, strides, dilations)
    exact = MomentSums([view], seed=0)
    fact = MomentSums([LinearView(**{**view.__dict__, "kron": True})], seed=0)
    exact.add({"x": x})
    fact.add({"x": x})
    h, k = exact.means()["conv"], fact.means()["conv"]
    assert isinstance(k, Kron) and isinstance(h, np.ndarray)
    blocks = h[:-1, :-1].reshape(4, 9, 4, 9)
    np.testing.assert_allclose(k.a[:-1, :-1], np.einsum("csds->cd", blocks) / 9, rtol=1e-5)
    np.testing.assert_allclose(k.a[-1, :-1], h[-1, :-1].reshape(4, 9).mean(axis=1), rtol=1e-5)
    assert k.a[-1, -1] == pytest.approx(1.0)
    s = np.einsum("csct->st", blocks)
    np.testing.assert_allclose(k.s, s / np.diagonal(s).mean(), rtol=1e-5)


def test_which_views_are_factored() -> None:
    cfg = PruneConfig()
    assert factored(_conv_view(200, (3, 3)), cfg)  # 1800 columns
    assert not factored(_conv_view(64, (3, 3)), cfg)  # 576: exact, like every digits net
    assert not factored(_conv_view(4096, (1, 1), (0, 0, 0, 0)), PruneConfig(kron_columns=0))  # 1x1: the same
    assert factored(_conv_view(2, (3, 3)), PruneConfig(kron_columns=0))
    with pytest.raises(UsageError, match="kron_columns"):
        PruneConfig(kron_columns=-1)


def test_obs_remove_reports_the_undamped_output_energy() -> None:
    w, h = _kron(7)
    res = obs_remove(w, h, _cols([2, 3], h.taps), damping=0.05)
    assert res.energy == pytest.approx(energy(w, h.full()), rel=1e-10)


def test_exact_moments_are_the_same_however_the_rows_arrive() -> None:
    """Rows gathered over many small batches (a batch-1 model's late layers) and flushed into one Gram
    product give E[[x; 1][x; 1]ᵀ] of all rows, exactly as one batch holding them all."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((60, 5, 3, 3)) * 2 + 1).astype(np.float32)
    view = LinearView("conv", "Conv", "x", 1, "w", "b", np.ones(5, dtype=bool), (1, 1), (1, 1), (0, 0, 0, 0),
                      (1, 1))
    whole, pieces = MomentSums([view], seed=0), MomentSums([view], seed=0)
    whole.add({"x": x})
    for i in range(0, len(x), 1):  # 9 rows per batch: hundreds of batches before a flush
        pieces.add({"x": x[i:i + 1]})
    rows = np.moveaxis(x, 1, -1).reshape(-1, 5).astype(np.float64)
    rows = np.hstack([rows, np.ones((len(rows), 1))])
    want = rows.T @ rows / len(rows)
    for got in (whole.means()["conv"], pieces.means()["conv"]):
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
