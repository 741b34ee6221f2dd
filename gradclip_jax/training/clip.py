"""The clipping rule of a run (``--clip``) and the gradient statistics the trainers log.

* :data:`RULES` and :func:`build_clip` -- the rule selected by ``--clip``.
* :func:`update_with_norm` -- ``tx.update`` plus the step's pre-clip gradient norm.
* :func:`clipped_this_step` -- did the rule change the gradient in this update?
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

import gradclip_jax

__all__ = ["RULES", "build_clip", "clipped_this_step", "grad_norm", "update_with_norm"]

#: Names accepted by ``--clip`` (and :func:`build_clip`).
RULES = ("none", "global_norm", "value", "norm", "average_norm", "autoclip", "zclip",
         "adagc", "agc")

# Rules whose threshold is a norm / value taken from the config when --clip-value is absent.
_THRESHOLD_RULES = {
    "global_norm": lambda v: gradclip_jax.clip_by_global_norm(v),
    "value": lambda v: gradclip_jax.clip_by_value(-v, v),
    "norm": lambda v: gradclip_jax.clip_by_norm(v),
    "average_norm": lambda v: gradclip_jax.clip_by_average_norm(v),
}
# Adaptive rules: their own defaults, unless --clip-value is given, which sets the keyword
# argument named here (the rule's threshold).
_ADAPTIVE_RULES = {
    "autoclip": (lambda **kw: gradclip_jax.autoclip(**kw), "percentile"),
    "zclip": (lambda **kw: gradclip_jax.zclip(**kw), "z_threshold"),
    "adagc": (lambda **kw: gradclip_jax.adagc(**kw), "lambda_rel"),
    "agc": (lambda **kw: gradclip_jax.adaptive_grad_clip(**kw), "clipping"),
}


def build_clip(name: str, value: float | None,
               default_max_norm: float) -> optax.GradientTransformation:
  """Returns the gradient transformation for clipping rule ``name``.

  Mapping: ``none`` -> ``optax.identity()``, ``global_norm`` ->
  ``clip_by_global_norm(v)``, ``value`` -> ``clip_by_value(-v, v)``, ``norm`` ->
  ``clip_by_norm(v)``, ``average_norm`` -> ``clip_by_average_norm(v)``, ``autoclip`` /
  ``zclip`` / ``adagc`` -> the rule of that name, ``agc`` -> ``adaptive_grad_clip``
  (which needs ``params``: callers always call ``tx.update(grads, state, params)``).

  Args:
    name: one of :data:`RULES`.
    value: the ``--clip-value`` flag, or ``None``.
    default_max_norm: the threshold ``v`` of the norm/value rules when ``value`` is
      ``None`` (the config's ``max_grad_norm``). The adaptive rules ignore it and use
      their own defaults; a ``value`` sets their threshold: ``autoclip(percentile=v)``,
      ``zclip(z_threshold=v)``, ``adagc(lambda_rel=v)``, ``adaptive_grad_clip(clipping=v)``.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: an unknown rule, or a threshold that is not positive and finite.

  Examples:
    >>> from gradclip_jax.training.clip import build_clip
    >>> import jax.numpy as jnp
    >>> tx = build_clip("global_norm", None, default_max_norm=1.0)
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> tx.update(g, tx.init(g))[0]["w"].tolist()
    [0.6000000238418579, 0.800000011920929]
  """
  if name == "none":
    return optax.identity()
  if name in _THRESHOLD_RULES:
    v = float(default_max_norm if value is None else value)
    if not (v > 0 and math.isfinite(v)):
      raise ValueError(f"--clip {name} needs a positive finite threshold, got {v}")
    return _THRESHOLD_RULES[name](v)
  if name in _ADAPTIVE_RULES:
    make, keyword = _ADAPTIVE_RULES[name]
    return make() if value is None else make(**{keyword: float(value)})
  raise ValueError(f"unknown clipping rule {name!r}; choose one of {', '.join(RULES)}")


def _num_clipped(state) -> jax.Array:
  """Sum of every ``num_clipped`` counter found in an optimizer state (0 if none)."""
  leaves = [v for _, v in optax.tree_utils.tree_get_all_with_path(state, "num_clipped")]
  if not leaves:
    return jnp.zeros((), jnp.int32)
  return sum(jnp.asarray(v, jnp.int32) for v in leaves)


def _recorded_norms(opt_state) -> list[jax.Array]:
  """The ``global_norm`` of every ``ClipByGlobalNormState`` in ``opt_state``."""
  is_clip_state = lambda x: isinstance(x, gradclip_jax.ClipByGlobalNormState)
  return [s.global_norm for s in jax.tree.leaves(opt_state, is_leaf=is_clip_state)
          if is_clip_state(s)]


def grad_norm(grads, new_state=None) -> jax.Array:
  """The step's gradient norm: ``gradclip_jax.functional.global_norm(grads)``.

  When ``new_state`` (the optimizer state after the update) holds exactly one
  ``ClipByGlobalNormState``, its pre-clip ``global_norm`` -- the same number, already
  computed by the rule -- is returned instead, so logging the norm costs nothing extra
  in a clipped run. Use inside ``jit``.
  """
  if new_state is not None:
    found = _recorded_norms(new_state)
    if len(found) == 1:
      return jnp.asarray(found[0], jnp.float32)
  return gradclip_jax.functional.global_norm(grads)


def update_with_norm(tx, grads, opt_state, params):
  """``tx.update`` plus the step's pre-clip gradient norm for logging (inside ``jit``).

  Returns ``(updates, new_state, norm)`` with ``norm = grad_norm(grads, new_state)``:
  the norm a global-norm rule recorded, else one computed here.
  """
  updates, new_state = tx.update(grads, opt_state, params)
  return updates, new_state, grad_norm(grads, new_state)


def clipped_this_step(old_state, new_state) -> jax.Array:
  """True where the clipping rule changed the gradient in this update.

  The convention of both trainers: a rule's ``num_clipped`` counter (int32, the number
  of steps in which it clipped) went up between ``old_state`` and ``new_state``.
  Works inside ``jit``; returns a boolean scalar (False for ``--clip none``).
  """
  return _num_clipped(new_state) > _num_clipped(old_state)
