"""Helpers shared by the rules: example-major layouts, float32, masks, the rule base."""

from __future__ import annotations

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from gradclip_jax.dp import _trace

HI = lax.Precision.HIGHEST


def f32(x):
  return x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32)


def sq(x):
  """|x|^2 in float32 (complex: |re|^2 + |im|^2)."""
  x = f32(x)
  return jnp.real(x * jnp.conj(x)) if jnp.iscomplexobj(x) else x * x


def per_example_sq(x):
  """[B, ...] -> [B]: the squared norm of each example's slice, float32."""
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
  """``where(fin_b, w_b * x_b, 0)`` along the leading example axis, float32."""
  shp = (-1,) + (1,) * (x.ndim - 1)
  y = f32(x)
  if w is not None:
    y = y * w.reshape(shp).astype(y.dtype)
  return jnp.where(fin.reshape(shp), y, jnp.zeros((), y.dtype))


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


def zero_cotangent(aval):
  if np.issubdtype(aval.dtype, np.inexact):
    return jnp.zeros(aval.shape, aval.dtype)
  return np.zeros(aval.shape, jax.dtypes.float0)


class Rule:
  """A rule family. Subclasses fill in ``family`` and the methods below.

  ``match(use)`` -> static data (a dict, with ``"needs"``: the recorded operand
  positions the rule reads) or ``None`` when the rule does not apply.
  ``merge_key(use)`` -> key under which uses of the same parameter operand with the
  same form are concatenated (``None``: never merged).
  ``canon(use, recs, gs, b)`` -> the per-use arrays, example axis first.
  ``concat(canons)``, ``sq(canon) -> [B]``, ``weighted(canon, w, fin, wshapes) ->
  {j: sum_b w_b dW'_b}``, ``per_example(canon, wshapes) -> {j: [B, *W'.shape]}``.
  """

  family = ""

  def match(self, use) -> Any:
    raise NotImplementedError

  def merge_key(self, use) -> Any:
    return None

  def concat(self, canons):
    if len(canons) != 1:
      raise NotImplementedError
    return canons[0]

  def name(self, use) -> str:
    return self.family

  def temp_bytes(self, use, b) -> int:
    """Estimated bytes per example of the rule's temporaries."""
    return 0


def size_of(aval) -> int:
  return int(np.prod(aval.shape, dtype=np.int64))
