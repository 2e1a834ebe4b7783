"""The synthetic input families behind data-free OBS statistics."""

from __future__ import annotations

import numpy as np
import pytest

from graphprune.inputs import InputSpec
from graphprune.synthetic import KINDS, _pink, batches

IMAGE = InputSpec("x", (4, 3, 16, 24), np.dtype(np.float32), 2)
TOKENS = InputSpec("ids", (4, 8), np.dtype(np.int64), 50)


def test_pink_fields_are_standardised_per_sample_and_spatially_smooth() -> None:
    x = _pink(np.random.default_rng(0), (32, 3, 16, 24))
    assert x.shape == (32, 3, 16, 24)
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), 0.0, atol=1e-9)
    np.testing.assert_allclose(x.std(axis=(1, 2, 3)), 1.0, rtol=1e-9)
    neighbours = np.corrcoef(x[..., :-1].ravel(), x[..., 1:].ravel())[0, 1]
    far = np.corrcoef(x[..., :-12].ravel(), x[..., 12:].ravel())[0, 1]
    assert neighbours > 0.5 > far  # power falls off with frequency: near pixels agree, far ones less
    channels = np.corrcoef(x[:, 0].ravel(), x[:, 1].ravel())[0, 1]
    assert 0.2 < channels < 0.9  # a shared field plus each channel's own, like colour channels


def test_mixed_cycles_through_blobs_pink_and_strokes_batches() -> None:
    mixed = list(batches([IMAGE], 24, None, "mixed", seed=3))
    assert len(mixed) == 6
    for i, feeds in enumerate(mixed):
        x = feeds["x"]
        assert x.shape == IMAGE.shape and x.dtype == np.float32
        if i % 3 == 0:  # blobs: smooth fields squashed into (0, 1)
            assert x.min() > 0.0 and x.max() < 1.0
        elif i % 3 == 1:  # pink: zero-centred, unit variance per sample
            np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
            assert x.min() < -1.0 or x.max() > 1.0
        else:  # strokes: most pixels on the flat -1 background, a few saturated at +1
            assert x.min() == -1.0 and x.max() == 1.0
            background = (x == -1.0).mean()
            assert 0.45 < background < 0.75 and 0.03 < (x == 1.0).mean() < 0.2


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_seeded_and_keeps_tokens_in_range(kind: str) -> None:
    first = list(batches([IMAGE, TOKENS], 8, None, kind, seed=1))
    again = list(batches([IMAGE, TOKENS], 8, None, kind, seed=1))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
        assert a["ids"].min() >= 0 and a["ids"].max() < TOKENS.high
        assert np.isfinite(a["x"]).all()


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        next(batches([IMAGE], 4, None, "uniform", seed=0))
