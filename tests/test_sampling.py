"""Tests of DP-SGD's Poisson sampler (``gradclip_jax.training.sampling``).

The expected values come from the binomial law (NumPy, ``math.comb``): each of ``N``
examples joins each step's batch independently with probability ``q = B / N``.
"""
import math

import numpy as np
import pytest

from gradclip_jax.training import sampling
from gradclip_jax.training.sampling import PoissonSampler


def _members(sampler, steps):
  """``[steps, N]`` bool: which examples each step drew."""
  m = np.zeros((steps, sampler.dataset_size), bool)
  for t in range(steps):
    m[t, sampler.sample(t)] = True
  return m


def test_batch_size_has_the_binomial_mean_and_variance():
  n, b, steps = 2000, 100, 2000
  q = b / n
  sizes = _members(PoissonSampler(n, b, seed=3), steps).sum(1)
  mean, var = n * q, n * q * (1 - q)  # 100, 95
  # The sample mean within 5 standard errors; the sample variance within 5 of its
  # standard errors (~ var * sqrt(2 / steps) for a near-normal law).
  assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / steps)
  assert abs(sizes.var(ddof=1) - var) < 5 * var * math.sqrt(2 / steps)
  # A fixed-size scheme (shuffling) has variance 0: the law is really binomial.
  assert sizes.min() < b - 10 and sizes.max() > b + 10


def test_examples_are_independent_across_steps_and_of_each_other():
  n, b, steps = 400, 40, 3000
  q = b / n
  m = _members(PoissonSampler(n, b, seed=0), steps).astype(np.float64)
  # Each example's count over the steps is Binomial(steps, q): mean and variance.
  counts = m.sum(0)
  assert abs(counts.mean() - steps * q) < 5 * math.sqrt(steps * q * (1 - q) / n)
  assert abs(counts.var(ddof=1) / (steps * q * (1 - q)) - 1) < 5 * math.sqrt(2 / n)
  # In two consecutive steps: P(in both) = q^2 (no memory of the previous batch).
  both = (m[1:] * m[:-1]).mean()
  assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / ((steps - 1) * n))
  # Two examples in one step: P(both) = q^2 (a fixed-size batch gives
  # B (B - 1) / (N (N - 1)) < q^2: 0.00977 against 0.01 here).
  pairs = (m[:, 0::2] * m[:, 1::2]).mean()
  assert abs(pairs - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (steps * n // 2))


def test_draws_reproduce_from_the_seed_and_from_a_checkpoint():
  a, b = PoissonSampler(500, 50, seed=7), PoissonSampler(500, 50, seed=7)
  assert all(np.array_equal(a.sample(t), b.sample(t)) for t in (0, 1, 99))
  assert not np.array_equal(a.sample(1), PoissonSampler(500, 50, seed=8).sample(1))
  assert not np.array_equal(a.sample(1), a.sample(2))
  # An uninterrupted epoch against one resumed after 3 steps from the saved state.
  full = PoissonSampler(500, 50, seed=7)
  full.begin_epoch()
  draws = [full.draw(t) for t in range(10, 16)]
  first = PoissonSampler(500, 50, seed=7)
  first.begin_epoch()
  for t in range(10, 13):
    first.draw(t)
  saved = first.state_dict()
  resumed = PoissonSampler(500, 50, seed=7)
  resumed.load_state_dict(saved)
  rest = [resumed.draw(t) for t in range(13, 16)]
  for (i, r), (j, s) in zip(draws[3:], rest):
    assert np.array_equal(i, j) and r == s
  assert resumed.record() == full.record()
  assert resumed.record()["batch_size_mean"] == np.mean([len(i) for i, _ in draws])
  with pytest.raises(ValueError, match="not this run's"):
    PoissonSampler(500, 50, seed=8).load_state_dict(saved)


def test_padding_never_drops_an_example():
  s = PoissonSampler(100, 10, seed=0, capacity=4, multiple=2)
  assert [s.padded_rows(n) for n in (0, 1, 4, 5, 8, 9)] == [4, 4, 4, 8, 8, 12]
  sizes = []
  for t in range(20):
    idx, rows = s.draw(t)
    assert np.array_equal(idx, s.sample(t)) and rows == max(1, -(-len(idx) // 4)) * 4
    sizes.append(len(idx))
  assert s.stats.overflow_steps == sum(n > 4 for n in sizes) > 10  # ~10 drawn, 4 rows
  assert (s.stats.min, s.stats.max, s.stats.total) == (min(sizes), max(sizes), sum(sizes))
  with pytest.raises(ValueError, match="multiple"):
    PoissonSampler(100, 10, seed=0, capacity=5, multiple=2)


def test_binomial_pmf_and_capacity_against_exact_arithmetic():
  n, b = 64, 16
  q = b / n
  exact = np.array([math.comb(n, k) * q ** k * (1 - q) ** (n - k) for k in range(n + 1)])
  np.testing.assert_allclose(sampling.binomial_pmf(n, q), exact, rtol=1e-10, atol=1e-300)
  # The capacity minimises K * E[max(1, ceil(n / K))] over K >= B (multiples of 2 here).
  k_all = np.arange(n + 1)
  rows = {k: k * np.sum(exact * np.maximum(1, -(-k_all // k))) for k in range(16, 65, 2)}
  assert sampling.capacity_for(n, b, multiple=2) == min(rows, key=rows.get)
  assert sampling.capacity_for(23750, 1024) % 1 == 0 and sampling.capacity_for(
      23750, 1024, multiple=8) % 8 == 0
  assert sampling.capacity_for(1000, 1000) == 1000  # q = 1: every example, every step
