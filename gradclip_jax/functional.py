"""TensorFlow-style functional clipping: pure functions over pytrees.

For people porting TensorFlow code: each function has the semantics of its
``tf.clip_by_*`` namesake, takes any pytree (a list of tensors works as ``t_list``)
and lets ``None`` entries pass through, as TensorFlow does. They share their
kernels with the Optax transforms (:mod:`gradclip_jax._norms`), so a functional
call and the matching transform give the same numbers.

=====================================  ==========================================
TensorFlow                             gradclip_jax.functional
=====================================  ==========================================
``tf.clip_by_value(t, lo, hi)``        ``clip_by_value(t, lo, hi)``
``tf.clip_by_norm(t, c, axes)``        ``clip_by_norm(t, c, axes)``
``tf.clip_by_average_norm(t, c)``      ``clip_by_average_norm(t, c)``
``tf.linalg.global_norm(t_list)``      ``global_norm(t_list)``
``tf.clip_by_global_norm(l, c, n)``    ``clip_by_global_norm(l, c, use_norm=n)``
=====================================  ==========================================

Differences from TensorFlow, all deliberate: norms accumulate in at least float32
(TF overflows in float16; float64 stays float64 in both), a sum of squares that over-
or underflows is rescued by an exact rescaling, and zero inputs with a zero threshold
give zeros (not NaN). Non-finite entries behave as in TF: ``clip_by_global_norm``
makes every entry NaN when the norm is NaN or inf; the per-tensor rules act on the
leaf that holds the entry only (a NaN entry makes that leaf all NaN; an inf entry
makes its norm inf, so the leaf's scale is 0: its finite entries become 0 and the inf
entry NaN).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gradclip_jax import _clipping
from gradclip_jax import _norms
from gradclip_jax import _validate
from gradclip_jax._norms import AxisName


def global_norm(tree: Any, norm_type: float = 2.0,
                axis_name: AxisName = None) -> jax.Array:
  """The Lp norm of all leaves of ``tree`` taken together: ``||concat(leaves)||_p``.

  ``tf.linalg.global_norm`` for ``p = 2``. The result is a scalar in float32, or in
  float64 when a leaf is float64 (``jax_enable_x64``); NaN if an entry is NaN, inf if
  one is inf.

  Args:
    tree: a pytree of float or complex arrays (``None`` entries are skipped).
    norm_type: ``p``: 1, 2 (default), any ``p > 0``, or ``inf``.
    axis_name: inside ``shard_map``/``pmap``, the mapped axis (or axes) whose
      devices each hold a slice: the norm is that of the whole (see
      :func:`gradclip_jax.clip_by_global_norm`).

  Returns:
    The norm, a scalar array.

  Raises:
    ValueError: ``norm_type <= 0``.
    TypeError: a non-float leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> from gradclip_jax import functional as F
    >>> float(F.global_norm([jnp.array([3.0]), None, jnp.array([4.0])]))
    5.0
  """
  _validate.check_gradient_tree(tree, "input")
  p = _validate.check_norm_type(norm_type)
  return _norms.tree_norm(_norms.leaves_of(tree), p, axis_name)


def clip_by_value(tree: Any, min_value: Any, max_value: Any) -> Any:
  """``tf.clip_by_value`` over a pytree: every entry clipped to ``[min, max]``.

  ``t <- min(max(t, min_value), max_value)`` elementwise; see
  :func:`gradclip_jax.clip_by_value` (which bounds fit a leaf, NaN entries).

  Args:
    tree: a pytree of float arrays.
    min_value: lower bound: a number, or a pytree of per-leaf bounds, each of which
      must broadcast to its leaf's shape without changing it.
    max_value: upper bound, likewise.

  Returns:
    The clipped tree (each leaf keeps its shape and dtype).

  Raises:
    ValueError: a NaN bound, ``min_value > max_value``, or a bound that does not fit
      its leaf (the message names the leaf and both shapes).
    TypeError: a non-numeric bound or a non-float leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> from gradclip_jax import functional as F
    >>> F.clip_by_value([jnp.array([-2.0, 0.5, 3.0])], -1.0, 1.0)[0].tolist()
    [-1.0, 0.5, 1.0]
  """
  tx = _clipping.clip_by_value(min_value, max_value)
  return tx.update(tree, tx.init(tree))[0]


def clip_by_norm(tree: Any, max_norm: Any, axes: Any = None) -> Any:
  """``tf.clip_by_norm`` applied to every leaf: ``t * c / max(||t||_2, c)``.

  The norm is over ``axes`` (the whole leaf when None), kept dims; see
  :func:`gradclip_jax.clip_by_norm`.

  Args:
    tree: a pytree of float or complex arrays.
    max_norm: ``c >= 0``: a number, or a pytree of per-leaf thresholds, each of
      which must broadcast to the shape of its leaf's norm with the reduced
      dimensions kept, without changing it.
    axes: ``None`` or an axis / tuple of axes.

  Returns:
    The clipped tree (each leaf keeps its shape and dtype).

  Raises:
    ValueError: a negative or NaN threshold, an axis out of range, or a threshold
      whose shape does not fit its leaf (the message names the leaf and both shapes).
    TypeError: a non-numeric threshold or a non-float leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> from gradclip_jax import functional as F
    >>> F.clip_by_norm(jnp.array([[3.0, 4.0], [0.3, 0.4]]), 1.0, axes=1).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.30000001192092896, 0.4000000059604645]]
  """
  _validate.check_threshold("max_norm", max_norm)
  return _clipping.per_leaf_clip(tree, max_norm, axes, average=False)[0]


def clip_by_average_norm(tree: Any, max_norm: Any) -> Any:
  """``tf.clip_by_average_norm`` (TF 1) on every leaf: ``t * min(1, c n / ||t||)``.

  ``n = t.size``; see :func:`gradclip_jax.clip_by_average_norm`.

  Args:
    tree: a pytree of float or complex arrays.
    max_norm: ``c >= 0`` on the average norm ``||t|| / n``: a number, or a pytree
      of scalar per-leaf thresholds.

  Returns:
    The clipped tree (each leaf keeps its shape and dtype).

  Raises:
    ValueError: a negative or NaN threshold, or a non-scalar per-leaf threshold.
    TypeError: a non-numeric threshold or a non-float leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> from gradclip_jax import functional as F
    >>> F.clip_by_average_norm(jnp.array([6.0, 8.0]), 1.0).tolist()
    [1.2000000476837158, 1.600000023841858]
  """
  _validate.check_threshold("max_norm", max_norm)
  return _clipping.per_leaf_clip(tree, max_norm, None, average=True)[0]


def clip_by_global_norm(tree: Any, max_norm: Any, use_norm: Optional[Any] = None,
                        norm_type: float = 2.0) -> Tuple[Any, jax.Array]:
  """``tf.clip_by_global_norm(t_list, clip_norm, use_norm)`` over a pytree.

  Every leaf is multiplied by ``max_norm / max(global_norm, max_norm)``. A given
  ``use_norm`` is used instead of computing the norm (e.g. the norm of the full
  gradient when clipping a part of it). If the norm is NaN or inf, every entry of the
  result is NaN, as in TF.

  Args:
    tree: a pytree of float or complex arrays.
    max_norm: one number >= 0.
    use_norm: optional precomputed global norm.
    norm_type: ``p`` of the norm (ignored when ``use_norm`` is given).

  Returns:
    ``(clipped_tree, global_norm)``; the norm in float32, or float64 for float64
    leaves (or a float64 ``use_norm``).

  Raises:
    ValueError: a negative or NaN ``max_norm``, ``norm_type <= 0``, or a
      ``use_norm`` that is not one number.
    TypeError: a ``max_norm`` that is not one number, or a non-float leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> from gradclip_jax import functional as F
    >>> clipped, norm = F.clip_by_global_norm([jnp.array([6.0]), jnp.array([8.0])], 5.0)
    >>> float(norm), [c.tolist() for c in clipped]
    (10.0, [[3.0], [4.0]])
  """
  _validate.check_threshold("max_norm", max_norm, scalar=True)
  _validate.check_gradient_tree(tree, "input")
  leaves = _norms.leaves_of(tree)
  if use_norm is None:
    norm = _norms.tree_norm(leaves, _validate.check_norm_type(norm_type))
  else:
    if np.ndim(use_norm) != 0:
      raise ValueError(f"use_norm must be one number (the norm of the whole tree), "
                       f"got shape {np.shape(use_norm)}")
    dtype = _norms.norm_dtype(leaves)
    if hasattr(use_norm, "dtype"):  # a Python number takes the leaves' dtype
      dtype = jnp.promote_types(dtype, _norms.real_acc_dtype(use_norm.dtype))
    norm = jnp.asarray(use_norm, dtype)
  scale = _clipping.nonfinite_scale(norm, _norms.clip_scale(norm, max_norm),
                                    "propagate")
  return _clipping.scale_tree(tree, scale), norm


__all__ = ["clip_by_average_norm", "clip_by_global_norm", "clip_by_norm",
           "clip_by_value", "global_norm"]
