"""Privacy accounting for DP-SGD: thin wrappers over Google's ``dp-accounting``.

Assumptions, stated once: every step is a *Poisson-subsampled* Gaussian mechanism
(each example is in a step's batch independently with probability
``sample_rate = expected_batch_size / dataset_size``), the noise has stddev
``noise_multiplier * max_norm`` on the *sum* of per-example gradients clipped to
``max_norm``, neighbouring data sets differ by adding or removing one example, and
the accountant is RDP (``dp_accounting.rdp.RdpAccountant``, Mironov 2017; Mironov,
Talwar & Zhang 2019). It holds only for Poisson sampling: fixed-size shuffled batches
are a different mechanism, whose privacy can be far weaker (Chua et al. 2024, "How
Private are DP-SGD Implementations?", ICML). The trainers' ``--dp`` samples Poisson
batches (``gradclip_jax.training.sampling``) and accounts them with
:func:`poisson_gaussian_event`.

``dp_accounting`` is imported inside the functions, so ``import gradclip_jax`` does
not need it (``pip install gradclip_jax[train]``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["epsilon_spent", "noise_multiplier_for_epsilon", "poisson_gaussian_event"]


def _real(name: str, value) -> float:
  """``value`` as a float (Python, NumPy or 0-d JAX numbers), else ``TypeError``."""
  bad = isinstance(value, (bool, np.bool_, str, bytes)) or np.ndim(value) != 0
  if not bad:
    try:
      value = float(value)
    except (TypeError, ValueError):
      bad = True
  if bad:
    raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
  if math.isnan(value):
    raise ValueError(f"{name} is NaN")
  return value


def _check(sample_rate, steps, delta) -> tuple:
  sample_rate = _real("sample_rate", sample_rate)
  delta = _real("delta", delta)
  steps = _real("steps", steps)
  if not 0.0 < sample_rate <= 1.0:
    raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
  if not (math.isfinite(steps) and int(steps) == steps and steps >= 0):
    raise ValueError(f"steps must be an integer >= 0, got {steps}")
  if not 0.0 < delta < 1.0:
    raise ValueError(f"delta must be in (0, 1), got {delta}")
  return sample_rate, int(steps), delta


def poisson_gaussian_event(noise_multiplier: float, sample_rate: float, steps: int):
  """The ``dp_accounting`` event of ``steps`` Poisson-sampled Gaussian steps.

  ``SelfComposedDpEvent(PoissonSampledDpEvent(sample_rate,
  GaussianDpEvent(noise_multiplier)), steps)``: what :func:`epsilon_spent` accounts (and
  what a trainer that samples every example independently with probability
  ``sample_rate``, with no truncation, runs). Compose it into any ``dp_accounting``
  accountant (RDP, PLD).

  Examples:
    >>> from gradclip_jax.dp import accounting
    >>> e = accounting.poisson_gaussian_event(1.1, 0.01, 100)
    >>> e.count, e.event.sampling_probability, e.event.event.noise_multiplier
    (100, 0.01, 1.1)
  """
  import dp_accounting  # pylint: disable=import-outside-toplevel
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), int(steps))


_event = poisson_gaussian_event


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int,
                  delta: float) -> float:
  """epsilon of ``steps`` Poisson-sampled Gaussian steps at ``delta`` (RDP accountant).

  Each step is the sampled Gaussian mechanism with noise ``noise_multiplier * C`` on
  a sum of examples clipped to ``C``, every example in the batch with probability
  ``sample_rate`` (Abadi et al. 2016); the Renyi DP of the composition (Mironov 2017;
  Mironov, Talwar & Zhang 2019, arXiv:1908.10530) is converted to ``(epsilon, delta)``
  by ``dp_accounting.rdp.RdpAccountant``.

  Args:
    noise_multiplier: ``sigma >= 0``; ``inf`` means no information is released.
    sample_rate: ``q = expected batch size / data set size``, in ``(0, 1]``.
    steps: the number of steps, an integer ``>= 0``.
    delta: the ``delta`` of the guarantee, in ``(0, 1)``.

  Returns:
    epsilon as a float: 0 for ``steps == 0`` or ``noise_multiplier == inf``, ``inf``
    for ``noise_multiplier == 0`` with ``steps > 0``.

  Raises:
    ValueError: an argument out of its range (or NaN).
    TypeError: a non-numeric argument.
    ImportError: ``dp-accounting`` is not installed (``pip install
      "gradclip_jax[train]"``).

  Examples:
    >>> from gradclip_jax.dp import accounting
    >>> eps = accounting.epsilon_spent(1.1, 256 / 60_000, 2340, 1e-5)
    >>> round(eps, 2)
    1.1
    >>> accounting.epsilon_spent(0.0, 0.01, 1, 1e-5)
    inf
  """
  from dp_accounting import rdp  # pylint: disable=import-outside-toplevel
  sample_rate, steps, delta = _check(sample_rate, steps, delta)
  noise_multiplier = _real("noise_multiplier", noise_multiplier)
  if noise_multiplier < 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
  if steps == 0 or math.isinf(noise_multiplier):
    return 0.0
  if noise_multiplier == 0:
    return float("inf")
  acc = rdp.RdpAccountant()
  acc.compose(_event(noise_multiplier, sample_rate, steps))
  return float(acc.get_epsilon(delta))


def noise_multiplier_for_epsilon(target_eps: float, delta: float, sample_rate: float,
                                 steps: int) -> float:
  """The smallest noise multiplier whose :func:`epsilon_spent` is ``<= target_eps``.

  Found by ``dp_accounting.calibrate_dp_mechanism`` (bisection on the RDP accountant,
  to a tolerance of 1e-4 on ``sigma``), so ``epsilon_spent(result, ...) <= target_eps``
  holds.

  Args:
    target_eps: the epsilon to spend, ``> 0`` (``inf``: no noise is needed).
    delta: the ``delta`` of the guarantee, in ``(0, 1)``.
    sample_rate: ``q = expected batch size / data set size``, in ``(0, 1]``.
    steps: the number of steps, an integer ``>= 0``.

  Returns:
    sigma as a float (0 for ``steps == 0`` or ``target_eps == inf``).

  Raises:
    ValueError: an argument out of its range (or NaN).
    TypeError: a non-numeric argument.
    ImportError: ``dp-accounting`` is not installed.

  Examples:
    >>> from gradclip_jax.dp import accounting
    >>> q, steps = 256 / 60_000, 2340
    >>> sigma = accounting.noise_multiplier_for_epsilon(3.0, 1e-5, q, steps)
    >>> round(sigma, 2)
    0.74
    >>> accounting.epsilon_spent(sigma, q, steps, 1e-5) <= 3.0
    True
  """
  import dp_accounting  # pylint: disable=import-outside-toplevel
  from dp_accounting import rdp  # pylint: disable=import-outside-toplevel
  sample_rate, steps, delta = _check(sample_rate, steps, delta)
  target_eps = _real("target_eps", target_eps)
  if not target_eps > 0:
    raise ValueError(f"target_eps must be > 0, got {target_eps}")
  if steps == 0 or math.isinf(target_eps):
    return 0.0
  return float(dp_accounting.calibrate_dp_mechanism(
      rdp.RdpAccountant,
      lambda s: _event(s, sample_rate, steps),
      target_eps, delta,
      bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
      tol=1e-4))
