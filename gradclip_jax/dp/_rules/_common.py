"""Array helpers shared by the rules: example-major layouts, float32, masks."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax
import numpy as np

from gradclip_jax.dp import _trace

HI = lax.Precision.HIGHEST


class Canon(NamedTuple):
  """A use's (or a unit's) arrays: ``ex`` has the example axis first on every leaf
  (the engine cuts it into chunks of examples); ``shared`` is used whole."""
  ex: Any
  shared: Any = None


def f32(x):
  """``x`` in float32 (complex64 for complex inputs); wider dtypes are kept."""
  if jnp.iscomplexobj(x):
    return x if x.dtype == jnp.complex128 else x.astype(jnp.complex64)
  return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def sq(x):
  """|x|^2 in float32 or wider (complex: |re|^2 + |im|^2)."""
  x = f32(x)
  return jnp.real(x * jnp.conj(x)) if jnp.iscomplexobj(x) else x * x


def per_example_sq(x):
  """[B, ...] -> [B]: the squared norm of each example's slice, float32 or wider."""
  return jnp.sum(sq(x).reshape(x.shape[0], -1), axis=1)


def split(x, spec: _trace.Spec, ns: int, b: int):
  """Isolates the example axis of ``x`` (``ns`` leading scan-stack dims first).

  Returns ``(x2, dmap, ex)``: ``x2`` has the example axis ``outer x B x inner`` split
  into three dims, ``ex`` is the ``B`` dim of ``x2``, and ``dmap[d]`` lists the dims of
  ``x2`` that hold dim ``d`` of ``x`` other than ``B`` (for the example axis itself,
  its ``outer`` and ``inner`` parts).
  """
  ax = ns + spec.axis
  shp = list(x.shape)
  x2 = x.reshape(shp[:ax] + [spec.outer, b, spec.inner] + shp[ax + 1:])
  dmap = {d: ([d] if d < ax else [d + 2] if d > ax else [ax, ax + 2])
          for d in range(x.ndim)}
  return x2, dmap, ax + 1


def flat(lists):
  return [d for l in lists for d in l]


def mask_rows(x, fin, w=None):
  """``where(fin_b, w_b * x_b, 0)`` along the leading example axis, float32 or wider."""
  shp = (-1,) + (1,) * (x.ndim - 1)
  y = f32(x)
  if w is not None:
    y = y * w.reshape(shp).astype(y.dtype)
  return jnp.where(fin.reshape(shp), y, jnp.zeros((), y.dtype))


def weighted_rows(x, fin, w):
  """``sum_b w_b x_b`` over the rows with ``fin_b``, float32 or wider: ``[B, ...] -> [...]``.

  A product with the weights (a matrix-vector product) rather than a reduction over
  the leading axis, which XLA:CPU runs several times slower; the rows left out are
  zeroed first, so a NaN in one of them stays out.
  """
  y = f32(x)
  shp = (-1,) + (1,) * (x.ndim - 1)
  y = jnp.where(fin.reshape(shp), y, jnp.zeros((), y.dtype))
  wt = jnp.where(fin, w, jnp.zeros((), w.dtype)).astype(y.dtype)
  return jnp.tensordot(wt, y, axes=1, precision=HI)


def to_front(x, spec: _trace.Spec, b: int):
  """[..., outer*B*inner, ...] -> [B, ...] whose slices have the size-1 batch shape."""
  x2, _, ex = split(x, spec, 0, b)
  x2 = jnp.moveaxis(x2, ex, 0)
  shp = list(x.shape)
  shp[spec.axis] = spec.outer * spec.inner
  return x2.reshape((b,) + tuple(shp))


def example_mask(shape, spec: _trace.Spec, b: int, idx):
  """Boolean mask (broadcastable to ``shape``) of the entries of example ``idx``."""
  n = shape[spec.axis]
  ex_of = (jnp.arange(n) // spec.inner) % b
  m = ex_of == idx
  return m.reshape([n if d == spec.axis else 1 for d in range(len(shape))])


def size_of(shape) -> int:
  return int(np.prod(shape, dtype=np.int64))


def steps_of(use) -> int:
  """The number of steps of the scans enclosing a use (1 outside any scan)."""
  return int(np.prod(use.stack, dtype=np.int64)) if use.stack else 1


def weight_stack(use, j):
  """(levels, lengths) of the scans over which ``W'_j`` has one weight per step."""
  levels = tuple(use.in_info[j].wstack)
  return levels, tuple(use.stack[i] for i in levels)
