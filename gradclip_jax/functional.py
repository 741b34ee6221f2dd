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

Differences from TensorFlow, all deliberate: norms accumulate in float32 (TF
overflows in float16), zero inputs with a zero threshold give zeros (not NaN), and a
non-finite norm makes every output entry NaN (TF does so for
``clip_by_global_norm``; we do it for the per-tensor rules too).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from gradclip_jax import _clipping
from gradclip_jax import _norms
from gradclip_jax._norms import AxisName


def global_norm(tree: Any, norm_type: float = 2.0,
                axis_name: AxisName = None) -> jax.Array:
  """The Lp norm of all leaves of ``tree`` taken together, as a float32 scalar.

  ``norm_type`` is 1, 2, any ``p > 0`` or ``inf``; ``axis_name`` combines the
  partial norms of every device inside ``shard_map``/``pmap`` (see
  :func:`gradclip_jax.clip_by_global_norm`).

  >>> import jax.numpy as jnp
  >>> from gradclip_jax import functional as F
  >>> float(F.global_norm([jnp.array([3.0]), None, jnp.array([4.0])]))
  5.0
  """
  _norms.check_gradient_tree(tree, "input")
  p = _norms.check_norm_type(norm_type)
  return _norms.tree_norm(_norms.leaves_of(tree), p, axis_name)


def clip_by_value(tree: Any, min_value: Any, max_value: Any) -> Any:
  """``tf.clip_by_value`` over a pytree: every entry clipped to ``[min, max]``."""
  tx = _clipping.clip_by_value(min_value, max_value)
  return tx.update(tree, tx.init(tree))[0]


def clip_by_norm(tree: Any, max_norm: Any, axes: Any = None) -> Any:
  """``tf.clip_by_norm`` applied to every leaf: ``t * c / max(||t||_2, c)``."""
  _norms.check_threshold("max_norm", max_norm)
  return _clipping._per_leaf_clip(tree, max_norm, axes, average=False)[0]  # pylint: disable=protected-access


def clip_by_average_norm(tree: Any, max_norm: Any) -> Any:
  """``tf.clip_by_average_norm`` (TF 1) on every leaf: ``t * min(1, c n / ||t||)``."""
  _norms.check_threshold("max_norm", max_norm)
  return _clipping._per_leaf_clip(tree, max_norm, None, average=True)[0]  # pylint: disable=protected-access


def clip_by_global_norm(tree: Any, max_norm: Any, use_norm: Optional[Any] = None,
                        norm_type: float = 2.0) -> Tuple[Any, jax.Array]:
  """``tf.clip_by_global_norm(t_list, clip_norm, use_norm)`` over a pytree.

  Returns ``(clipped_tree, global_norm)`` where every leaf is multiplied by
  ``max_norm / max(global_norm, max_norm)``. A given ``use_norm`` is used instead
  of computing the norm (e.g. the norm of the full gradient when clipping a part of
  it). If the norm is NaN or inf, every entry of the result is NaN, as in TF.

  >>> import jax.numpy as jnp
  >>> from gradclip_jax import functional as F
  >>> clipped, norm = F.clip_by_global_norm([jnp.array([6.0]), jnp.array([8.0])], 5.0)
  >>> float(norm), [c.tolist() for c in clipped]
  (10.0, [[3.0], [4.0]])
  """
  _norms.check_threshold("max_norm", max_norm)
  _norms.check_gradient_tree(tree, "input")
  if use_norm is None:
    norm = _norms.tree_norm(_norms.leaves_of(tree), _norms.check_norm_type(norm_type))
  else:
    norm = jnp.asarray(use_norm, jnp.float32)
  scale = _clipping.nonfinite_scale(norm, _norms.clip_scale(norm, max_norm),
                                    "propagate")
  return _clipping.scale_tree(tree, scale), norm


__all__ = ["clip_by_average_norm", "clip_by_global_norm", "clip_by_norm",
           "clip_by_value", "global_norm"]
