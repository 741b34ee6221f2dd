"""The fixed-threshold clipping rules as Optax ``GradientTransformation``s.

Each rule is one short function: the formula, the state update, the checks, over
the shared numerics of :mod:`gradclip_jax._norms` (the same ones
:mod:`gradclip_jax.functional` uses). The state is a ``NamedTuple`` that keeps what
a training loop wants to log; every state has ``num_clipped``, the number of steps
in which the rule changed the gradient. Norms and scales in the state have the
accumulation dtype of the parameters given to ``init`` (float32, or float64 for
float64 parameters under ``jax_enable_x64``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from gradclip_jax import _norms
from gradclip_jax import _tuning
from gradclip_jax import _validate
from gradclip_jax._norms import AxisName

NONFINITE_POLICIES = ("propagate", "zero", "error")


def state_dtype(params: Any):
  """The dtype of the norms kept in a state: the params' accumulation dtype."""
  return _norms.norm_dtype(_norms.leaves_of(params))


# ------------------------------------------------------------------ clip_by_value


class ClipByValueState(NamedTuple):
  """State of :func:`clip_by_value`."""
  num_clipped: jax.Array  # int32: steps in which some entry hit a bound (or was NaN).


def _value_clip(leaves, bounds):
  """(clipped leaves, per-leaf hit flags): ``jnp.clip`` and the range test.

  The flag is the max of a 0/1 float mask (1 where an entry is outside ``[a, b]``
  or NaN), not an ``any`` over booleans: XLA:TPU fuses that float max into the
  kernel that reads the gradients for the optimizer update, so the flag costs no
  pass of its own (``benchmarks/tpu_programs.py``: clip_by_value + adam moves the
  bytes of adam alone); it did not fuse the boolean ``any``. XLA:GPU fuses either.
  """
  out = [jnp.clip(g, a, b) for g, (a, b) in zip(leaves, bounds)]
  hits = [jnp.max(jnp.where((g >= a) & (g <= b), 0.0, 1.0), initial=0.0) > 0
          for g, (a, b) in zip(leaves, bounds)]
  return out, hits


def clip_by_value(min_value: Any, max_value: Any) -> optax.GradientTransformation:
  """Clips every entry of every leaf to ``[min_value, max_value]``.

  ``g <- min(max(g, min_value), max_value)``, elementwise, as TensorFlow's
  ``tf.clip_by_value``. The bounds may be numbers, JAX scalars (for
  ``optax.inject_hyperparams``) or pytrees of per-leaf bounds. A per-leaf bound must
  *fit* its leaf: broadcast to the leaf's shape without changing it (a scalar, or
  e.g. shape ``(3, 1)`` or ``(1,)`` for a ``(2, 3, 1)`` leaf; ``(2,)`` does not fit).
  Each leaf keeps its dtype (the bounds are cast to it). NaN entries stay NaN and
  the other entries of their leaf are still clipped (as ``tf.clip_by_value`` and
  ``jnp.clip`` do); such a step counts in ``num_clipped``. Clipping by value changes
  the gradient's direction; prefer a norm rule unless you port code that clips by
  value.

  Args:
    min_value: lower bound (number or per-leaf pytree).
    max_value: upper bound (number or per-leaf pytree).

  Returns:
    An ``optax.GradientTransformation`` with a :class:`ClipByValueState`.

  Raises:
    ValueError: a NaN bound, ``min_value > max_value``, or (at ``update``) a bound
      tree that does not match the gradients or a bound whose shape does not fit
      its leaf (the message names the leaf and both shapes).
    TypeError: a non-numeric bound, or (at ``update``) a non-float gradient leaf.

  Examples:
    >>> import jax.numpy as jnp, gradclip_jax
    >>> tx = gradclip_jax.clip_by_value(-1.0, 1.0)
    >>> g = {"w": jnp.array([-3.0, 0.5, 2.0])}
    >>> updates, state = tx.update(g, tx.init(g))
    >>> updates["w"].tolist(), int(state.num_clipped)
    ([-1.0, 0.5, 1.0], 1)
  """
  _validate.check_value_bounds(min_value, max_value)

  def init_fn(params):
    del params
    return ClipByValueState(num_clipped=_norms.zero_count())

  def update_fn(updates, state, params=None):
    del params
    _validate.check_gradient_tree(updates)
    shape = lambda g: jnp.shape(g)
    lo = _validate.broadcast_thresholds("min_value", min_value, updates, shape)
    hi = _validate.broadcast_thresholds("max_value", max_value, updates, shape)
    leaves, treedef = jax.tree.flatten(updates)
    bounds = [(jnp.asarray(a, g.dtype), jnp.asarray(b, g.dtype)) for g, a, b in
              zip(leaves, jax.tree.leaves(lo), jax.tree.leaves(hi))]
    out, hits = _tuning.value_clip(leaves, bounds, _value_clip)
    hit = _norms.stacked_any(hits)
    return jax.tree.unflatten(treedef, out), ClipByValueState(
        state.num_clipped + hit.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------- clip_by_norm / average_norm


class ClipByNormState(NamedTuple):
  """State of :func:`clip_by_norm` and :func:`clip_by_average_norm`."""
  global_norm: jax.Array  # L2 norm of the whole tree before clipping.
  num_clipped: jax.Array  # int32: steps in which some leaf (or unit) was clipped.


def per_leaf_clip(updates, max_norm, axes, average: bool):
  """Shared body of the per-leaf rules: (clipped tree, global norm, any clipped).

  ``t <- t * clip_scale(||t||, c)`` per leaf (per unit along ``axes``), with
  ``c = max_norm * t.size`` for the average norm. Norms and scales are computed per
  :class:`~gradclip_jax._norms.LeafGroups` group (small leaves of one shape batched).
  """
  _validate.check_gradient_tree(updates)
  leaf_axes = lambda g: None if average else _validate.unit_axes(axes, jnp.ndim(g))
  target = lambda g: _validate.kept_shape(jnp.shape(g), leaf_axes(g))
  thresholds = _validate.broadcast_thresholds("max_norm", max_norm, updates, target)
  leaves, treedef = jax.tree.flatten(updates)
  if not leaves:
    return updates, jnp.zeros((), jnp.float32), jnp.zeros((), bool)
  groups = _norms.LeafGroups(leaves, [leaf_axes(g) for g in leaves])
  norms = groups.norms(groups.stack(leaves))
  if _validate.is_scalar_threshold(max_norm):
    limits = [max_norm] * len(norms)
  else:
    limits = groups.stack([jnp.broadcast_to(jnp.asarray(c), target(g))
                           for c, g in zip(jax.tree.leaves(thresholds), leaves)])
  scales = []
  for j, (norm, limit) in enumerate(zip(norms, limits)):
    limit = jnp.asarray(limit, norm.dtype)
    if average:
      limit = limit * leaves[groups.members[j][0]].size
    scales.append(_norms.clip_scale(norm, limit))
  out = groups.scale(leaves, scales)
  norm = _norms.tree_norm(norms)  # the unit norms hold the whole sum of squares
  hit = _norms.stacked_any([s < 1 for s in scales])
  return jax.tree.unflatten(treedef, out), norm, hit


def _per_leaf_transform(max_norm, axes, average):
  _validate.check_threshold("max_norm", max_norm)

  def init_fn(params):
    return ClipByNormState(global_norm=_norms.zero_of(state_dtype(params)),
                           num_clipped=_norms.zero_count())

  def update_fn(updates, state, params=None):
    del params
    clipped, norm, hit = per_leaf_clip(updates, max_norm, axes, average)
    return clipped, ClipByNormState(
        global_norm=norm.astype(state.global_norm.dtype),
        num_clipped=state.num_clipped + hit.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_norm(max_norm: Any, axes: Any = None) -> optax.GradientTransformation:
  """Clips each leaf (or each slice along ``axes``) to an L2 norm of ``max_norm``.

  ``t <- t * max_norm / max(||t||_2, max_norm)``: TensorFlow's ``tf.clip_by_norm``.
  With ``axes`` the norm is taken over those axes only, so every slice along the
  remaining axes is clipped on its own (``axes=-1`` clips each row of a matrix).
  The norm accumulates in at least float32 (float64 stays float64); each leaf keeps
  its dtype. ``max_norm`` may be a pytree of per-leaf thresholds (e.g. a larger
  bound for embeddings). A threshold must *fit* its leaf's norm: broadcast, without
  changing it, to the shape of the norm with the reduced dimensions kept (all ones
  without ``axes``, so only a scalar or shape ``(1,)``-like thresholds; with
  ``axes=-1`` on a ``(4, 3)`` leaf, shape ``(4, 1)`` gives each row its own bound).

  Args:
    max_norm: threshold >= 0 (number, JAX scalar, or per-leaf pytree).
    axes: ``None`` (whole leaf) or axis / tuple of axes to reduce, as in TF.

  Returns:
    An ``optax.GradientTransformation`` with a :class:`ClipByNormState`.

  Raises:
    ValueError: a negative or NaN threshold, or (at ``update``) an axis out of range,
      a threshold tree that does not match the gradients, or a threshold whose shape
      does not fit its leaf (the message names the leaf and both shapes).
    TypeError: a non-numeric threshold, or (at ``update``) a non-float leaf.

  Examples:
    >>> import jax.numpy as jnp, gradclip_jax
    >>> tx = gradclip_jax.clip_by_norm(1.0)
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
    >>> updates, _ = tx.update(g, tx.init(g))
    >>> updates["a"].tolist(), updates["b"].tolist()
    ([0.6000000238418579, 0.800000011920929], [0.30000001192092896, 0.4000000059604645])
  """
  return _per_leaf_transform(max_norm, axes, average=False)


def clip_by_average_norm(max_norm: Any) -> optax.GradientTransformation:
  """Clips each leaf so its *average* L2 norm ``||t||_2 / t.size`` <= ``max_norm``.

  ``t <- t * min(1, max_norm * t.size / ||t||_2)``: TensorFlow 1's
  ``tf.clip_by_average_norm``. Large leaves thereby get a proportionally larger
  budget than small ones. A per-leaf threshold must be a scalar (or broadcast to
  shape ``(1,) * t.ndim`` without changing it).

  Args:
    max_norm: threshold >= 0 on the average norm (number, JAX scalar, or pytree).

  Returns:
    An ``optax.GradientTransformation`` with a :class:`ClipByNormState`.

  Raises:
    ValueError: a negative or NaN threshold, or (at ``update``) a threshold tree that
      does not match the gradients or a non-scalar per-leaf threshold.
    TypeError: a non-numeric threshold, or (at ``update``) a non-float leaf.

  Examples:
    >>> import jax.numpy as jnp, gradclip_jax
    >>> tx = gradclip_jax.clip_by_average_norm(1.0)      # ||t|| = 10 > 1 * 2
    >>> updates, _ = tx.update({"w": jnp.array([6.0, 8.0])}, tx.init(None))
    >>> updates["w"].tolist()
    [1.2000000476837158, 1.600000023841858]
  """
  return _per_leaf_transform(max_norm, None, average=True)


# ----------------------------------------------------------- clip_by_global_norm


class ClipByGlobalNormState(NamedTuple):
  """State of :func:`clip_by_global_norm`; read fields with ``optax.tree_utils.tree_get``."""
  global_norm: jax.Array    # norm of the whole tree before clipping.
  scale: jax.Array          # factor applied this step (1 = untouched).
  num_clipped: jax.Array    # int32: steps with norm > max_norm.
  num_nonfinite: jax.Array  # int32: steps whose norm was NaN or inf.


def _raise_nonfinite(bad, norm):
  if bad:
    raise FloatingPointError(
        f"gradclip_jax.clip_by_global_norm: the gradient norm is {norm} (non-finite) "
        "and nonfinite='error' was requested")


def nonfinite_scale(norm: jax.Array, scale: jax.Array, nonfinite: str) -> jax.Array:
  """Applies a non-finite policy to a clip scale computed from ``norm``.

  ``propagate``: NaN scale, so every entry becomes NaN (TensorFlow's signal);
  ``zero``: 0 (the caller selects exact zeros); ``error``: raise
  ``FloatingPointError`` from the device (under ``jit`` it surfaces as
  ``jax.errors.JaxRuntimeError`` when the result is read).
  """
  finite = jnp.isfinite(norm)
  if nonfinite == "error":
    jax.debug.callback(_raise_nonfinite, ~finite, norm)
  fill = 0.0 if nonfinite == "zero" else jnp.nan
  return jnp.where(finite, scale, fill)


def check_nonfinite_policy(nonfinite: str) -> None:
  """``ValueError`` unless ``nonfinite`` is one of :data:`NONFINITE_POLICIES`."""
  if nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got "
                     f"{nonfinite!r}")


def scale_tree(updates, scale, zero_if_nonfinite: Optional[jax.Array] = None):
  """Multiplies every leaf by ``scale``; with a mask, non-finite steps give exact 0.

  ``inf * 0`` is NaN, so a zeroed step must select zeros rather than multiply.
  """
  leaves, treedef = jax.tree.flatten(updates)
  scaled = _norms.scale_leaves(leaves, scale)
  if zero_if_nonfinite is not None:
    scaled = [jnp.where(zero_if_nonfinite, x, jnp.zeros_like(x)) for x in scaled]
  return jax.tree.unflatten(treedef, scaled)


def clip_by_global_norm(max_norm: Any, *, norm_type: float = 2.0,
                        nonfinite: str = "propagate",
                        axis_name: AxisName = None) -> optax.GradientTransformation:
  """Rescales the whole tree so that its global norm is at most ``max_norm``.

  ``n = ||concat(leaves)||_p`` and ``g <- g * min(1, max_norm / n)`` (Pascanu et al.,
  2013, "On the difficulty of training recurrent neural networks"; TensorFlow's
  ``tf.clip_by_global_norm``). Unlike ``optax.clip_by_global_norm``:

  * the norm accumulates in at least float32 (float16/bfloat16 in float32, float64
    in float64), so float16 gradients of magnitude 300 do not overflow to ``inf``
    (which silently zeroes the Optax update), and a sum that over- or underflows is
    recomputed with an exact power-of-two scaling;
  * zero gradients with ``max_norm = 0`` give zeros (not NaN), and the derivative
    through the clip is NaN-free (meta-gradients w.r.t. gradients or threshold);
  * a NaN/inf norm follows an explicit ``nonfinite`` policy and is counted;
  * the pre-clip norm and scale are kept in the state for logging.

  Args:
    max_norm: threshold >= 0, one number (or JAX scalar, so ``inject_hyperparams``
      can schedule it); ``inf`` disables clipping but keeps the logging.
    norm_type: ``p`` of the norm: 1, 2 (default), any ``p > 0``, or ``inf``.
    nonfinite: what to do when the norm is NaN or inf (an entry is NaN or inf).
      ``"propagate"``: the scale is NaN, so *every* entry of the update becomes NaN
      (TensorFlow's ``tf.clip_by_global_norm``; PyTorch's ``clip_grad_norm_``
      differs, see the numerics guide). ``"zero"``: an all-zero update; the step
      counts in ``num_nonfinite``. ``"error"``: raise ``FloatingPointError`` from the
      device; under ``jit`` it is reported as a ``jax.errors.JaxRuntimeError`` when
      the result is materialized. To also keep the optimizer state (Adam moments)
      untouched on such steps, wrap the whole chain in ``optax.apply_if_finite`` (or
      use :func:`gradclip_jax.skip_spikes`).
    axis_name: inside ``shard_map``/``pmap``, the mapped axis (or axes) over which
      each device holds a slice of every gradient: the norm is then that of the
      whole (partial sums combined with ``psum``), identical on every device.

  Returns:
    An ``optax.GradientTransformation`` with a :class:`ClipByGlobalNormState`.

  Raises:
    ValueError: a negative or NaN ``max_norm``, ``norm_type <= 0``, or an unknown
      ``nonfinite`` policy.
    TypeError: a ``max_norm`` that is not one number, or (at ``update``) a non-float
      gradient leaf.

  Examples:
    >>> import jax.numpy as jnp, optax, gradclip_jax
    >>> tx = optax.chain(gradclip_jax.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
    >>> float(optax.tree_utils.tree_get(state, "global_norm"))
    5.0
    >>> updates["w"].tolist()
    [-0.06000000238418579, -0.08000000566244125]
  """
  if not _validate.is_scalar_threshold(max_norm):
    raise TypeError("clip_by_global_norm takes one scalar max_norm for the whole "
                    "tree; use clip_by_norm for per-leaf thresholds")
  _validate.check_threshold("max_norm", max_norm)
  p = _validate.check_norm_type(norm_type)
  check_nonfinite_policy(nonfinite)

  def init_fn(params):
    dtype = state_dtype(params)
    return ClipByGlobalNormState(
        global_norm=_norms.zero_of(dtype), scale=jnp.ones((), dtype),
        num_clipped=_norms.zero_count(), num_nonfinite=_norms.zero_count())

  def update_fn(updates, state, params=None):
    del params
    _validate.check_gradient_tree(updates)
    norm = _norms.tree_norm(_norms.leaves_of(updates), p, axis_name)
    finite = jnp.isfinite(norm)
    scale = nonfinite_scale(norm, _norms.clip_scale(norm, max_norm), nonfinite)
    new_updates = scale_tree(updates, scale, finite if nonfinite == "zero" else None)
    clipped = finite & (scale < 1)
    dtype = state.global_norm.dtype
    return new_updates, ClipByGlobalNormState(
        global_norm=norm.astype(dtype), scale=scale.astype(dtype),
        num_clipped=state.num_clipped + clipped.astype(jnp.int32),
        num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


__all__ = [
    "ClipByGlobalNormState", "ClipByNormState", "ClipByValueState",
    "clip_by_average_norm", "clip_by_global_norm", "clip_by_norm", "clip_by_value",
]
