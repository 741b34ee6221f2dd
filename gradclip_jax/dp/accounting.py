"""Privacy accounting for DP-SGD: thin wrappers over Google's ``dp-accounting``.

Assumptions, stated once: every step is a *Poisson-subsampled* Gaussian mechanism
(each example is in a step's batch independently with probability
``sample_rate = expected_batch_size / dataset_size``), the noise has stddev
``noise_multiplier * max_norm`` on the *sum* of per-example gradients clipped to
``max_norm``, neighbouring data sets differ by adding or removing one example, and
the accountant is RDP (``dp_accounting.rdp.RdpAccountant``, Mironov 2017; Mironov,
Talwar & Zhang 2019). Trainers that draw fixed-size shuffled batches use this as
the customary approximation; it is exact only for Poisson sampling.

``dp_accounting`` is imported inside the functions, so ``import gradclip_jax`` does
not need it (``pip install gradclip_jax[train]``).
"""

from __future__ import annotations


def _check(sample_rate: float, steps: int, delta: float) -> None:
  if not 0.0 < sample_rate <= 1.0:
    raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
  if int(steps) != steps or steps < 0:
    raise ValueError(f"steps must be an integer >= 0, got {steps}")
  if not 0.0 < delta < 1.0:
    raise ValueError(f"delta must be in (0, 1), got {delta}")


def _event(noise_multiplier: float, sample_rate: float, steps: int):
  import dp_accounting  # pylint: disable=import-outside-toplevel
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), int(steps))


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int,
                  delta: float) -> float:
  """epsilon of ``steps`` Poisson-sampled Gaussian steps at ``delta`` (RDP accountant).

  ``inf`` for ``noise_multiplier == 0`` with ``steps > 0``; 0 for ``steps == 0``.
  """
  from dp_accounting import rdp  # pylint: disable=import-outside-toplevel
  _check(sample_rate, steps, delta)
  if noise_multiplier < 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return float("inf")
  acc = rdp.RdpAccountant()
  acc.compose(_event(noise_multiplier, sample_rate, steps))
  return float(acc.get_epsilon(delta))


def noise_multiplier_for_epsilon(target_eps: float, delta: float, sample_rate: float,
                                 steps: int) -> float:
  """The smallest noise multiplier whose :func:`epsilon_spent` is ``<= target_eps``.

  Found by ``dp_accounting.calibrate_dp_mechanism`` (bisection on the RDP
  accountant), so ``epsilon_spent(result, ...) <= target_eps`` holds.
  """
  import dp_accounting  # pylint: disable=import-outside-toplevel
  from dp_accounting import rdp  # pylint: disable=import-outside-toplevel
  _check(sample_rate, steps, delta)
  if not target_eps > 0:
    raise ValueError(f"target_eps must be > 0, got {target_eps}")
  if steps == 0:
    return 0.0
  return float(dp_accounting.calibrate_dp_mechanism(
      rdp.RdpAccountant,
      lambda s: _event(s, sample_rate, steps),
      target_eps, delta,
      bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
      tol=1e-4))
