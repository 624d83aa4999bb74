"""binary_entropy / layer_entropy against a NumPy reference."""

import numpy as np
import pytest
import torch

from easier_ext import binary_entropy, layer_entropy
from testing import reference_entropy


def test_binary_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    obs = 1000
    counts = np.concatenate([[0, obs, 500, 1, obs - 1], rng.integers(0, obs + 1, 50)])
    h = binary_entropy(torch.tensor(counts), obs)
    assert h.dtype == torch.float64
    np.testing.assert_allclose(h.numpy(), reference_entropy(counts, obs), rtol=1e-12, atol=1e-15)
    assert h[0] == 0 and h[1] == 0 and h[2] == 1
    assert ((h >= 0) & (h <= 1)).all()


def test_zero_observations_give_zero_not_nan():
    h = binary_entropy(torch.zeros(4, dtype=torch.int64), 0)
    assert torch.equal(h, torch.zeros(4, dtype=torch.float64))
    assert layer_entropy(torch.zeros(4, dtype=torch.int64), 0, "nepenthe") == 0
    assert layer_entropy(torch.zeros(0, dtype=torch.int64), torch.tensor(0), "easier") == 0


@pytest.mark.parametrize("aggregate", ["easier", "nepenthe"])
def test_layer_aggregates(aggregate):
    obs = 64
    counts = np.array([0, 64, 32, 16, 64, 3])
    h = reference_entropy(counts, obs)
    if aggregate == "easier":
        expected = h.mean()
    else:
        keep = (counts > 0) & (counts < obs)
        expected = h[keep].mean()
    got = layer_entropy(torch.tensor(counts), torch.tensor(obs), aggregate)
    assert got.dim() == 0
    np.testing.assert_allclose(got.item(), expected, rtol=1e-12)


def test_nepenthe_aggregate_is_zero_when_every_neuron_is_constant():
    assert layer_entropy(torch.tensor([0, 10, 10, 0]), 10, "nepenthe").item() == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown entropy aggregate 'mean'"):
        layer_entropy(torch.tensor([1]), 2, "mean")
    with pytest.raises(TypeError, match="1-d int64 tensor"):
        binary_entropy(torch.tensor([0.5]), 2)
    with pytest.raises(TypeError, match="observations must be an integer"):
        binary_entropy(torch.tensor([1]), 2.5)
