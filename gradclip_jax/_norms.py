"""Numerics shared by every rule: accumulation dtypes, norms and the clip scale.

Everything that computes a norm in gradclip_jax goes through this module, so the
transforms (``gradclip_jax.clip_*``), the adaptive rules and the TensorFlow-style
functional API (``gradclip_jax.functional``) agree to the last bit.

* **Accumulation in at least float32.** A leaf is reduced in
  :func:`acc_dtype` ``= jnp.promote_types(dtype, float32)``: float16 and bfloat16
  go to float32 (a float16 gradient of magnitude 300, whose square overflows float16,
  still has a finite, correct norm), float32 stays float32, float64 stays float64
  (complex64/complex128 likewise). The cast happens inside the reduction; XLA fuses
  it, so no wide copy of the gradients is written. Scales and the clipped products
  are computed in the same dtype; every output leaf keeps its own dtype.
* **Overflow and underflow rescue.** A sum of squares overflows for entries above
  ``sqrt(max)`` (~1.8e19 in float32, ~1.3e154 in float64) and underflows to zero for
  entries below ``sqrt(tiny)``. When the plain sum ``s`` is ``+inf`` or below
  :func:`rescue_limits`' ``low``, the sum is recomputed with every entry multiplied by
  an exact power of two ``r`` (``2**-k`` after an overflow, ``2**k`` after an
  underflow; ``k = 80`` for float32, ``600`` for float64) and the norm is
  ``sqrt(sum |x r|^2) / r``: exact in the scaling, so the norm keeps the dtype's
  precision across its whole range (the idea of LAPACK's ``nrm2``). NaN entries
  give a NaN norm, an inf entry an inf norm.
* **NaN-free derivatives.** ``sqrt`` has an infinite slope at 0, so the naive
  ``jax.grad`` of a clipped zero gradient is ``0 * inf = NaN``. Roots are taken
  with the double-``where`` form (:func:`safe_root`), which gives a zero derivative
  at zero.
* **A clip scale defined everywhere.** ``min(1, c / n)`` is ``0 / 0`` for zero
  gradients with ``c = 0`` and ``inf / inf`` for ``c = inf``; :func:`clip_scale`
  returns 1 whenever ``n <= c`` and divides only when ``n > c >= 0``.
* **Few kernels for many leaves.** A global norm reduces small leaves packed together
  (:func:`pack_small_leaves`); the per-leaf rules batch same-shape leaves
  (:class:`LeafGroups`). A tree of 1,000 small leaves then compiles and runs like a
  tree of a few arrays instead of paying a kernel per leaf.

The checks of the rules' inputs are in :mod:`gradclip_jax._validate`; what only
steers one XLA backend lives in :mod:`gradclip_jax._tuning`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from gradclip_jax import _tuning
from gradclip_jax._validate import check_threshold  # noqa: F401  (dp._clipped_grad)
from gradclip_jax._validate import dtype_of
from gradclip_jax._validate import is_concrete
from gradclip_jax._validate import unit_axes

Array = jax.Array
AxisName = Optional[Union[str, Sequence[str]]]


# --------------------------------------------------------------------------- dtypes


def acc_dtype(dtype: Any) -> np.dtype:
  """The dtype a leaf of ``dtype`` is accumulated in: ``promote_types(dtype, f32)``.

  float16/bfloat16 -> float32, float32 -> float32, float64 -> float64, complex64 ->
  complex64, complex128 -> complex128 (float64 needs ``jax_enable_x64``).
  """
  return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def real_acc_dtype(dtype: Any) -> np.dtype:
  """The real dtype of a leaf's norm: float32, or float64 for 64-bit leaves."""
  acc = acc_dtype(dtype)
  return jnp.dtype(jnp.finfo(acc).dtype)


def norm_dtype(leaves: Sequence[Any]) -> np.dtype:
  """The dtype of a norm of ``leaves`` taken together: float32 at least."""
  out = jnp.dtype(jnp.float32)
  for x in leaves:
    out = jnp.promote_types(out, real_acc_dtype(dtype_of(x)))
  return out


def zero_count() -> Array:
  """A fresh int32 zero (every state counter starts here; distinct buffers)."""
  return jnp.zeros((), jnp.int32)


def zero_of(dtype: Any) -> Array:
  """A fresh scalar zero of ``dtype`` (a distinct buffer: states can be donated)."""
  return jnp.zeros((), dtype)


# ------------------------------------------------------------------------- kernels


def _abs_acc(x: Array) -> Array:
  """|x| in the real accumulation dtype (magnitude for complex leaves)."""
  return jnp.abs(x.astype(acc_dtype(x.dtype)))


def _sq_acc(x: Array) -> Array:
  """|x|^2 in the real accumulation dtype; for complex leaves re^2 + im^2."""
  x = x.astype(acc_dtype(x.dtype))
  if jnp.iscomplexobj(x):
    return jnp.square(x.real) + jnp.square(x.imag)
  return x * x



def _power_acc(x: Array, p: float) -> Array:
  """|x|^p in the accumulation dtype."""
  if p == 2.0:
    return _sq_acc(x)
  a = _abs_acc(x)
  if p == 1.0:
    return a
  # 0**p has an infinite slope for p < 1: keep the derivative at 0 finite.
  zero = a == 0
  return jnp.where(zero, 0.0, jnp.where(zero, 1.0, a) ** p)


def safe_root(s: Array, p: float) -> Array:
  """``s ** (1/p)`` with a zero (not NaN) derivative at ``s = 0``."""
  if p == 1.0:
    return s
  # Only an exact zero is special-cased: NaN and inf must come through unchanged.
  zero = s == 0
  safe = jnp.where(zero, 1.0, s)
  root = jnp.sqrt(safe) if p == 2.0 else safe ** (1.0 / p)
  return jnp.where(zero, jnp.zeros_like(s), root)


def _psum(x: Array, axis_name: AxisName) -> Array:
  return x if axis_name is None else lax.psum(x, axis_name)


def _pmax(x: Array, axis_name: AxisName) -> Array:
  return x if axis_name is None else lax.pmax(x, axis_name)


def stacked_sum(scalars: Sequence[Array], dtype: Any = jnp.float32) -> Array:
  """Sum of scalars as one stacked reduction, in ``dtype`` (0 for none).

  One reduction, never a Python chain of ``+``: XLA would copy the whole chain into
  every consumer's fusion (compile time quadratic in the leaf count).
  """
  if not scalars:
    return jnp.zeros((), dtype)
  return jnp.sum(jnp.stack([jnp.asarray(s, dtype) for s in scalars]))


def stacked_any(flags: Sequence[Array]) -> Array:
  """``any`` of boolean arrays as one stacked reduction (see :func:`stacked_sum`)."""
  flags = [jnp.any(f) for f in flags]
  return jnp.any(jnp.stack(flags)) if flags else jnp.zeros((), bool)


def stacked_max(values: Sequence[Array], dtype: Any = jnp.float32) -> Array:
  """max over arrays (>= 0 values) as one stacked reduction; 0 for none."""
  ms = [jnp.max(jnp.asarray(v, dtype), initial=0.0) for v in values]
  return jnp.max(jnp.stack(ms + [jnp.zeros((), dtype)]))


def tree_max_abs(leaves: Sequence[Array], axis_name: AxisName = None) -> Array:
  """max |x| over all leaves (and devices) in :func:`norm_dtype`; 0 for none."""
  dtype = norm_dtype(leaves)
  m = stacked_max([_abs_acc(x) for x in leaves], dtype)
  return _pmax(m, axis_name)


def rescue_limits(dtype: Any) -> tuple:
  """``(low, r)`` of the over/underflow rescue for sums of squares in ``dtype``.

  A sum ``s`` of squares is rescued when ``s = +inf`` (recomputed with every entry
  times ``r``) or ``s < low`` (times ``1/r``). ``r = 2**-k`` is an exact power of two
  (``k = 80`` for float32, ``600`` for float64): the largest finite entry times ``r``
  squares to far below the maximum, and an entry small enough to vanish from the
  rescued sum adds less than a relative ``1e-25`` to it. ``low = tiny / eps**2``:
  above it the entries lost to underflow are negligible.
  """
  dtype = jnp.dtype(dtype)
  info = jnp.finfo(dtype)
  k = 600 if dtype == jnp.float64 else 80
  low = float(info.tiny) / float(info.eps) ** 2
  return low, 2.0 ** -k


def _opaque_factors(dtype: Any) -> tuple:
  """``(r, 1 / r)`` of :func:`rescue_limits` in ``dtype``, as values XLA cannot fold.

  With constant factors XLA's algebraic simplifier rewrites ``(x r) * (x r)`` as
  ``(x * x) * r**2``, and ``r**2`` (``2**-160`` in float32) is 0, or ``inf`` for
  ``1 / r``: the very overflow and underflow the factors are there to avoid. Passed
  through an optimization barrier, they are scalars XLA cannot see into (and still
  fuses into the reductions).
  """
  _, down = rescue_limits(dtype)
  return tuple(lax.optimization_barrier((jnp.asarray(down, dtype),
                                         jnp.asarray(1.0 / down, dtype))))


def rescue_sums(x: Array, p: float, dtype: Any, axes=None, keepdims=False) -> list:
  """``[s, t_over]`` (``p = 1``) or ``[s, t_over, t_under]`` (``p = 2``) of ``x``.

  ``s = sum |x|^p`` in ``x``'s accumulation dtype; ``t_over = sum |x r|^p`` and
  ``t_under = sum |clip(x, -1, 1) / r|^p`` in ``dtype`` (the norm's), with ``r`` of
  :func:`rescue_limits`: the plain sum and the two rescued ones (see
  :func:`rescued_root`). They are sibling reductions of the same entries, which XLA
  fuses into one kernel that reads ``x`` once (on GPU, for sums that keep the minor
  axis, with the help of :func:`gradclip_jax._tuning.gpu_column_pairs`), and whose
  partial sums a sharded program combines in one all-reduce. The clip keeps
  ``x / r`` finite for every finite ``x`` (the underflow sum is only used when every
  entry is below ``sqrt(low)``, far below 1, where the clip changes nothing), so the
  derivative of a norm that does not use ``t_under`` stays finite.
  """
  down, up = _opaque_factors(dtype)
  w = x.astype(_wide(x, dtype))
  terms = [_power_acc(x, p), _power_acc(w * down, p)]
  if p != 1.0:
    if jnp.iscomplexobj(w):
      small = lax.complex(jnp.clip(w.real, -1.0, 1.0), jnp.clip(w.imag, -1.0, 1.0))
    else:
      small = jnp.clip(w, -1.0, 1.0)
    terms.append(_power_acc(small * up, p))
  axes = tuple(range(x.ndim)) if axes is None else tuple(axes)

  def plain(terms):
    return [jnp.sum(t, axis=axes) for t in terms]

  minor_kept = x.ndim >= 2 and x.ndim - 1 not in axes
  sums = _tuning.gpu_column_pairs(terms, axes, plain) if minor_kept else plain(terms)
  if keepdims:
    kept = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    sums = [jnp.reshape(t, kept) for t in sums]
  return sums


def needs_rescue(s: Array, p: float) -> Array:
  """Whether a plain sum ``s`` of ``|x|^p`` over- or (``p = 2``) underflowed."""
  over = jnp.isposinf(s)
  if p == 1.0:  # a sum of |x| cannot lose entries to underflow that matter
    return over
  low, _ = rescue_limits(s.dtype)
  return over | (s < low)


def rescue_factor(s: Array, p: float) -> tuple:
  """(needs rescue, ``r``) for plain sums ``s``: ``r`` of the rescue each one needs.

  ``r`` is :func:`rescue_limits`' factor where ``s`` overflowed, its inverse where it
  underflowed (``p = 2``), 1 elsewhere: the factor of a second pass
  (:func:`scaled_sum`) that computes only the rescued sums that are used, as the CPU
  form does after an over- or underflow (:func:`gradclip_jax._tuning.overflow_cond`).
  """
  low, down = rescue_limits(s.dtype)
  over = jnp.isposinf(s)
  one = jnp.ones((), s.dtype)
  if p == 1.0:
    return over, jnp.where(over, jnp.asarray(down, s.dtype), one)
  under = s < low
  r = jnp.where(over, jnp.asarray(down, s.dtype),
                jnp.where(under, jnp.asarray(1.0 / down, s.dtype), one))
  return over | under, r


def scaled_sum(x: Array, r: Array, p: float, dtype, axes=None, keepdims=False) -> Array:
  """``sum |x r|^p`` in ``dtype`` (``r`` from :func:`rescue_factor`; broadcasts).

  Where ``r`` is used it gives the same terms, bit for bit, as the matching rescued
  sum of :func:`rescue_sums` (the clip there changes no entry of an underflowed sum).
  """
  return jnp.sum(_power_acc(x.astype(_wide(x, dtype)) * r, p), axis=axes,
                 keepdims=keepdims)


def rescued_root(sums: Sequence[Array], p: float) -> Array:
  """The Lp norm from :func:`rescue_sums`' sums: the plain root, or a rescued one.

  ``root(t_over) / r`` where ``s`` overflowed, ``root(t_under) * r`` where it
  underflowed (``p = 2``), ``root(s)`` elsewhere; ``r`` is an exact power of two, so
  the rescaling is exact. Broadcasts (one choice per entry of per-unit sums).
  """
  s, t_over = sums[0], sums[1]
  dtype = t_over.dtype
  _, down = rescue_limits(dtype)
  s = s.astype(dtype)
  norm = jnp.where(jnp.isposinf(s), safe_root(t_over, p) / down, safe_root(s, p))
  if p != 1.0:
    low, _ = rescue_limits(dtype)
    norm = jnp.where(s < low, safe_root(sums[2], p) * down, norm)
  return norm


def _wide(x: Array, real_dtype) -> Any:
  """The dtype ``x`` is promoted to for arithmetic with a ``real_dtype`` scalar."""
  return jnp.promote_types(acc_dtype(x.dtype), real_dtype)


def _scaled_norm(leaves, p, axis_name, power=None, root=None):
  """The overflow-free Lp norm for any ``p``: each leaf scaled by its own max.

  Leaf ``i`` gives ``m_i = max |x|`` and ``t_i = sum |x / m_i|^p`` (no overflow, as
  every term is <= 1); with ``m = max_i m_i`` the norm is
  ``m * (sum_i (m_i / m)^p t_i)^(1/p)``. Each leaf is scaled by its *own* maximum so
  that no leaf's reduction depends on all the others (dividing every leaf by one
  global maximum made XLA's compile time grow quadratically with the leaf count).
  ``power``/``root`` default to the static-``p`` kernels; a traced ``p`` passes
  generic ones.
  """
  power = power or _power_acc
  root = root or safe_root
  dtype = norm_dtype(leaves)
  ms = [jnp.max(_abs_acc(x), initial=0.0).astype(dtype) for x in leaves]
  ts = [jnp.sum(power(_abs_acc(x).astype(dtype) / jnp.where(m_i > 0, m_i, 1.0), p))
        for x, m_i in zip(leaves, ms)]
  ms, ts = jnp.stack(ms), jnp.stack(ts)
  m = _pmax(jnp.max(ms), axis_name)
  finite = jnp.isfinite(m) & (m > 0)
  m_safe = jnp.where(finite, m, 1.0)
  norm = m_safe * root(_psum(jnp.sum(power(ms / m_safe, p) * ts), axis_name), p)
  # With an infinite (or NaN) entry the norm is that entry; with all zeros it is 0.
  return jnp.where(finite, norm, jnp.where(m > 0, m, norm))


# Leaves of at most _PACK_LEAF entries are packed, per dtype, into flat chunks of at
# most _PACK_CHUNK entries before a global reduction (see pack_small_leaves).
_PACK_LEAF = 1 << 16
_PACK_CHUNK = 1 << 22


def pack_small_leaves(leaves: Sequence[Array]) -> list:
  """The leaves with the small ones concatenated (flat, per dtype) into a few chunks.

  A global norm only depends on the multiset of entries, so any regrouping of the
  tree gives the same norm. Packing matters for trees of many small leaves: a
  reduction per leaf is a kernel per leaf, and with 1,000 leaves the clip + adam step
  compiled in 10.7 s and ran in 25 ms, against 6.2 s and 15 ms with the small leaves
  packed (measured on a 2-core CPU). Copying the small leaves costs at most
  ``_PACK_CHUNK`` entries per chunk; leaves above ``_PACK_LEAF`` entries are reduced
  in place.
  """
  out, chunks = [], {}
  for x in leaves:
    if x.size > _PACK_LEAF:
      out.append(x)
      continue
    group = chunks.setdefault(jnp.dtype(x.dtype), [[0]])  # [size, leaves...]
    if len(group[-1]) > 1 and group[-1][0] + x.size > _PACK_CHUNK:
      group.append([0])
    group[-1][0] += x.size
    group[-1].append(x)
  for group in chunks.values():
    for _, *chunk in group:
      out.append(chunk[0] if len(chunk) == 1 else
                 jnp.concatenate([jnp.ravel(y) for y in chunk]))
  return out


def tree_norm(leaves: Sequence[Array], p: float = 2.0,
              axis_name: AxisName = None) -> Array:
  """The Lp norm of the concatenation of ``leaves`` (and of every device's slice).

  In :func:`norm_dtype` (float32, or float64 if a leaf is 64-bit); NaN when an entry
  is NaN, inf when one is inf. ``axis_name`` sums the per-device partial sums with
  ``psum`` (``pmax`` for ``p = inf``), for use inside ``shard_map``/``pmap``. Small
  leaves are reduced together (:func:`pack_small_leaves`). For ``p`` 1 and 2 the sum
  is rescued from over- and underflow (module docstring); other ``p`` are always
  computed in the max-scaled form.
  """
  leaves = pack_small_leaves([jnp.asarray(x) for x in leaves])
  dtype = norm_dtype(leaves)
  if not leaves:
    return jnp.zeros((), dtype)
  if not is_concrete(p):
    return _tree_norm_traced_p(leaves, p, axis_name)
  if p == math.inf:
    return tree_max_abs(leaves, axis_name)
  if p not in (1.0, 2.0):
    # |x|^p over- or underflows for moderate x when p is large: always rescale.
    return _scaled_norm(leaves, p, axis_name)

  def one_pass(leaves):
    sums = [rescue_sums(x, p, dtype) for x in leaves]
    totals = jnp.stack([stacked_sum([s[i] for s in sums], dtype)
                        for i in range(len(sums[0]))])
    return rescued_root(list(_psum(totals, axis_name)), p)

  def plain_sum(leaves):
    s = stacked_sum([jnp.sum(_power_acc(x, p)) for x in leaves], dtype)
    return _psum(s, axis_name)

  def rescue(leaves, s):
    needs, r = rescue_factor(s, p)
    t = _psum(stacked_sum([scaled_sum(x, r, p, dtype) for x in leaves], dtype),
              axis_name)
    return jnp.where(needs, safe_root(t, p) / r, safe_root(s, p))

  return _tuning.overflow_cond(
      plain_sum, lambda s: needs_rescue(s, p), lambda s: safe_root(s, p), rescue,
      one_pass, leaves)


def _tree_norm_traced_p(leaves, p, axis_name):
  """:func:`tree_norm` for a ``p`` known only at run time: one branch runs."""
  dtype = norm_dtype(leaves)
  p = jnp.asarray(p, dtype)
  index = jnp.select([p == 2, p == 1, jnp.isposinf(p)], [0, 1, 2], 3)
  branches = [lambda: tree_norm(leaves, 2.0, axis_name),
              lambda: tree_norm(leaves, 1.0, axis_name),
              lambda: tree_norm(leaves, math.inf, axis_name),
              lambda: _scaled_norm_p(leaves, p, axis_name)]
  norm = lax.switch(index, branches)
  return jnp.where(p > 0, norm, jnp.nan)  # an invalid traced p is signalled, not hidden


def _scaled_norm_p(leaves, p, axis_name):
  """The rescaled Lp norm for a traced ``p`` (see :func:`_scaled_norm`)."""

  def power(a, p):
    zero = a == 0
    return jnp.where(zero, 0.0, jnp.where(zero, 1.0, a) ** p)

  def root(s, p):
    return power(s, 1.0 / p)

  return _scaled_norm(leaves, p, axis_name, power, root)


class LeafGroups:
  """The leaves of a tree batched by shape, dtype and reduction axes.

  The per-leaf rules (:func:`gradclip_jax.clip_by_norm`, AGC, AdaGC) compute a norm
  and a scale per leaf. Done leaf by leaf, a tree of many small leaves becomes a
  reduction kernel and a scale kernel per leaf, and XLA's compile time grows faster
  than the leaf count (1,000 leaves: a clip_by_norm + adam step took 38 s to compile
  and adaptive_grad_clip + adam 297 s on a 2-core CPU). Instead, the small leaves of
  one shape, dtype and reduction axes are stacked into one array (a cheap copy: at
  most ``_PACK_LEAF`` entries per leaf), the norms and scales are computed once per
  group, and only the final multiply is per leaf. A large leaf is a group of its own
  (``x[None]``, no copy).

  Group ``j`` holds the leaves ``members[j]``; arrays "per group" have a leading
  axis of ``len(members[j])``.
  """

  def __init__(self, leaves: Sequence[Array], axes: Optional[Sequence[Any]] = None):
    leaves = list(leaves)
    axes = [None] * len(leaves) if axes is None else list(axes)
    self.size = len(leaves)
    self.members, self._axes, self._ndims = [], [], []
    index = {}
    for i, (x, a) in enumerate(zip(leaves, axes)):
      a = unit_axes(a, x.ndim)
      key = (x.shape, jnp.dtype(x.dtype), a)
      if x.size <= _PACK_LEAF and key in index:
        self.members[index[key]].append(i)
        continue
      if x.size <= _PACK_LEAF:
        index[key] = len(self.members)
      self.members.append([i])
      self._axes.append(a)
      self._ndims.append(x.ndim)

  def reduce_axes(self, j: int) -> tuple:
    """The axes of group ``j``'s stacked array that one leaf's reduction covers."""
    a = self._axes[j]
    return tuple(range(1, self._ndims[j] + 1)) if a is None else tuple(
        i + 1 for i in a)

  def stack(self, per_leaf: Sequence[Any]) -> list:
    """Per-leaf values (same shape within a group) -> one array per group."""
    return [jnp.asarray(per_leaf[m[0]])[None] if len(m) == 1 else
            jnp.stack([jnp.asarray(per_leaf[i]) for i in m]) for m in self.members]

  def unstack(self, per_group: Sequence[Array]) -> list:
    """Inverse of :meth:`stack`: one value per leaf."""
    out = [None] * self.size
    for m, g in zip(self.members, per_group):
      for k, i in enumerate(m):
        out[i] = g[k]
    return out

  def norms(self, stacked: Sequence[Array]) -> list:
    """L2 norm of every leaf (or unit) of every group, keepdims, rescued.

    Each group's norms are in its leaves' real accumulation dtype. The plain and
    the rescued sums are one reduction per group (:func:`rescue_sums`); on CPU one
    rescue decision covers every group (:func:`gradclip_jax._tuning.overflow_cond`).
    """
    stacked = list(stacked)
    if not stacked:
      return []
    axes = [self.reduce_axes(j) for j in range(len(stacked))]

    def one_pass(stacked):
      return [rescued_root(rescue_sums(x, 2.0, real_acc_dtype(x.dtype), a,
                                       keepdims=True), 2.0)
              for x, a in zip(stacked, axes)]

    def plain_sums(stacked):
      return [jnp.sum(_sq_acc(x), axis=a, keepdims=True) for x, a in zip(stacked, axes)]

    def rescue(stacked, sums):
      out = []
      for x, a, s in zip(stacked, axes, sums):
        needs, r = rescue_factor(s, 2.0)
        t = scaled_sum(x, r, 2.0, s.dtype, a, keepdims=True)
        out.append(jnp.where(needs, safe_root(t, 2.0) / r, safe_root(s, 2.0)))
      return out

    return _tuning.overflow_cond(
        plain_sums, lambda sums: stacked_any([needs_rescue(s, 2.0) for s in sums]),
        lambda sums: [safe_root(s, 2.0) for s in sums], rescue, one_pass, stacked)

  def scale(self, leaves: Sequence[Array], scales: Sequence[Array]) -> list:
    """:func:`scale_leaves` of every leaf by its entry of its group's ``scales``."""
    return scale_leaves(leaves, scales, split=self.unstack)


def leaf_norms(leaves: Sequence[Array], axes: Sequence[Any]) -> list:
  """L2 norm of each leaf over its ``axes`` (all axes when None), keepdims.

  ``axes`` holds one entry per leaf; each norm is in its leaf's real accumulation
  dtype (:func:`real_acc_dtype`). Computed per :class:`LeafGroups` group.
  """
  groups = LeafGroups(leaves, axes)
  return groups.unstack(groups.norms(groups.stack(list(leaves))))


def leaf_norm(x: Array, axes=None) -> Array:
  """L2 norm of one leaf over ``axes`` (see :func:`leaf_norms`), keepdims."""
  return leaf_norms([x], [axes])[0]


def clip_scale(norm: Array, max_norm: Any) -> Array:
  """``min(1, max_norm / norm)`` in ``norm``'s dtype, defined for every input.

  1 when ``norm <= max_norm`` (zero gradients with ``max_norm = 0``, an infinite
  norm under ``max_norm = inf``), ``max_norm / norm`` when ``norm > max_norm``, NaN
  when ``norm`` is NaN. The division only ever sees ``norm > 0``, so the derivative
  with respect to both the gradients and ``max_norm`` is finite. A negative (traced)
  ``max_norm`` counts as 0.
  """
  norm = jnp.asarray(norm)
  max_norm = jnp.maximum(jnp.asarray(max_norm, norm.dtype), 0.0)
  clipped = norm > max_norm
  denom = jnp.where(clipped, norm, 1.0)
  scale = jnp.where(clipped, max_norm / denom, 1.0)
  return jnp.where(jnp.isnan(norm), jnp.nan, scale).astype(norm.dtype)


def apply_scale(x: Array, scale: Array) -> Array:
  """``x * scale`` computed in the accumulation dtype, returned in ``x``'s dtype.

  Written as ``where(scale != 1, x * scale, x)``: entries whose scale is exactly 1
  are passed through untouched (bit for bit the same as multiplying by 1), and when
  no clipping happens XLA's select on a donated buffer costs less than a multiply. A
  NaN scale still reaches every entry.
  """
  scale = jnp.asarray(scale)
  wide = _wide(x, scale.dtype)
  return jnp.where(scale != 1, (x.astype(wide) * scale).astype(x.dtype), x)


def scale_leaves(leaves: Sequence[Array], scales: Any, split=None) -> list:
  """``[apply_scale(x, s) ...]`` for one scale per leaf (or one ``scales`` for all).

  ``split``, if given, turns ``scales`` into the per-leaf scales (used by
  :meth:`LeafGroups.scale`). The backend tuning may route the scales and leaves
  through an optimization barrier first (:func:`gradclip_jax._tuning.scale_barrier`).
  """
  leaves = list(leaves)
  if not leaves:
    return []
  if not isinstance(scales, (list, tuple)):
    scales = [scales] * len(leaves)
  scales, leaves = _tuning.scale_barrier(list(scales), leaves)
  if split is not None:
    scales = split(scales)
  return [apply_scale(x, s) for x, s in zip(leaves, _tuning.unit_scales_once(scales))]


def leaves_of(tree: Any) -> list:
  """The non-None leaves of a tree (``None`` entries pass through, as in TF)."""
  return jax.tree.leaves(tree)
