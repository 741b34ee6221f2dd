"""Shared pieces of the test suite: NumPy references used by several files, and a
test-case mixin that runs a class's tests with the backend tuning switched off."""

from __future__ import annotations

import math

import jax

import gradclip_jax as gc


def ref_skip_spikes(norms, threshold, decay, min_count):
  """skip_spikes' rule on a sequence of global norms, in float64.

  A step is skipped when its norm is not finite or exceeds ``mean + threshold * std``
  of the accepted norms (once ``min_count`` were accepted); accepted norms update the
  exponential moving mean and variance with decay ``decay``. Returns one
  ``(skip, norm, bound, mean, var)`` per step.
  """
  mean = var = 0.0
  count, out = 0, []
  for n in norms:
    n = float(n)
    bound = mean + threshold * math.sqrt(var) if count >= min_count else math.inf
    skip = not math.isfinite(n) or n > bound
    if not skip:
      if count == 0:
        mean, var = n, 0.0
      else:
        d = n - mean
        mean += (1 - decay) * d
        var = decay * (var + (1 - decay) * d * d)
      count += 1
    out.append((skip, n, bound, mean, var))
  return out


class TuningOff:
  """Mixin for a ``unittest.TestCase``: its tests run with every backend workaround
  off (``gradclip_jax.config.backend_tuning_set(False)``), with jit caches cleared on
  the way in and out so no program compiled under the other setting is reused."""

  def setUp(self):
    super().setUp()
    self._tuning = gc.config.backend_tuning_set(False)
    self._tuning.__enter__()
    jax.clear_caches()

  def tearDown(self):
    self._tuning.__exit__(None, None, None)
    jax.clear_caches()
    super().tearDown()
