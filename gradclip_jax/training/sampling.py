"""Poisson sampling of DP-SGD batches, padded to static shapes (:class:`PoissonSampler`).

Every step, each of the ``N`` training examples joins the batch independently with
probability ``q = B / N`` (``B``: the expected batch size), so the batch size is
``Binomial(N, q)``; an epoch is ``N // B`` steps. This is the sampling that the DP-SGD
analysis assumes (Abadi et al. 2016, "Deep Learning with Differential Privacy";
Mironov, Talwar & Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian
Mechanism"), and so what ``gradclip_jax.dp.accounting`` accounts. Fixed-size shuffled
batches are not: their privacy can be far weaker than the Poisson figure (Chua et al.
2024, "How Private are DP-SGD Implementations?", ICML; "Scalable DP-SGD: Shuffling vs.
Poisson Subsampling", NeurIPS).

**Static shapes.** A compiled step takes a fixed number of rows, the *capacity* ``K``: a
draw of ``n <= K`` examples is padded with ``K - n`` rows whose weight is 0 (they add
exactly nothing to the clipped sum and to every metric). A draw of ``n > K`` examples is
*not truncated*: it runs in ``ceil(n / K) * K`` rows (one more compiled program, which
happens in a few steps of a run), so every sampled example takes part and the
accountant's Poisson event is exactly what runs; no truncation term enters epsilon or
delta. (jax_privacy does the same by splitting a Poisson batch into fixed-size padded
minibatches, ``batch_selection.split_and_pad_global_batch``; the alternative, truncating
at ``K`` and accounting the truncated mechanism, Chua et al. 2024, needs the
replace-one neighbouring relation and the PLD accountant.)

:func:`capacity_for` picks ``K >= B`` as the multiple of the data-parallel devices that
minimises the expected rows per step, ``K * E[ceil(n / K)]``, under the exact binomial
law of ``n``: for IMDB's ``imdb_dp`` config (``B = 1024, N = 23,750``) @@IMDB@@.

**Reproducible, resumable.** The draw of global step ``t`` is a function of the seed and
``t`` only (``numpy.random.default_rng([seed, t, tag])``), so a run resumed from a
checkpoint at step ``t`` draws what the uninterrupted run draws. The sampler's state (the
seed and the realized batch sizes of the current epoch) is saved with every checkpoint
(:meth:`PoissonSampler.state_dict`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

__all__ = ["PoissonSampler", "BatchSizeStats", "capacity_for", "binomial_pmf"]

_TAG = 0x504F4953  # "POIS": this stream is distinct from the run's other seeded streams


def binomial_pmf(n: int, q: float) -> np.ndarray:
  """``P(Binomial(n, q) = k)`` for ``k = 0..n`` (float64, from log-gamma: exact to
  rounding, no overflow)."""
  if not (0.0 < q <= 1.0 and n >= 0):
    raise ValueError(f"need n >= 0 and 0 < q <= 1, got n={n}, q={q}")
  if q == 1.0:
    out = np.zeros(n + 1)
    out[n] = 1.0
    return out
  k = np.arange(n + 1, dtype=np.float64)
  lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
  log_p = (lgamma(n + 1.0) - lgamma(k + 1.0) - lgamma(n - k + 1.0)
           + k * math.log(q) + (n - k) * math.log1p(-q))
  return np.exp(log_p)


def capacity_for(dataset_size: int, batch_size: int, multiple: int = 1) -> int:
  """The capacity ``K >= B`` (a multiple of ``multiple``) that minimises the expected rows
  per step, ``K * E[max(1, ceil(n / K))]`` for ``n ~ Binomial(N, B / N)``.

  ``K >= B`` keeps one compiled shape for most steps (smaller capacities would trade
  padding for a program per multiple of ``K``); above ``B`` the padding ``K - n`` and
  the doubled steps ``n > K`` are balanced.
  """
  n_max, multiple = int(dataset_size), int(multiple)
  if not 0 < batch_size <= n_max or multiple < 1:
    raise ValueError(f"need 0 < batch_size <= dataset_size and multiple >= 1, got "
                     f"batch_size={batch_size}, dataset_size={dataset_size}, "
                     f"multiple={multiple}")
  pmf = binomial_pmf(n_max, batch_size / n_max)
  sizes = np.flatnonzero(pmf > 0)  # the support, to float64 underflow
  pmf = pmf[sizes]
  first = -(-batch_size // multiple) * multiple
  last = max(first, int(sizes[-1]))
  best, best_rows = first, math.inf
  for k in range(first, last + 1, multiple):
    rows = k * float(np.sum(pmf * np.maximum(1, -(-sizes // k))))
    if rows < best_rows - 1e-9:
      best, best_rows = k, rows
    elif k > batch_size and rows > best_rows * 1.5:
      break  # past the minimum: rows grow about linearly from here
  return best


@dataclasses.dataclass
class BatchSizeStats:
  """The realized batch sizes of the steps of an epoch."""

  steps: int = 0
  total: int = 0
  min: int | None = None
  max: int | None = None
  overflow_steps: int = 0  # steps whose draw exceeded the capacity

  def add(self, n: int, overflow: bool) -> None:
    self.steps += 1
    self.total += int(n)
    self.min = int(n) if self.min is None else min(self.min, int(n))
    self.max = int(n) if self.max is None else max(self.max, int(n))
    self.overflow_steps += int(overflow)

  @property
  def mean(self) -> float | None:
    return self.total / self.steps if self.steps else None


class PoissonSampler:
  """Poisson-sampled batches of indices into ``dataset_size`` examples, padded.

  Args:
    dataset_size: ``N``, the number of privacy units.
    batch_size: ``B``, the expected batch size; the sampling rate is ``q = B / N``.
    seed: the run's seed (the draws use their own stream of it).
    capacity: rows of a compiled step (``None``: :func:`capacity_for`); a multiple of
      ``multiple``.
    multiple: the number of data-parallel devices (every padded size is a multiple).

  ``sample(step)`` gives the sorted indices drawn at global step ``step``;
  ``padded_rows(n)`` the rows their batch takes (``K``, or ``ceil(n / K) * K`` when
  ``n > K``). :attr:`stats` holds the current epoch's batch sizes (see
  :meth:`begin_epoch`, :meth:`state_dict`).
  """

  kind = "poisson"

  def __init__(self, dataset_size: int, batch_size: int, seed: int,
               capacity: int | None = None, multiple: int = 1):
    if not 0 < batch_size <= dataset_size:
      raise ValueError(f"batch_size {batch_size} must be in [1, dataset_size "
                       f"{dataset_size}]")
    self.dataset_size, self.batch_size = int(dataset_size), int(batch_size)
    self.seed, self.multiple = int(seed), int(multiple)
    self.capacity = (capacity_for(dataset_size, batch_size, multiple) if capacity is None
                     else int(capacity))
    if self.capacity < 1 or self.capacity % self.multiple:
      raise ValueError(f"capacity {self.capacity} must be a positive multiple of "
                       f"{self.multiple}")
    self.stats = BatchSizeStats()

  @property
  def sample_rate(self) -> float:
    """``q = B / N``."""
    return self.batch_size / self.dataset_size

  @property
  def steps_per_epoch(self) -> int:
    """``N // B`` steps: an epoch sees every example once in expectation (to rounding)."""
    return self.dataset_size // self.batch_size

  def sample(self, step: int) -> np.ndarray:
    """The indices drawn at global step ``step`` (sorted, int64): every example with
    probability ``q``, independently of the others and of every other step."""
    rng = np.random.default_rng([self.seed, int(step), _TAG])
    return np.flatnonzero(rng.random(self.dataset_size) < self.sample_rate)

  def padded_rows(self, n: int) -> int:
    """Rows of the batch of a draw of ``n`` examples: ``max(1, ceil(n / K)) * K``."""
    return max(1, -(-int(n) // self.capacity)) * self.capacity

  def draw(self, step: int) -> tuple[np.ndarray, int]:
    """``(indices, rows)`` of step ``step``, counted in :attr:`stats`."""
    idx = self.sample(step)
    self.stats.add(len(idx), overflow=len(idx) > self.capacity)
    return idx, self.padded_rows(len(idx))

  def begin_epoch(self) -> None:
    self.stats = BatchSizeStats()

  def record(self) -> dict[str, Any]:
    """The sampling fields of an epoch's metrics record."""
    s = self.stats
    return {"dp_sampling": self.kind, "batch_size_min": s.min, "batch_size_max": s.max,
            "batch_size_mean": s.mean}

  def describe(self) -> dict[str, Any]:
    """What results.json records about the sampler."""
    return {"kind": self.kind, "dataset_size": self.dataset_size,
            "expected_batch_size": self.batch_size, "sample_rate": self.sample_rate,
            "steps_per_epoch": self.steps_per_epoch, "capacity": self.capacity,
            "overflow": "a draw above the capacity runs in the next multiple of it "
                        "(no example dropped)"}

  def state_dict(self) -> dict[str, Any]:
    """The sampler's state for a checkpoint (the draws depend on the seed and step)."""
    return {"kind": self.kind, "seed": self.seed, "capacity": self.capacity,
            "stats": dataclasses.asdict(self.stats)}

  def load_state_dict(self, saved: Mapping[str, Any]) -> None:
    """Restores :meth:`state_dict` (the capacity may differ: a resumed run may use
    other devices; padding changes no result)."""
    if (saved.get("kind"), saved.get("seed")) != (self.kind, self.seed):
      raise ValueError(f"the checkpoint's sampler {dict(saved)} is not this run's "
                       f"({self.state_dict()})")
    self.stats = BatchSizeStats(**saved["stats"])
