"""Per-example clipping and Gaussian noise for DP-SGD, as Optax transforms.

:func:`per_example_clip` takes gradients that carry a leading batch axis ``B`` (one
gradient tree per example, e.g. from ``jax.vmap(jax.grad(loss))``) and returns the
*sum* over examples of each example's gradient scaled by ``min(1, max_norm / n_b)``.
:func:`add_noise` adds ``N(0, (noise_multiplier * sensitivity)^2)`` to every entry of
that sum, keyed from its state. :func:`dp_aggregate` chains the two.

Norms and sums are accumulated in float32 for bfloat16/float16/float32 leaves and in
float64 for float64 leaves (complex64 / complex128 for complex leaves); each leaf keeps
its dtype. An example whose norm is NaN or inf contributes exactly zero and is
counted in ``num_nonfinite``.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradclip_jax import _norms
from gradclip_jax import _validate


class PerExampleClipState(NamedTuple):
  """State of :func:`per_example_clip` (read with ``optax.tree_utils.tree_get``).

  The norms are float32, or float64 when ``init`` was given float64 parameters.
  """
  mean_example_norm: jax.Array  # mean per-example norm (finite examples).
  max_example_norm: jax.Array   # largest finite per-example norm.
  fraction_clipped: jax.Array   # f32: fraction of the B examples with norm > max_norm.
  num_nonfinite: jax.Array      # int32: examples this step whose norm was NaN/inf.
  num_clipped: jax.Array        # int32: steps in which some example was clipped.


class AddNoiseState(NamedTuple):
  """State of :func:`add_noise`: the PRNG key of the next step and a step count."""
  rng_key: jax.Array  # uint32[2], a raw ``jax.random.PRNGKey``.
  count: jax.Array    # int32: steps noised so far.


def _zeros_f32():
  return jnp.zeros((), jnp.float32)


def _leaf_example_norms(g: jax.Array) -> jax.Array:
  """L2 norm of each example ``g[b]`` of one leaf, ``[B]``.

  The kernel of :mod:`gradclip_jax._norms` (float32 for 16/32-bit leaves, float64 for
  float64 ones, with its over/underflow rescue).
  """
  if g.ndim == 1:
    return jnp.abs(g.astype(_norms.acc_dtype(g.dtype)))
  return _norms.leaf_norm(g, tuple(range(1, g.ndim))).reshape(g.shape[0])


def _combine_norms(norms: list) -> jax.Array:
  """``sqrt(sum_l n_l^2)`` per example: the L2 norm of each row of ``[B, L]``."""
  if len(norms) == 1:
    return norms[0]
  dtype = jnp.result_type(*norms)
  stack = jnp.stack([n.astype(dtype) for n in norms], axis=1)  # [B, L]
  return _norms.leaf_norm(stack, 1).reshape(stack.shape[0])


def example_norms(per_example: Any) -> jax.Array:
  """L2 norm of each example's gradient, ``[B]``, over all leaves.

  float32, or float64 when a leaf is float64 / complex128.
  """
  leaves = _norms.leaves_of(per_example)
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  return _combine_norms([_leaf_example_norms(g) for g in leaves])


def clip_stats(norms: jax.Array, max_norm: Any):
  """Scale per example (0 for non-finite norms) and the logged statistics.

  The scale and the norm statistics have the dtype of ``norms`` (the counts are
  int32, ``fraction_clipped`` float32).
  """
  if not jnp.issubdtype(norms.dtype, jnp.floating):
    norms = norms.astype(jnp.float32)
  finite = jnp.isfinite(norms)
  scale = jnp.where(finite, _norms.clip_scale(norms, max_norm), 0.0)
  clipped = finite & (norms > jnp.maximum(jnp.asarray(max_norm, norms.dtype), 0.0))
  n_fin = jnp.sum(finite)
  fin_norms = jnp.where(finite, norms, 0.0)
  b = max(norms.shape[0], 1)
  stats = dict(
      mean_example_norm=jnp.sum(fin_norms) / jnp.maximum(n_fin, 1).astype(norms.dtype),
      max_example_norm=jnp.max(fin_norms, initial=0.0),
      fraction_clipped=jnp.sum(clipped).astype(jnp.float32) / b,
      num_nonfinite=jnp.sum(~finite).astype(jnp.int32),
      any_clipped=jnp.any(clipped),
      clipped=clipped)
  return scale, finite, stats


def weighted_example_sum(per_example: Any, weights: jax.Array, finite: jax.Array):
  """``sum_b w_b g_b`` per leaf in its accumulation dtype, ``finite = False`` dropped.

  float32 (complex64) for 16/32-bit leaves, float64 (complex128) for 64-bit ones;
  each output leaf has its input's dtype.
  """

  def one(g):
    acc = _norms.acc_dtype(g.dtype)
    w = weights.reshape((-1,) + (1,) * (g.ndim - 1))
    w = w.astype(_norms.real_acc_dtype(g.dtype))
    f = finite.reshape(w.shape)
    x = g.astype(acc)
    x = jnp.where(f, x * w, jnp.zeros_like(x))  # where, not *, so inf * 0 is 0.
    return jnp.sum(x, axis=0).astype(g.dtype)

  return jax.tree.map(one, per_example)


def _check_batched(updates):
  leaves = _norms.leaves_of(updates)
  if not leaves:
    return 0
  sizes = set()
  for path, g in _validate.leaf_paths(updates):
    if np.ndim(g) == 0:
      raise ValueError(f"per_example_clip needs gradients with a leading batch axis "
                       f"(from jax.vmap); leaf {path} is a scalar")
    sizes.add(g.shape[0])
  if len(sizes) != 1:
    raise ValueError(f"per_example_clip: leaves disagree on the batch size (leading "
                     f"axis): {sorted(sizes)}")
  return sizes.pop()


def _check_scalar(name: str, value: Any) -> None:
  if not _validate.is_scalar_threshold(value):
    raise TypeError(f"{name} must be one scalar, got {type(value).__name__}")


def _check_seed(seed: Any) -> None:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int, got {type(seed).__name__}")


def sensitivity(max_norm: Any, tree: Any = None) -> jax.Array:
  """The L2 sensitivity of a clipped sum: ``C``, or ``sqrt(sum_l C_l^2)`` per leaf.

  ``max_norm`` is a scalar (whole-example clipping, or :func:`per_example_clip`'s
  even split ``C / sqrt(L)``, whose sensitivity is ``C``) or a pytree of per-leaf
  thresholds; ``tree``, if given, is the gradient tree the thresholds must match
  (``ValueError`` otherwise). float32 (float64 under x64 for float64 thresholds).
  """
  if _validate.is_scalar_threshold(max_norm):
    return jnp.asarray(max_norm, jnp.result_type(float))
  if tree is not None:
    max_norm = _validate.broadcast_thresholds("max_norm", max_norm, tree,
                                              target=lambda g: ())
  leaves = jax.tree.leaves(max_norm)
  if not leaves:
    return jnp.zeros((), jnp.result_type(float))
  return _norms.tree_norm([jnp.asarray(c, jnp.result_type(float)) for c in leaves])


def per_example_clip(max_norm: Any, *, per_layer: bool = False
                     ) -> optax.GradientTransformation:
  """Clips every example's gradient to L2 norm ``max_norm`` and sums over examples.

  Input: a gradient tree whose every leaf has a leading batch axis ``B`` (the output
  of ``jax.vmap(jax.grad(loss), in_axes=(None, 0))``). Output: a tree without that
  axis,

  .. math:: \\bar g = \\sum_{b=1}^{B} g_b \\min\\left(1, \\frac{C}{\\lVert g_b \\rVert_2}\\right)

  (Abadi et al., 2016, "Deep Learning with Differential Privacy", CCS). Divide by
  the (expected) batch size afterwards if you want a mean, e.g. with
  ``optax.scale(1 / B)`` after :func:`add_noise`.

  Norms and the sum are accumulated in float32 (complex64) for 16/32-bit leaves and
  in float64 (complex128) for float64 leaves; each leaf keeps its dtype. An example
  whose norm is NaN or inf contributes exactly zero (to every leaf) and is counted in
  the state's ``num_nonfinite``.

  Args:
    max_norm: clip threshold ``C >= 0`` (``inf`` disables clipping but keeps the
      statistics). With ``per_layer=True`` it may also be a pytree with one
      threshold per leaf of the gradients.
    per_layer: clip each leaf of each example on its own. A scalar ``max_norm`` is
      then split evenly, ``C / sqrt(L)`` per leaf for ``L`` leaves, so the whole
      example still has norm ``<= C`` (the sensitivity :func:`add_noise` assumes).
      A per-leaf pytree ``C_l`` is used as given; the sensitivity is then
      ``sqrt(sum_l C_l^2)``, which :func:`add_noise` and :func:`dp_aggregate` use
      when given the same pytree. The state's norm statistics are those of the
      whole-example norms before clipping; ``fraction_clipped`` counts the examples
      with at least one leaf clipped.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`PerExampleClipState`.

  Raises:
    ValueError: a negative or NaN threshold; at update time, a leaf without a batch
      axis, leaves with different batch sizes, or per-leaf thresholds whose
      structure does not match the gradients.
    TypeError: a pytree ``max_norm`` without ``per_layer=True``, a non-numeric
      threshold, or integer/boolean gradient leaves.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradclip_jax
    >>> g = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # 2 examples, norms 5 and 0.5
    >>> tx = gradclip_jax.per_example_clip(1.0)
    >>> out, state = tx.update(g, tx.init(None))
    >>> out["w"]  # 0.2 * [3, 4] + [0.3, 0.4]
    Array([0.90000004, 1.2       ], dtype=float32)
    >>> float(state.fraction_clipped)
    0.5
  """
  _validate.check_threshold("max_norm", max_norm)
  if not isinstance(per_layer, bool):
    raise TypeError(f"per_layer must be True or False, got {per_layer!r}")
  if not per_layer and not _validate.is_scalar_threshold(max_norm):
    raise TypeError("per_example_clip takes one scalar max_norm unless per_layer=True")

  def init_fn(params):
    dt = _norms.norm_dtype([x for x in jax.tree.leaves(params) if hasattr(x, "dtype")
                            and jnp.issubdtype(x.dtype, jnp.inexact)])
    zero = jnp.zeros((), dt)
    return PerExampleClipState(zero, zero, _zeros_f32(),
                               jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    _validate.check_gradient_tree(updates)
    b = _check_batched(updates)
    norms = example_norms(updates)
    if not per_layer:
      scale, finite, stats = clip_stats(norms, max_norm)
      out = weighted_example_sum(updates, scale, finite)
    else:
      leaves, treedef = jax.tree.flatten(updates)
      if _validate.is_scalar_threshold(max_norm):
        per = jnp.asarray(max_norm, jnp.result_type(float)) / math.sqrt(max(len(leaves), 1))
        thresholds = [per] * len(leaves)
      else:
        thresholds = jax.tree.leaves(
            _validate.broadcast_thresholds("max_norm", max_norm, updates,
                                        target=lambda g: ()))
      _, all_finite, stats = clip_stats(norms, sensitivity(max_norm, updates))
      # A bad example (NaN/inf anywhere) is dropped from every leaf.
      out_leaves, clipped = [], jnp.zeros((b,), bool)
      for g, c in zip(leaves, thresholds):
        s, _, st = clip_stats(_leaf_example_norms(g), c)
        out_leaves.append(weighted_example_sum(g, s, all_finite))
        clipped = clipped | st["clipped"]
      out = jax.tree.unflatten(treedef, out_leaves)
      clipped = clipped & all_finite
      stats["any_clipped"] = jnp.any(clipped)
      stats["fraction_clipped"] = jnp.sum(clipped).astype(jnp.float32) / max(b, 1)
    dt = state.mean_example_norm.dtype  # the state keeps init's dtypes
    return out, PerExampleClipState(
        mean_example_norm=stats["mean_example_norm"].astype(dt),
        max_example_norm=stats["max_example_norm"].astype(dt),
        fraction_clipped=stats["fraction_clipped"],
        num_nonfinite=stats["num_nonfinite"],
        num_clipped=state.num_clipped + stats["any_clipped"].astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


def add_noise(noise_multiplier: Any, max_norm: Any, seed: int
              ) -> optax.GradientTransformation:
  """Adds Gaussian noise of stddev ``noise_multiplier * sensitivity`` to every entry.

  .. math:: \\tilde g = \\bar g + \\mathcal{N}(0, \\sigma^2 S^2 I), \\quad
     S = C \\text{ or } S = \\sqrt{\\textstyle\\sum_l C_l^2}

  (the Gaussian mechanism of DP-SGD, Abadi et al., 2016). Meant for the *sum* of
  clipped per-example gradients (the output of :func:`per_example_clip` or of
  :func:`gradclip_jax.clipped_grad` without ``normalize_by``); scale by ``1 / B``
  afterwards. The key lives in the state and is split every step, so two runs from
  the same ``seed`` draw the same noise. Noise is drawn and added in float32 (float64
  for float64 leaves); each leaf keeps its dtype.

  Args:
    noise_multiplier: ``sigma >= 0``, finite.
    max_norm: the clip threshold the sum was clipped with: a scalar ``C`` (also for
      ``per_example_clip(C, per_layer=True)``, whose even split keeps the
      sensitivity at ``C``), or the pytree of per-leaf thresholds ``C_l`` given to
      ``per_example_clip(..., per_layer=True)``; the sensitivity is then
      ``sqrt(sum_l C_l^2)``, and the pytree must match the updates' structure.
    seed: an int; the PRNG key of the first step is ``jax.random.PRNGKey(seed)``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`AddNoiseState`.

  Raises:
    ValueError: a negative, NaN or infinite ``noise_multiplier`` or threshold, or (at
      update time) per-leaf thresholds that do not match the updates.
    TypeError: a non-scalar ``noise_multiplier``, a non-int ``seed``, non-numeric
      thresholds or integer/boolean update leaves.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradclip_jax
    >>> tx = gradclip_jax.add_noise(1.0, {"a": 3.0, "b": 4.0}, seed=0)  # S = 5
    >>> out, _ = tx.update({"a": jnp.zeros(20000), "b": jnp.zeros(3)}, tx.init(None))
    >>> round(float(jnp.std(out["a"])), 1)
    5.0
  """
  _check_scalar("noise_multiplier", noise_multiplier)
  _validate.check_threshold("noise_multiplier", noise_multiplier, allow_inf=False)
  _validate.check_threshold("max_norm", max_norm, allow_inf=False)
  _check_seed(seed)

  def init_fn(params):
    del params
    return AddNoiseState(rng_key=jax.random.PRNGKey(seed),
                         count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    _validate.check_gradient_tree(updates)
    std = jnp.asarray(noise_multiplier, jnp.result_type(float)) * sensitivity(
        max_norm, updates)
    next_key, step_key = jax.random.split(state.rng_key)
    leaves, treedef = jax.tree.flatten(updates)
    keys = jax.random.split(step_key, max(len(leaves), 1))
    out = []
    for k, g in zip(keys, leaves):
      acc = _norms.acc_dtype(g.dtype)
      z = jax.random.normal(k, g.shape, acc)
      out.append((g.astype(acc) + std.astype(_norms.real_acc_dtype(g.dtype)) * z
                  ).astype(g.dtype))
    return jax.tree.unflatten(treedef, out), AddNoiseState(next_key, state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def dp_aggregate(max_norm: Any, noise_multiplier: Any, seed: int, *,
                 per_layer: bool = False) -> optax.GradientTransformation:
  """``per_example_clip(max_norm, per_layer)`` then ``add_noise(noise_multiplier, max_norm)``.

  The noisy clipped sum of DP-SGD (Abadi et al., 2016):
  ``sum_b clip(g_b) + N(0, sigma^2 S^2)`` with ``S = C`` for a scalar threshold and
  ``S = sqrt(sum_l C_l^2)`` for per-leaf thresholds (``per_layer=True``). Input:
  per-example gradients ``[B, ...]``; output: the noisy sum (divide by the expected
  batch size, e.g. ``optax.scale(1 / B)``, for the DP-SGD mean).

  Args:
    max_norm: a scalar ``C``, or with ``per_layer=True`` a pytree of per-leaf
      thresholds matching the gradients.
    noise_multiplier: ``sigma >= 0``.
    seed: an int seeding the noise.
    per_layer: see :func:`per_example_clip`.

  Returns:
    ``optax.chain`` of the two transforms (state: their two states).

  Raises:
    ValueError, TypeError: as :func:`per_example_clip` and :func:`add_noise`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradclip_jax
    >>> g = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> tx = gradclip_jax.dp_aggregate(1.0, 0.0, seed=0)  # no noise: the clipped sum
    >>> tx.update(g, tx.init(None))[0]["w"]
    Array([0.90000004, 1.2       ], dtype=float32)
  """
  return optax.chain(per_example_clip(max_norm, per_layer=per_layer),
                     add_noise(noise_multiplier, max_norm, seed))
