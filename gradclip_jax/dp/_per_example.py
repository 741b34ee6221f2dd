"""Per-example clipping and Gaussian noise for DP-SGD, as Optax transforms.

:func:`per_example_clip` takes gradients that carry a leading batch axis ``B`` (one
gradient tree per example, e.g. from ``jax.vmap(jax.grad(loss))``) and returns the
*sum* over examples of each example's gradient scaled by ``min(1, max_norm / n_b)``.
:func:`add_noise` adds ``N(0, (noise_multiplier * max_norm)^2)`` to every entry of
that sum, keyed from its state. :func:`dp_aggregate` chains the two.

All norms and sums are accumulated in float32 (the kernels of
:mod:`gradclip_jax._norms`); the output keeps each leaf's dtype. An example whose
norm is NaN or inf contributes exactly zero and is counted in ``num_nonfinite``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradclip_jax import _norms


class PerExampleClipState(NamedTuple):
  """State of :func:`per_example_clip` (read with ``optax.tree_utils.tree_get``)."""
  mean_example_norm: jax.Array  # f32: mean per-example norm (finite examples).
  max_example_norm: jax.Array   # f32: largest finite per-example norm.
  fraction_clipped: jax.Array   # f32: fraction of the B examples with norm > max_norm.
  num_nonfinite: jax.Array      # int32: examples this step whose norm was NaN/inf.
  num_clipped: jax.Array        # int32: steps in which some example was clipped.


class AddNoiseState(NamedTuple):
  """State of :func:`add_noise`: the PRNG key of the next step and a step count."""
  rng_key: jax.Array  # uint32[2], a raw ``jax.random.PRNGKey``.
  count: jax.Array    # int32: steps noised so far.


def _zeros_f32():
  return jnp.zeros((), jnp.float32)


def example_norms(per_example: Any) -> jax.Array:
  """float32 L2 norm of each example's gradient, ``[B]``, over all leaves."""
  leaves = _norms.leaves_of(per_example)
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  sq = None
  for g in leaves:
    axes = tuple(range(1, g.ndim))
    if axes:
      n = _norms.leaf_norm(g, axes).reshape(g.shape[0])
    else:
      n = _norms._abs_f32(g)  # pylint: disable=protected-access
    sq = jnp.square(n) if sq is None else sq + jnp.square(n)
  return _norms.safe_root(sq, 2.0)


def clip_stats(norms: jax.Array, max_norm: Any):
  """Scale per example (0 for non-finite norms) and the logged statistics."""
  finite = jnp.isfinite(norms)
  scale = jnp.where(finite, _norms.clip_scale(norms, max_norm), 0.0)
  clipped = finite & (norms > jnp.maximum(jnp.asarray(max_norm, jnp.float32), 0.0))
  n_fin = jnp.sum(finite)
  fin_norms = jnp.where(finite, norms, 0.0)
  b = max(norms.shape[0], 1)
  stats = dict(
      mean_example_norm=jnp.sum(fin_norms) / jnp.maximum(n_fin, 1).astype(jnp.float32),
      max_example_norm=jnp.max(fin_norms, initial=0.0),
      fraction_clipped=jnp.sum(clipped).astype(jnp.float32) / b,
      num_nonfinite=jnp.sum(~finite).astype(jnp.int32),
      any_clipped=jnp.any(clipped))
  return scale, finite, stats


def weighted_example_sum(per_example: Any, weights: jax.Array, finite: jax.Array):
  """``sum_b w_b g_b`` in float32 per leaf, examples with ``finite = False`` dropped."""

  def one(g):
    w = weights.reshape((-1,) + (1,) * (g.ndim - 1))
    f = finite.reshape(w.shape)
    if jnp.iscomplexobj(g):
      x = g.astype(jnp.complex64)
    else:
      x = g.astype(jnp.float32)
    x = jnp.where(f, x * w, jnp.zeros_like(x))  # where, not *, so inf * 0 is 0.
    return jnp.sum(x, axis=0).astype(g.dtype)

  return jax.tree.map(one, per_example)


def _check_batched(updates):
  leaves = _norms.leaves_of(updates)
  if not leaves:
    return 0
  sizes = set()
  for path, g in _norms._leaf_paths(updates):  # pylint: disable=protected-access
    if np.ndim(g) == 0:
      raise ValueError(f"per_example_clip needs gradients with a leading batch axis "
                       f"(from jax.vmap); leaf {path} is a scalar")
    sizes.add(g.shape[0])
  if len(sizes) != 1:
    raise ValueError(f"per_example_clip: leaves disagree on the batch size (leading "
                     f"axis): {sorted(sizes)}")
  return sizes.pop()


def per_example_clip(max_norm: Any, *, per_layer: bool = False
                     ) -> optax.GradientTransformation:
  """Clips every example's gradient to L2 norm ``max_norm`` and sums over examples.

  Input: a gradient tree whose every leaf has a leading batch axis ``B`` (the output
  of ``jax.vmap(jax.grad(loss), in_axes=(None, 0))``). Output: a tree without that
  axis, ``sum_b g_b * min(1, max_norm / ||g_b||)`` (Abadi et al., 2016). Divide by
  the (expected) batch size afterwards if you want a mean, e.g. with
  ``optax.scale(1 / B)`` after :func:`add_noise`.

  Norms and the sum are accumulated in float32 (complex64); each leaf keeps its
  dtype. An example whose norm is NaN or inf contributes exactly zero and is
  counted in the state's ``num_nonfinite``.

  Args:
    max_norm: clip threshold ``C >= 0`` (``inf`` disables clipping but keeps the
      statistics). With ``per_layer=True`` it may also be a pytree with one
      threshold per leaf.
    per_layer: clip each leaf of each example on its own. A scalar ``max_norm`` is
      then split evenly, ``C / sqrt(L)`` per leaf for ``L`` leaves, so the whole
      example still has norm ``<= C`` (the sensitivity :func:`add_noise` assumes).
      A per-leaf pytree is used as given (the sensitivity is then
      ``sqrt(sum C_l^2)``). The state's statistics are those of the whole-example
      norms before clipping.
  """
  _norms.check_threshold("max_norm", max_norm)
  if not per_layer and not _norms.is_scalar_threshold(max_norm):
    raise TypeError("per_example_clip takes one scalar max_norm unless per_layer=True")

  def init_fn(params):
    del params
    return PerExampleClipState(_zeros_f32(), _zeros_f32(), _zeros_f32(),
                               jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    _norms.check_gradient_tree(updates)
    _check_batched(updates)
    norms = example_norms(updates)
    if not per_layer:
      scale, finite, stats = clip_stats(norms, max_norm)
      out = weighted_example_sum(updates, scale, finite)
    else:
      leaves, treedef = jax.tree.flatten(updates)
      if _norms.is_scalar_threshold(max_norm):
        per = jnp.asarray(max_norm, jnp.float32) / math.sqrt(max(len(leaves), 1))
        thresholds = [per] * len(leaves)
      else:
        thresholds = jax.tree.leaves(
            _norms.broadcast_thresholds("max_norm", max_norm, updates))
      _, _, stats = clip_stats(norms, jnp.sqrt(sum(
          jnp.square(jnp.asarray(c, jnp.float32)) for c in thresholds)) if thresholds
                               else max_norm)
      all_finite = jnp.isfinite(norms)  # a bad example is dropped from every leaf
      out_leaves, any_clip = [], jnp.zeros((), bool)
      for g, c in zip(leaves, thresholds):
        n = example_norms(g)
        s, _, st = clip_stats(n, c)
        out_leaves.append(weighted_example_sum(g, s, all_finite))
        any_clip = any_clip | st["any_clipped"]
      out = jax.tree.unflatten(treedef, out_leaves)
      stats["any_clipped"] = any_clip
    return out, PerExampleClipState(
        mean_example_norm=stats["mean_example_norm"],
        max_example_norm=stats["max_example_norm"],
        fraction_clipped=stats["fraction_clipped"],
        num_nonfinite=stats["num_nonfinite"],
        num_clipped=state.num_clipped + stats["any_clipped"].astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


def add_noise(noise_multiplier: Any, max_norm: Any, seed: int
              ) -> optax.GradientTransformation:
  """Adds Gaussian noise of stddev ``noise_multiplier * max_norm`` to every entry.

  Meant for the *sum* of clipped per-example gradients (the output of
  :func:`per_example_clip` or of :func:`gradclip_jax.clipped_grad` without
  ``normalize_by``); scale by ``1 / B`` afterwards. The key lives in the state and is
  split every step, so two runs from the same ``seed`` draw the same noise. Noise is
  drawn and added in float32; each leaf keeps its dtype.
  """
  _norms.check_threshold("noise_multiplier", noise_multiplier, allow_inf=False)
  _norms.check_threshold("max_norm", max_norm, allow_inf=False)

  def init_fn(params):
    del params
    return AddNoiseState(rng_key=jax.random.PRNGKey(seed),
                         count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    _norms.check_gradient_tree(updates)
    std = (jnp.asarray(noise_multiplier, jnp.float32)
           * jnp.asarray(max_norm, jnp.float32))
    next_key, step_key = jax.random.split(state.rng_key)
    leaves, treedef = jax.tree.flatten(updates)
    keys = jax.random.split(step_key, max(len(leaves), 1))
    out = []
    for k, g in zip(keys, leaves):
      if jnp.iscomplexobj(g):
        z = jax.random.normal(k, g.shape, jnp.complex64)
        out.append((g.astype(jnp.complex64) + std * z).astype(g.dtype))
      else:
        z = jax.random.normal(k, g.shape, jnp.float32)
        out.append((g.astype(jnp.float32) + std * z).astype(g.dtype))
    return jax.tree.unflatten(treedef, out), AddNoiseState(next_key, state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def dp_aggregate(max_norm: Any, noise_multiplier: Any, seed: int, *,
                 per_layer: bool = False) -> optax.GradientTransformation:
  """``per_example_clip(max_norm)`` then ``add_noise(noise_multiplier, max_norm)``.

  Input: per-example gradients ``[B, ...]``; output: the noisy sum (divide by the
  expected batch size, e.g. ``optax.scale(1 / B)``, for the DP-SGD mean).
  """
  return optax.chain(per_example_clip(max_norm, per_layer=per_layer),
                     add_noise(noise_multiplier, max_norm, seed))
