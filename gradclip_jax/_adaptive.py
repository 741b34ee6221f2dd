"""Adaptive clipping rules as Optax ``GradientTransformation``s.

The threshold of these rules is not a fixed number but follows the training run:

=========================== ==========================================================
rule                        threshold
=========================== ==========================================================
:func:`adaptive_grad_clip`  per unit: ``clipping * max(||W_i||, eps)`` (Brock et al.
                            2021)
:func:`autoclip`            a percentile of the global norms seen so far (Seetharaman
                            et al. 2020)
:func:`zclip`               z-score of the global norm against its EMA mean/std,
                            reciprocal clipping of spikes (Kumar et al. 2025)
:func:`adagc`               per tensor: ``lambda_rel`` times an EMA of its clipped
                            norm (Wang et al. 2025)
:func:`skip_spikes`         drops the whole step when the global norm is non-finite
                            or a spike against its running mean/std
=========================== ==========================================================

They share the norm kernels of :mod:`gradclip_jax._norms` with the fixed rules
(accumulation in at least float32, float64 kept, over/underflow rescue, NaN-free
derivatives) and the state conventions of :mod:`gradclip_jax._clipping`: a
``NamedTuple`` state of fixed size (no Python lists, no host round-trips) in which

* ``global_norm`` is the L2 norm of the incoming gradients (before clipping),
* the threshold used this step is kept (``max_norm``; ``max_ratio`` for AGC), and
* ``num_clipped`` counts the steps in which the rule changed the update.

Read them with ``optax.tree_utils.tree_get(state, "global_norm")``.

**Non-finite gradients.** A NaN/inf global norm makes every entry of the update
NaN (the ``"propagate"`` policy of :func:`gradclip_jax.clip_by_global_norm`) and
leaves the rule's statistics (history, EMAs, counters) untouched, so one bad
batch cannot poison the threshold. To drop such steps instead, wrap the optimizer
in :func:`skip_spikes` (or ``optax.apply_if_finite``).

**optax.inject_hyperparams.** Numeric hyperparameters may be JAX scalars (they
only enter ``jnp`` arithmetic, never Python control flow). Structural arguments
must stay Python values: ``history_size`` (a buffer shape) and ``axis`` (reduction
axes) must be listed in ``static_args``, e.g.
``optax.inject_hyperparams(autoclip, static_args=("history_size",))(percentile=5.)``.
Integer step counts (``warmup_steps``, ``min_count``) may be injected. Note that
``optax.tree_utils.tree_get`` raises ``KeyError`` for a name that is both a
hyperparameter and a state field (``zclip``'s ``max_norm``): read it from
``state.inner_state`` then.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradclip_jax import _clipping
from gradclip_jax import _norms
from gradclip_jax import _tuning
from gradclip_jax import _validate


def _as(x, dtype) -> jax.Array:
  return jnp.asarray(x, dtype)


def _is_finite_and_count(norm: jax.Array) -> tuple[jax.Array, jax.Array]:
  finite = jnp.isfinite(norm)
  return finite, finite.astype(jnp.int32)


def _global_norm_and_count(updates) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The checked tree's L2 norm, whether it is finite, and that as an int32 count."""
  _validate.check_gradient_tree(updates)
  norm = _norms.tree_norm(_norms.leaves_of(updates))
  return (norm, *_is_finite_and_count(norm))


def _propagate(finite: jax.Array, scale: jax.Array) -> jax.Array:
  """NaN scale on non-finite steps (every entry of the update becomes NaN)."""
  return jnp.where(finite, scale, jnp.nan)


# ============================================================== adaptive_grad_clip


class AdaptiveGradClipState(NamedTuple):
  """State of :func:`adaptive_grad_clip`."""
  global_norm: jax.Array  # f32: L2 norm of the whole gradient tree before clipping.
  max_ratio: jax.Array    # f32: max over units of ||G_i|| / max(||W_i||, eps).
  num_clipped: jax.Array  # int32: steps in which some unit was clipped.


def unitwise_axes(ndim: int, axis: Any = None) -> Optional[tuple[int, ...]]:
  """The axes :func:`adaptive_grad_clip` reduces over for a leaf of rank ``ndim``.

  ``None`` means the whole leaf. By default (``axis=None``): rank 0 and 1 (biases,
  gains, scalars) are one unit; rank >= 2 reduces over every axis but the last,
  i.e. one unit per output feature for Flax/Haiku kernels: ``(0,)`` for a Dense
  kernel ``[in, out]``, ``(0, 1)`` for a Conv1D ``[W, I, O]`` or an attention output
  ``DenseGeneral`` ``[heads, head_dim, out]``, ``(0, 1, 2)`` for a Conv2D ``HWIO``.
  An explicit ``axis`` (int or tuple) replaces the rule for leaves of rank >= 2.
  """
  if ndim <= 1:
    return None
  if axis is None:
    return tuple(range(ndim - 1))
  return _validate.unit_axes(axis, ndim, "adaptive_grad_clip axis")


def adaptive_grad_clip(clipping: Any = 0.01, eps: Any = 1e-3,
                       axis: Any = None) -> optax.GradientTransformation:
  r"""Unit-wise Adaptive Gradient Clipping (AGC) of NFNets.

  Brock, De, Smith, Simonyan, 2021, "High-Performance Large-Scale Image Recognition
  Without Normalization" (arXiv:2102.06171), Eq. 3. For every unit ``i`` (a row of
  the gradient ``G`` and of the weight ``W`` along the output axis)::

      G_i <- G_i * clipping * max(||W_i||, eps) / ||G_i||
                                      if ||G_i|| / max(||W_i||, eps) > clipping
      G_i <- G_i                      otherwise

  i.e. ``G_i * min(1, clipping * max(||W_i||, eps) / ||G_i||)``; Frobenius norms,
  accumulated in at least float32. Paper defaults: ``eps = 1e-3``; ``clipping`` 0.01 for
  batch size 4096 with SGD-Nesterov (larger for smaller batches, up to ~0.16).

  **Units (reduction axes) per rank**, see :func:`unitwise_axes`: rank 0-1 one
  unit; rank 2 ``[in, out]`` axis 0; rank 3 axes ``(0, 1)``; rank 4 ``HWIO``
  ``(0, 1, 2)``; in general every axis but the last. Rank 3 is ambiguous:
  ``optax.adaptive_grad_clip`` reduces rank-3 leaves over axis 0 only (multi-head
  ``[in, heads, head_dim]`` kernels) whereas its docstring describes units as
  "all but the output axis"; we follow the latter, which matches Conv1D ``WIO``
  kernels and attention output projections. Pass ``axis=0`` to get Optax's choice
  (``axis`` applies to every leaf of rank >= 2; use ``optax.partition`` to give
  different leaves different axes).

  The paper does not clip the final (classifier) layer. Exclude it with
  ``optax.masked``::

      mask = lambda params: {k: k != "head" for k in params}
      tx = optax.chain(optax.masked(gradclip_jax.adaptive_grad_clip(0.01), mask),
                       optax.sgd(0.1, momentum=0.9, nesterov=True))

  ``update`` needs the parameters: ``tx.update(grads, state, params)``.

  Args:
    clipping: the maximal ratio ``||G_i|| / max(||W_i||, eps)`` (>= 0).
    eps: floor on the weight norm (>= 0), so zero-initialised units can move.
    axis: ``None`` (rule above) or an int / tuple of ints reducing every leaf of
      rank >= 2 (static: list it in ``inject_hyperparams``' ``static_args``).

  Returns:
    An ``optax.GradientTransformation`` with an :class:`AdaptiveGradClipState`.

  Raises:
    ValueError: a negative or NaN ``clipping``/``eps``, or (at ``update``) missing
      params, params of another structure or shape than the gradients, or an
      ``axis`` out of range.
    TypeError: a non-scalar or non-numeric ``clipping``/``eps``, a bad ``axis``, or
      (at ``update``) a non-float leaf.

  Examples:
    >>> import jax.numpy as jnp, gradclip_jax
    >>> tx = gradclip_jax.adaptive_grad_clip(clipping=0.1)
    >>> params = {"w": jnp.array([[3.0], [4.0]])}          # one unit, ||W|| = 5
    >>> grads = {"w": jnp.array([[0.0], [2.0]])}            # ||G|| = 2 > 0.1 * 5
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates["w"].ravel().tolist(), float(state.max_ratio), int(state.num_clipped)
    ([0.0, 0.5], 0.4000000059604645, 1)
  """
  _validate.check_threshold("clipping", clipping, scalar=True)
  _validate.check_threshold("eps", eps, scalar=True)
  if axis is not None and not isinstance(axis, (numbers.Integral, np.integer, tuple,
                                                list)):
    raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")

  def init_fn(params):
    dtype = _clipping.state_dtype(params)
    return AdaptiveGradClipState(global_norm=_norms.zero_of(dtype),
                                 max_ratio=_norms.zero_of(dtype),
                                 num_clipped=_norms.zero_count())

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("adaptive_grad_clip needs params: call "
                       "tx.update(grads, state, params)")
    _validate.check_gradient_tree(updates)
    _validate.check_gradient_tree(params, "parameter")
    g_leaves, treedef = jax.tree.flatten(updates)
    try:
      w_leaves = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "adaptive_grad_clip: params do not have the structure of the gradients:\n"
          f"  gradients: {treedef}\n  params: {jax.tree.structure(params)}") from e
    for g, w in zip(g_leaves, w_leaves):
      if g.shape != jnp.shape(w):
        raise ValueError(f"adaptive_grad_clip: gradient shape {g.shape} differs from "
                         f"parameter shape {jnp.shape(w)}")
    axes = [unitwise_axes(g.ndim, axis) for g in g_leaves]
    # Norms and scales per group of same-shape leaves (see _norms.LeafGroups).
    groups = _norms.LeafGroups(g_leaves, axes)
    g_norms = groups.norms(groups.stack(g_leaves))
    w_norms = groups.norms(groups.stack(_tuning.weights_apart(w_leaves)))
    # ||G_i|| / max(||W_i||, eps) <= clipping, in the gradient norm's dtype.
    w_norms = [jnp.maximum(w.astype(g.dtype), jnp.maximum(_as(eps, g.dtype), 0.0))
               for g, w in zip(g_norms, w_norms)]
    scales = [_norms.clip_scale(g, jnp.maximum(_as(clipping, g.dtype), 0.0) * w)
              for g, w in zip(g_norms, w_norms)]
    out = groups.scale(g_leaves, scales)
    hit = _norms.stacked_any([s < 1 for s in scales])
    dtype = state.global_norm.dtype
    max_ratio = _norms.stacked_max([g / w for g, w in zip(g_norms, w_norms)], dtype)
    # The unit norms already hold the whole sum of squares: no second pass.
    norm = _norms.tree_norm(g_norms)
    return jax.tree.unflatten(treedef, out), AdaptiveGradClipState(
        global_norm=norm.astype(dtype), max_ratio=max_ratio,
        num_clipped=state.num_clipped + hit.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


# ====================================================================== autoclip


class AutoClipState(NamedTuple):
  """State of :func:`autoclip`."""
  norm_history: jax.Array  # [history_size]: ring buffer of global norms.
  count: jax.Array         # int32: finite norms recorded so far (may exceed size).
  global_norm: jax.Array   # global norm of this step's gradients.
  max_norm: jax.Array      # the percentile threshold used this step.
  num_clipped: jax.Array   # int32: steps with global_norm > max_norm.


def filled_percentile(history: jax.Array, filled: jax.Array,
                      percentile: Any) -> jax.Array:
  """``np.percentile(history[:filled], percentile)`` (linear), jit-friendly.

  Only the first ``filled`` slots are used (a ring buffer is full once it has
  wrapped, so its slot order does not matter). Unfilled slots are padded with
  ``+inf`` and sorted to the end; the result interpolates linearly between the
  order statistics at ``floor(k)`` and ``floor(k) + 1``, ``k = (filled - 1) * q /
  100``, exactly as NumPy's default ``method="linear"``. ``+inf`` when ``filled``
  is 0.
  """
  size = history.shape[0]
  n = jnp.clip(jnp.asarray(filled, jnp.int32), 0, size)
  padded = jnp.where(jnp.arange(size) < n, history, jnp.inf)
  ordered = jnp.sort(padded)
  dtype = history.dtype
  q = jnp.clip(_as(percentile, dtype), 0.0, 100.0) / 100.0
  k = (jnp.maximum(n, 1) - 1).astype(dtype) * q
  lo = jnp.floor(k)
  t = k - lo
  lo_i = lo.astype(jnp.int32)
  hi_i = jnp.minimum(lo_i + 1, jnp.maximum(n - 1, 0))
  a, b = ordered[lo_i], ordered[hi_i]
  # NumPy's _lerp: exact at both ends of the interval (and no inf - inf when a == b).
  diff = jnp.where(a == b, 0.0, b - a)
  value = jnp.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)
  return jnp.where(n > 0, value, jnp.inf)


def autoclip(percentile: Any = 10.0,
             history_size: int = 1000) -> optax.GradientTransformation:
  r"""AutoClip: clip the global norm to a percentile of its own history.

  Seetharaman, Wichern, Pardo, Le Roux, 2020, "AutoClip: Adaptive Gradient
  Clipping for Source Separation Networks" (arXiv:2007.14469). At step ``t`` with
  global norm ``n_t``::

      H_t = {n_s : s <= t}  (the last ``history_size`` finite norms, n_t included)
      c_t = percentile(H_t, p)          # np.percentile, linear interpolation
      g  <- g * min(1, c_t / n_t)

  The paper's default is ``p = 10`` (it reports p in 10..25 working well) and it
  keeps the whole history; we keep the last ``history_size`` norms in a
  ring buffer (fixed-size state; float64 for float64 parameters), which also lets
  the threshold follow a
  drifting gradient scale. As in the paper's code, the current norm enters the
  history *before* the percentile is taken, so the first step is never clipped
  (``c_1 = n_1``) and ``p = 100`` clips only norms above all previous ones. The
  percentile is exact over the filled part of the buffer
  (:func:`filled_percentile`); a full ``sort`` of ``history_size`` values per step.

  Args:
    percentile: ``p`` in [0, 100] (may be a JAX scalar for ``inject_hyperparams``).
    history_size: ring-buffer length >= 1 (a shape: must be a static Python int).

  Returns:
    An ``optax.GradientTransformation`` with an :class:`AutoClipState`.

  Raises:
    ValueError: ``percentile`` outside [0, 100] or ``history_size < 1``.
    TypeError: a non-scalar ``percentile``, a ``history_size`` that is not a Python
      int, or (at ``update``) a non-float leaf.

  Examples:
    >>> import jax.numpy as jnp, gradclip_jax
    >>> tx = gradclip_jax.autoclip(percentile=50.0, history_size=4)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for n in [1.0, 3.0, 2.0, 8.0]:
    ...   u, state = tx.update({"w": jnp.array([n])}, state)
    >>> float(state.max_norm), u["w"].tolist()    # median of 1, 3, 2, 8
    (2.5, [2.5])
  """
  _validate.check_range("percentile", percentile, 0.0, 100.0)
  _validate.check_int("history_size", history_size, 1, static=True)
  size = int(history_size)

  def init_fn(params):
    dtype = _clipping.state_dtype(params)
    return AutoClipState(norm_history=jnp.zeros((size,), dtype),
                         count=_norms.zero_count(),
                         global_norm=_norms.zero_of(dtype),
                         max_norm=jnp.full((), jnp.inf, dtype),
                         num_clipped=_norms.zero_count())

  def update_fn(updates, state, params=None):
    del params
    norm, finite, inc = _global_norm_and_count(updates)
    dtype = state.norm_history.dtype
    slot = state.count % size
    history = jnp.where(finite, state.norm_history.at[slot].set(norm.astype(dtype)),
                        state.norm_history)
    count = state.count + inc
    threshold = filled_percentile(history, jnp.minimum(count, size), percentile)
    scale = _propagate(finite, _norms.clip_scale(norm, threshold))
    clipped = finite & (scale < 1)
    new_updates = _clipping.scale_tree(updates, scale)
    return new_updates, AutoClipState(
        norm_history=history, count=count, global_norm=norm.astype(dtype),
        max_norm=threshold,
        num_clipped=state.num_clipped + clipped.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


# ========================================================================= zclip


class ZClipState(NamedTuple):
  """State of :func:`zclip`."""
  mean: jax.Array         # EMA of the (clipped) global norm; warm-up: its mean.
  var: jax.Array          # EMA variance; warm-up: population variance.
  count: jax.Array        # int32: finite steps seen.
  global_norm: jax.Array  # global norm of this step's gradients (pre-clip).
  max_norm: jax.Array     # bound on this step's output norm (see zclip).
  num_clipped: jax.Array  # int32: steps in which the update was scaled down.


def zclip(alpha: Any = 0.97, z_threshold: Any = 2.5, warmup_steps: Any = 25,
          max_norm: Any = None, eps: Any = 1e-6) -> optax.GradientTransformation:
  r"""ZClip: z-score spike detection on the global norm, reciprocal clipping.

  Kumar, Owen, Roy Chowdhury, Güra, 2025, "ZClip: Adaptive Spike Mitigation for
  LLM Pre-Training" (arXiv:2504.02507), ``mode="zscore"``,
  ``clip_option="adaptive_scaling"``. With global norm ``g_t``:

  * **Warm-up** (the first ``warmup_steps`` finite steps): no adaptive clipping;
    ``mu``, ``sigma^2`` are the mean and population variance of the warm-up
    norms (kept exactly with Welford's update).
  * **Then**::

        z_t = (g_t - mu) / (sigma + eps)
        c_t = mu + z_thr * sigma / (z_t / z_thr) = mu + z_thr^2 * sigma / z_t
                                                          if z_t > z_thr (spike)
        g  <- g * min(1, c_t / g_t)
        g~ = c_t on a spike, g_t otherwise               # the "clipped" norm
        mu      <- alpha * mu + (1 - alpha) * g~
        sigma^2 <- alpha * sigma^2 + (1 - alpha) * (g~ - mu)^2   # new mu

    The larger the spike, the harder it is clipped (``c_t`` falls towards ``mu``
    as ``z_t`` grows), and spikes enter the statistics only as ``c_t``.
  * ``max_norm`` (optional): a hard cap ``min(c_t, max_norm)`` applied on every
    step, warm-up included; as in the authors' code it does not change the EMA
    input ``g~``.

  Paper defaults: ``alpha = 0.97``, ``z_thr = 2.5``, 25 warm-up steps,
  ``eps = 1e-6``. ``warmup_steps = 0`` behaves as 1 (the statistics need a norm).

  ``state.max_norm`` is the bound on this step's output norm: ``c_t`` on a spike,
  the detection boundary ``mu + z_thr * (sigma + eps)`` otherwise (``inf`` during
  warm-up), capped by ``max_norm``.

  Args:
    alpha: EMA decay in [0, 1).
    z_threshold: z-score above which a norm is a spike (> 0).
    warmup_steps: number of steps (>= 0) that only collect statistics.
    max_norm: optional hard cap on the global norm (>= 0), or None.
    eps: added to ``sigma`` in the z-score (>= 0).

  Returns:
    An ``optax.GradientTransformation`` with a :class:`ZClipState`.

  Raises:
    ValueError: a hyperparameter out of its range (``alpha`` in [0, 1),
      ``z_threshold > 0``, ``warmup_steps >= 0``, ``max_norm``/``eps >= 0``).
    TypeError: a non-scalar or non-numeric hyperparameter, or (at ``update``) a
      non-float leaf.

  Examples:
    >>> import jax.numpy as jnp, gradclip_jax
    >>> tx = gradclip_jax.zclip(warmup_steps=2)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for n in [1.0, 3.0]:        # warm-up: mu = 2, sigma = 1
    ...   _, state = tx.update({"w": jnp.array([n])}, state)
    >>> u, state = tx.update({"w": jnp.array([12.0])}, state)  # z = 10 > 2.5
    >>> round(float(u["w"][0]), 4)    # 2 + 2.5 * 1 / (10 / 2.5)
    2.625
  """
  _validate.check_range("alpha", alpha, 0.0, 1.0, hi_open=True)
  _validate.check_range("z_threshold", z_threshold, 0.0, math.inf, lo_open=True)
  _validate.check_int("warmup_steps", warmup_steps, 0)
  if max_norm is not None:
    _validate.check_threshold("max_norm", max_norm, scalar=True)
  _validate.check_threshold("eps", eps, scalar=True)

  def init_fn(params):
    # Distinct buffers per field, so the state can be donated to a jitted step.
    dtype = _clipping.state_dtype(params)
    zero = lambda: _norms.zero_of(dtype)
    return ZClipState(mean=zero(), var=zero(), count=_norms.zero_count(),
                      global_norm=zero(),
                      max_norm=jnp.full((), jnp.inf, dtype),
                      num_clipped=_norms.zero_count())

  def update_fn(updates, state, params=None):
    del params
    norm, finite, inc = _global_norm_and_count(updates)
    dtype = state.mean.dtype  # the statistics' dtype; the scale is in norm's
    a, z_thr = _as(alpha, dtype), _as(z_threshold, dtype)
    e = jnp.maximum(_as(eps, dtype), 0.0)
    cap = (jnp.full((), jnp.inf, dtype) if max_norm is None
           else jnp.maximum(_as(max_norm, dtype), 0.0))
    warm = state.count < jnp.maximum(jnp.asarray(warmup_steps, jnp.int32), 1)
    safe_norm = jnp.where(finite, norm, 0.0).astype(dtype)

    # Warm-up: Welford's running mean / population variance of the raw norms.
    n1 = (state.count + 1).astype(dtype)
    delta = safe_norm - state.mean
    w_mean = state.mean + delta / n1
    w_var = (state.var * (n1 - 1.0) + delta * (safe_norm - w_mean)) / n1

    # After warm-up: z-score and reciprocal clipping.
    sigma = jnp.sqrt(jnp.maximum(state.var, 0.0))
    z = (safe_norm - state.mean) / (sigma + e)
    spike = ~warm & (z > z_thr)
    z_safe = jnp.where(spike, z, z_thr)
    adaptive = state.mean + z_thr * sigma / (z_safe / z_thr)
    effective = jnp.minimum(jnp.where(spike, adaptive, jnp.inf), cap)
    scale = _propagate(finite, _norms.clip_scale(norm, effective))
    bound = jnp.where(warm, jnp.inf,
                      jnp.where(spike, adaptive, state.mean + z_thr * (sigma + e)))
    bound = jnp.minimum(bound, cap)

    clipped_norm = jnp.where(spike, adaptive, safe_norm)
    e_mean = a * state.mean + (1.0 - a) * clipped_norm
    e_var = a * state.var + (1.0 - a) * jnp.square(clipped_norm - e_mean)
    mean = jnp.where(finite, jnp.where(warm, w_mean, e_mean), state.mean)
    var = jnp.where(finite, jnp.where(warm, w_var, e_var), state.var)

    clipped = finite & (scale < 1)
    new_updates = _clipping.scale_tree(updates, scale)
    return new_updates, ZClipState(
        mean=mean, var=var, count=state.count + inc, global_norm=norm.astype(dtype),
        max_norm=bound, num_clipped=state.num_clipped + clipped.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


# ========================================================================= adagc


class AdaGCState(NamedTuple):
  """State of :func:`adagc`."""
  gamma: Any              # pytree of scalars (one per leaf): the EMA gamma_i.
  count: jax.Array        # int32: finite steps seen.
  global_norm: jax.Array  # global norm of this step's gradients (pre-clip).
  max_norm: jax.Array     # lambda_abs in warm-up, then ||lambda_rel*gamma||_2.
  num_clipped: jax.Array  # int32: steps in which some tensor was scaled down.


def adagc(lambda_abs: Any = 1.0, lambda_rel: Any = 1.05, beta: Any = 0.98,
          warmup_steps: Any = 100) -> optax.GradientTransformation:
  r"""AdaGC: per-tensor clipping against an EMA of each tensor's clipped norm.

  Wang, Li, Chen, Zeng, Yang, Yu, Ma, Shen, 2025, "AdaGC: Improving Training
  Stability for Large Language Model Pretraining" (arXiv:2502.11034, Algorithm 1).
  For each leaf ``i`` with norm ``n_i`` (global norm ``n``), at step ``t``:

  * **Warm-up** (``t <= warmup_steps``): global clipping, and ``gamma_i`` tracks
    the running minimum of the clipped per-tensor norms::

        g_i <- g_i * min(1, lambda_abs / n)
        gamma_i <- min(gamma_i, ||g_i||)            (gamma_i starts at +inf)

  * **Then** per tensor::

        g_i <- g_i * min(1, lambda_rel * gamma_i / n_i)
        gamma_i <- beta * gamma_i + (1 - beta) * ||g_i||   (clipped norm)

  Paper defaults: ``lambda_abs = 1.0``, ``lambda_rel = 1.05``, ``beta = 0.98``,
  100 warm-up steps (``T_start``). Interpretation choices, beyond the paper:
  a zero clipped norm (a tensor without gradient that step) does not enter the
  warm-up minimum, since ``gamma_i = 0`` would freeze that tensor for good; and a
  ``gamma_i`` still at ``+inf`` after warm-up (never a non-zero gradient) is set
  to the first non-zero norm instead of being averaged. ``warmup_steps = 0`` is
  allowed (each tensor's first norm then initialises its ``gamma_i`` unclipped).

  ``state.gamma`` holds the ``gamma_i`` (per-tensor thresholds are
  ``lambda_rel * gamma``); ``state.max_norm`` is the bound on the output global
  norm: ``lambda_abs`` during warm-up, ``||lambda_rel * gamma||_2`` after.

  Args:
    lambda_abs: global threshold during warm-up (>= 0).
    lambda_rel: relative per-tensor threshold after warm-up (>= 0).
    beta: EMA decay of ``gamma`` in [0, 1).
    warmup_steps: number of global-clipping steps (>= 0).

  Returns:
    An ``optax.GradientTransformation`` with an :class:`AdaGCState`.

  Raises:
    ValueError: a hyperparameter out of its range (``lambda_abs``/``lambda_rel``
      >= 0, ``beta`` in [0, 1), ``warmup_steps >= 0``), or (at ``update``) gradients
      of another structure than the params given to ``init``.
    TypeError: a non-scalar or non-numeric hyperparameter, or (at ``update``) a
      non-float leaf.

  Examples:
    >>> import jax.numpy as jnp, gradclip_jax
    >>> tx = gradclip_jax.adagc(lambda_abs=10.0, lambda_rel=1.0, beta=0.5,
    ...                         warmup_steps=1)
    >>> state = tx.init({"a": jnp.zeros(1), "b": jnp.zeros(1)})
    >>> _, state = tx.update({"a": jnp.array([1.0]), "b": jnp.array([2.0])}, state)
    >>> u, state = tx.update({"a": jnp.array([4.0]), "b": jnp.array([1.0])}, state)
    >>> u["a"].tolist(), u["b"].tolist()         # "a" clipped to gamma_a = 1
    ([1.0], [1.0])
    >>> state.gamma["a"].tolist(), state.gamma["b"].tolist()
    (1.0, 1.5)
  """
  _validate.check_threshold("lambda_abs", lambda_abs, scalar=True)
  _validate.check_threshold("lambda_rel", lambda_rel, scalar=True)
  _validate.check_range("beta", beta, 0.0, 1.0, hi_open=True)
  _validate.check_int("warmup_steps", warmup_steps, 0)

  def init_fn(params):
    dtype = _clipping.state_dtype(params)
    return AdaGCState(
        gamma=jax.tree.map(lambda p: jnp.full(
            (), jnp.inf, _norms.real_acc_dtype(_validate.dtype_of(p))), params),
        count=_norms.zero_count(), global_norm=_norms.zero_of(dtype),
        max_norm=jnp.full((), jnp.inf, dtype), num_clipped=_norms.zero_count())

  def update_fn(updates, state, params=None):
    del params
    _validate.check_gradient_tree(updates)
    leaves, treedef = jax.tree.flatten(updates)
    try:
      gammas = treedef.flatten_up_to(state.gamma)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "adagc: the gradients do not have the structure of the params given to "
          f"init:\n  gradients: {treedef}\n  gamma: "
          f"{jax.tree.structure(state.gamma)}") from e
    # Per-tensor norms, gammas and scales as one vector per group of same-shape
    # leaves (see _norms.LeafGroups): a few kernels instead of several per leaf.
    groups = _norms.LeafGroups(leaves)
    norms = [n.reshape(n.shape[0]) for n in groups.norms(groups.stack(leaves))]
    norm = _norms.tree_norm(norms)
    finite, inc = _is_finite_and_count(norm)
    warm = state.count < jnp.asarray(warmup_steps, jnp.int32)
    global_scale = _norms.clip_scale(norm, lambda_abs)
    new_gammas, thresholds, scales = [], [], []
    for n_i, gamma in zip(norms, groups.stack(gammas)):
      dtype = jnp.promote_types(n_i.dtype, gamma.dtype)
      n_i, gamma = n_i.astype(dtype), gamma.astype(dtype)
      b, rel = _as(beta, dtype), jnp.maximum(_as(lambda_rel, dtype), 0.0)
      thr = rel * gamma
      scale = jnp.where(warm, global_scale, _norms.clip_scale(n_i, thr))
      scale = _propagate(finite, scale)
      scales.append(scale)
      clipped = jnp.where(scale < 1, n_i * scale, n_i)
      positive = clipped > 0
      warm_gamma = jnp.where(positive, jnp.minimum(gamma, clipped), gamma)
      ema_gamma = jnp.where(jnp.isinf(gamma),
                            jnp.where(positive, clipped, gamma),
                            b * gamma + (1.0 - b) * clipped)
      new_gammas.append(jnp.where(finite, jnp.where(warm, warm_gamma, ema_gamma),
                                  gamma))
      thresholds.append(thr)
    out = groups.scale(leaves, scales)
    new_gammas = [n.astype(g.dtype) for n, g in zip(groups.unstack(new_gammas), gammas)]
    hit = _norms.stacked_any([s < 1 for s in scales])
    dtype = state.global_norm.dtype
    bound = jnp.where(warm, jnp.maximum(_as(lambda_abs, dtype), 0.0),
                      _norms.tree_norm(thresholds).astype(dtype))
    return jax.tree.unflatten(treedef, out), AdaGCState(
        gamma=jax.tree.unflatten(treedef, new_gammas),
        count=state.count + inc, global_norm=norm.astype(dtype), max_norm=bound,
        num_clipped=state.num_clipped + (finite & hit).astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


# =================================================================== skip_spikes


class SkipSpikesState(NamedTuple):
  """State of :func:`skip_spikes`."""
  inner_state: Any        # the wrapped optimizer's state (untouched on skipped steps).
  mean: jax.Array         # EMA mean of the global norm over accepted steps.
  var: jax.Array          # EMA variance of the global norm over accepted steps.
  count: jax.Array        # int32: accepted steps.
  global_norm: jax.Array  # global norm of this step's gradients.
  max_norm: jax.Array     # spike threshold this step (inf before min_count).
  num_skipped: jax.Array  # int32: skipped steps (non-finite or spike).
  num_clipped: jax.Array  # int32: same as num_skipped (package-wide convention).


def skip_spikes(inner: optax.GradientTransformation, threshold: Any = 6.0,
                ema_decay: Any = 0.99, min_count: Any = 50
                ) -> optax.GradientTransformationExtraArgs:
  r"""Wraps an optimizer and skips steps whose gradient norm is a spike or non-finite.

  The idea behind axlearn's ``skip_and_clip_by_global_norm`` (drop norm from the
  running mean/stddev of the norm) and Optax's ``apply_if_finite``. With global
  norm ``n_t`` and running statistics ``mu``, ``sigma^2`` of the *accepted* norms::

      skip_t = (n_t is NaN or inf)
               or (count >= min_count and n_t > mu + threshold * sigma)

  A skipped step returns an all-zero update and leaves ``inner``'s state and the
  statistics unchanged (only ``num_skipped``/``num_clipped`` grow). An accepted step
  runs ``inner`` and updates the statistics with an exponentially weighted mean
  and variance (Finch 2009; the first accepted norm sets ``mu``, ``sigma = 0``)::

      d = n_t - mu;  mu <- mu + (1 - ema_decay) * d
      sigma^2 <- ema_decay * (sigma^2 + (1 - ema_decay) * d^2)

  Statistics of the norm itself (not its log), so ``threshold`` is in standard
  deviations of the norm. Non-finite norms are skipped even before ``min_count``.
  Caveat: statistics only follow accepted steps, so a genuine, lasting jump in
  the gradient scale larger than ``threshold`` sigmas is skipped indefinitely;
  keep ``threshold`` large (skipping is a last resort), or clip spikes instead
  with :func:`zclip`. ``state.num_skipped`` is worth monitoring.

  Args:
    inner: the optimizer (or chain) to protect, e.g. ``optax.adamw(1e-3)``.
    threshold: spike threshold in standard deviations (>= 0).
    ema_decay: decay of the mean/variance EMAs, in [0, 1).
    min_count: accepted steps before spikes (not non-finite norms) are detected.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`SkipSpikesState`.

  Raises:
    ValueError: ``threshold < 0``, ``ema_decay`` outside [0, 1) or
      ``min_count < 0``.
    TypeError: ``inner`` is not an optax transformation, a non-scalar
      hyperparameter, or (at ``update``) a non-float leaf.

  Examples:
    >>> import jax.numpy as jnp, optax, gradclip_jax
    >>> tx = gradclip_jax.skip_spikes(optax.sgd(1.0), threshold=3.0, min_count=2)
    >>> params = {"w": jnp.zeros(1)}
    >>> state = tx.init(params)
    >>> for n in [1.0, 1.2, 100.0]:
    ...   u, state = tx.update({"w": jnp.array([n])}, state, params)
    >>> u["w"].tolist(), int(state.num_skipped)
    ([0.0], 1)
  """
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    raise TypeError(f"skip_spikes wraps an optax.GradientTransformation, got "
                    f"{type(inner).__name__}")
  _validate.check_threshold("threshold", threshold, scalar=True)
  _validate.check_range("ema_decay", ema_decay, 0.0, 1.0, hi_open=True)
  _validate.check_int("min_count", min_count, 0)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    dtype = _clipping.state_dtype(params)
    zero = lambda: _norms.zero_of(dtype)  # distinct buffers: donatable state
    return SkipSpikesState(
        inner_state=inner.init(params), mean=zero(), var=zero(),
        count=_norms.zero_count(),
        global_norm=zero(), max_norm=jnp.full((), jnp.inf, dtype),
        num_skipped=_norms.zero_count(), num_clipped=_norms.zero_count())

  def update_fn(updates, state, params=None, **extra_args):
    _validate.check_gradient_tree(updates)
    norm = _norms.tree_norm(_tuning.norm_apart(_norms.leaves_of(updates)))
    finite = jnp.isfinite(norm)
    dtype = state.mean.dtype
    sigma = jnp.sqrt(jnp.maximum(state.var, 0.0))
    bound = jnp.where(state.count >= jnp.asarray(min_count, jnp.int32),
                      state.mean + jnp.maximum(_as(threshold, dtype), 0.0) * sigma,
                      jnp.inf)
    skip = ~finite | (norm > bound)
    norm = norm.astype(dtype)

    new_updates, new_inner = inner.update(updates, state.inner_state, params,
                                          **extra_args)
    new_updates = jax.tree.map(
        lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
    inner_state = _tuning.ordered_select(skip, state.inner_state, new_inner,
                                         new_updates)

    d = _as(ema_decay, dtype)
    first = state.count == 0
    delta = jnp.where(finite, norm, 0.0) - state.mean
    mean = jnp.where(first, norm, state.mean + (1.0 - d) * delta)
    var = jnp.where(first, 0.0, d * (state.var + (1.0 - d) * jnp.square(delta)))
    skipped = skip.astype(jnp.int32)
    return new_updates, SkipSpikesState(
        inner_state=inner_state,
        mean=jnp.where(skip, state.mean, mean),
        var=jnp.where(skip, state.var, var),
        count=state.count + (1 - skipped),
        global_norm=norm, max_norm=bound,
        num_skipped=state.num_skipped + skipped,
        num_clipped=state.num_clipped + skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = [
    "AdaGCState", "AdaptiveGradClipState", "AutoClipState", "SkipSpikesState",
    "ZClipState", "adagc", "adaptive_grad_clip", "autoclip", "skip_spikes", "zclip",
]
