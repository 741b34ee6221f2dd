"""The part of a train step both trainers share: gradients, the update, their statistics.

:func:`gradient_update` takes the gradient of the batch loss and applies the clipping
rule inside ``tx`` (``--clip``), or with DP-SGD (``--dp``) the sum of the per-example
gradients clipped to ``dp.max_norm``, followed by ``tx`` (noise, ``1/B``, optimizer).
:class:`StepLog` is what both training loops do after dispatching a step.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from gradclip_jax.training import clip as clip_lib
from gradclip_jax.training import dp as dp_lib
from gradclip_jax.training import mesh as mesh_lib
from gradclip_jax.training.metrics import report

__all__ = ["gradient_update", "clip_or_dp", "StepLog"]


class StepLog:
  """After each dispatched train step: advances the progress bar, reports the first step
  of the run (compiled and ran in how long) and paces the loop (``mesh.pace``: waits
  for the step every ``mesh.MAX_AHEAD`` steps, which a multi-host run needs)."""

  def __init__(self):
    self._first = True

  def __call__(self, bar, step: int, out: Any, t0: float) -> None:
    """``step``: the global step just dispatched (1-based); ``out``: its output;
    ``t0``: ``time.perf_counter()`` when this call's loop started."""
    bar.update(1)
    if self._first:
      jax.block_until_ready(out)
      report(f"step {step}: compiled and ran in {time.perf_counter() - t0:.1f}s")
      self._first = False
    mesh_lib.pace(step, out)


def gradient_update(tx: optax.GradientTransformation, params: Any, opt_state: Any, *,
                    dp: dp_lib.DPSettings | None,
                    batch_loss: Callable[[Any], tuple[jax.Array, Any]],
                    per_example_loss: Callable[..., tuple[jax.Array, Any]],
                    inputs: tuple, weights: jax.Array
                    ) -> tuple[Any, Any, Any, dict[str, jax.Array]]:
  """One optimizer update; use inside ``jit``.

  Args:
    tx: the optimizer, starting with the clipping rule (or, with ``dp``, with
      ``dp.dp_transform``).
    params, opt_state: the current parameters and optimizer state.
    dp: DP-SGD settings, or ``None``.
    batch_loss: ``params -> (loss, aux)``, differentiated without ``dp``.
    per_example_loss: ``(params, *inputs) -> (losses [B], aux)``, whose per-example
      gradients are clipped and summed with ``dp``.
    inputs: the batch, as ``per_example_loss`` takes it.
    weights: ``[B]``, 0 for an example that only fills the batch: with ``dp`` it is
      masked out of the clipped sum (``clipped_grad``'s ``mask=``) and of the norm
      statistics; the losses should carry the weight too, for the metrics.

  Returns:
    ``(new_params, new_opt_state, aux, stats)``: ``aux`` of the loss used, and ``stats``
    with float32 scalars ``grad_norm`` and ``grad_norm_max`` (the pre-clip gradient
    norm; with ``dp`` the sum and the max of the per-example norms) and ``clipped``
    (1.0 if the rule changed the gradient; with ``dp`` the number of examples clipped).
  """
  if dp is None:
    grads, aux = jax.grad(batch_loss, has_aux=True)(params)
    updates, new_opt_state, norm = clip_lib.update_with_norm(tx, grads, opt_state, params)
    clipped = clip_lib.clipped_this_step(opt_state, new_opt_state).astype(jnp.float32)
    stats = {"grad_norm": norm, "grad_norm_max": norm, "clipped": clipped}
  else:
    grads, norms, aux = dp_lib.dp_clipped_grad(per_example_loss, dp)(
        params, *inputs, mask=weights > 0)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    s = dp_lib.dp_example_stats(norms, weights, dp.max_norm)
    stats = {"grad_norm": s["norm_sum"], "grad_norm_max": s["norm_max"],
             "clipped": s["num_clipped"]}
  return optax.apply_updates(params, updates), new_opt_state, aux, stats


def clip_or_dp(run, default_max_norm: float, *, batch_size: int, dataset_size: int,
               planned_steps: int) -> tuple[optax.GradientTransformation,
                                            dp_lib.DPSettings | None]:
  """The transformation in front of the optimizer, and the DP settings (or ``None``).

  Without ``run.dp``: the clipping rule ``run.clip`` (:func:`clip.build_clip`, threshold
  ``run.clip_value`` or ``default_max_norm``). With it: ``dp.dp_transform`` of the
  resolved settings (per-example clip ``--dp-max-norm`` or ``default_max_norm``; the
  noise multiplier derived over ``planned_steps`` steps at sampling rate
  ``batch_size / dataset_size``).
  """
  if run.dp is None:
    return clip_lib.build_clip(run.clip, run.clip_value, default_max_norm), None
  dp = run.dp.resolve(batch_size=batch_size, dataset_size=dataset_size,
                      planned_steps=planned_steps, default_max_norm=default_max_norm)
  report(dp.describe())
  return dp_lib.dp_transform(dp, run.seed), dp
