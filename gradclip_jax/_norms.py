"""Numerics shared by every rule: float32 norms, the clip scale, input checks.

Everything that computes a norm in gradclip_jax goes through this module, so the
transforms (``gradclip_jax.clip_*``), the adaptive rules and the TensorFlow-style
functional API (``gradclip_jax.functional``) agree to the last bit.

Design points, each one a place where the usual implementations go wrong:

* **float32 accumulation.** Every leaf is upcast to float32 (complex64 for complex
  leaves) *inside* the reduction, so a float16 gradient of magnitude 300 (whose
  square, 9e4, overflows float16) still has a finite, correct norm. XLA fuses the
  cast into the reduction: no float32 copy of the gradients is ever written.
* **No silent float32 overflow either.** bfloat16 and float32 share float32's range,
  so the sum of squares of values above ~1.8e19 overflows. When the plain sum comes
  out infinite although the largest entry is finite, the norm is recomputed in a
  scaled form ``m * ||x / m||`` (``m = max |x|``), as LAPACK's ``nrm2`` does. How
  the rescue runs depends on the backend (:func:`overflow_guarded`): on CPU under a
  ``lax.cond``, so the common path pays nothing for it; on GPU/TPU as a second
  accumulator in the same pass over the data, with no ``cond`` (measured there in
  :func:`overflow_guarded`).
* **NaN-free derivatives.** ``sqrt`` has an infinite slope at 0, so the naive
  ``jax.grad`` of a clipped zero gradient is ``0 * inf = NaN``. Roots are taken
  with the double-``where`` form, which gives a zero derivative at zero.
* **A clip scale defined everywhere.** ``min(1, c / n)`` is ``0 / 0`` for zero
  gradients with ``c = 0`` and ``inf / inf`` for ``c = inf``; :func:`clip_scale`
  returns 1 whenever ``n <= c`` and divides only when ``n > c >= 0``.
* **Few kernels for many leaves.** A global norm reduces small leaves packed together
  (:func:`pack_small_leaves`); the per-leaf rules batch same-shape leaves
  (:class:`LeafGroups`). A tree of 1,000 small leaves then compiles and runs like a
  tree of a few arrays instead of paying a kernel per leaf.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Optional, Sequence, Union

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
AxisName = Optional[Union[str, Sequence[str]]]


# --------------------------------------------------------------------------- checks


def _leaf_paths(tree: Any):
  """(path string, leaf) for every non-None leaf of ``tree``."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path) or "<root>", leaf) for path, leaf in flat]


def check_gradient_tree(tree: Any, what: str = "gradient") -> None:
  """Raises ``TypeError`` naming the first leaf that is not floating or complex.

  Integer and boolean arrays have no meaningful norm-preserving rescaling (and
  ``jax.grad`` never produces them: it gives ``float0``), so they are refused.
  """
  for path, leaf in _leaf_paths(tree):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      dtype = np.asarray(leaf).dtype
    if not (jnp.issubdtype(dtype, jnp.floating)
            or jnp.issubdtype(dtype, jnp.complexfloating)):
      raise TypeError(
          f"{what} leaf {path} has dtype {dtype}; gradient clipping needs "
          "floating-point or complex leaves (integer/boolean leaves usually mean "
          "a non-trainable array slipped into the tree: mask it out with "
          "optax.masked or drop it).")


def is_concrete(x: Any) -> bool:
  """True when ``x`` holds a value known now (not a tracer inside jit/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_threshold(name: str, value: Any, *, allow_inf: bool = True) -> None:
  """``ValueError`` for a negative or NaN threshold known at build time.

  ``value`` may be a Python number, a NumPy/JAX scalar or a pytree of them (per-leaf
  thresholds). Traced values (``optax.inject_hyperparams`` under ``jit``) cannot be
  inspected; the rules clamp them at zero instead.
  """
  for path, leaf in _leaf_paths(value):
    if not is_concrete(leaf):
      continue
    arr = np.asarray(leaf)
    if not (jnp.issubdtype(arr.dtype, jnp.number) or arr.dtype == np.bool_):
      raise TypeError(f"{name}{'' if path == '<root>' else path} must be a number, "
                      f"got {type(leaf).__name__}")
    label = name if path == "<root>" else f"{name}{path}"
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
      arr = arr.astype(np.float32)  # bfloat16 & co. (ml_dtypes): numpy has no isnan
    if np.any(np.isnan(arr)):
      raise ValueError(f"{label} is NaN; a clipping threshold must be a number >= 0")
    if np.any(arr < 0):
      raise ValueError(f"{label} = {arr.tolist()} is negative; a clipping threshold "
                       "must be >= 0")
    if not allow_inf and np.any(np.isinf(arr)):
      raise ValueError(f"{label} must be finite, got {arr.tolist()}")


def check_norm_type(norm_type: Any) -> float:
  """Validates ``p`` of an Lp norm (``p > 0`` or ``inf``) and returns it as float.

  A traced ``p`` (``optax.inject_hyperparams`` makes every numeric argument a
  hyperparameter, defaults included) is returned as is: :func:`tree_norm` then picks
  the kernel at run time.
  """
  if not is_concrete(norm_type):
    return norm_type
  if not isinstance(norm_type, numbers.Real) or isinstance(norm_type, bool):
    try:
      norm_type = float(np.asarray(norm_type))
    except (TypeError, ValueError) as e:
      raise TypeError(f"norm_type must be a real number > 0 or inf, got "
                      f"{norm_type!r}") from e
  p = float(norm_type)
  if math.isnan(p) or p <= 0:
    raise ValueError(f"norm_type must be > 0 (1, 2, any p > 0, or inf), got {p}")
  return p


def is_scalar_threshold(value: Any) -> bool:
  """Whether a threshold is one number for all leaves (vs a per-leaf pytree)."""
  if isinstance(value, numbers.Number):
    return True
  return hasattr(value, "shape") and np.ndim(value) == 0


def broadcast_thresholds(name: str, value: Any, tree: Any) -> Any:
  """A threshold per leaf of ``tree``: a scalar is repeated, a pytree is checked.

  Raises ``ValueError`` when a per-leaf threshold tree does not have the structure of
  the gradient tree (``None`` gradient leaves are skipped on both sides).
  """
  structure = jax.tree.structure(tree)
  if is_scalar_threshold(value):
    return jax.tree.unflatten(structure, [value] * structure.num_leaves)
  try:
    return jax.tree.map(lambda _, v: v, tree, value)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{name} is a pytree of per-leaf thresholds whose structure does not match "
        f"the gradients:\n  gradients: {structure}\n  {name}: "
        f"{jax.tree.structure(value)}") from e


# ------------------------------------------------------------------------- kernels


def _abs_f32(x: Array) -> Array:
  """|x| in float32 (complex64's magnitude for complex leaves)."""
  if jnp.iscomplexobj(x):
    return jnp.abs(x.astype(jnp.complex64))
  return jnp.abs(x.astype(jnp.float32))


def _sq_f32(x: Array) -> Array:
  """|x|^2 in float32; for complex leaves re^2 + im^2, without a square root."""
  if jnp.iscomplexobj(x):
    x = x.astype(jnp.complex64)
    return jnp.square(x.real) + jnp.square(x.imag)
  x = x.astype(jnp.float32)
  return x * x


def _power_f32(x: Array, p: float) -> Array:
  """|x|^p in float32."""
  if p == 2.0:
    return _sq_f32(x)
  a = _abs_f32(x)
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


def _max_abs(x: Array, axes=None, keepdims=False) -> Array:
  """max |x| in float32; 0 for an empty array (|x| >= 0, so ``initial`` is neutral)."""
  return jnp.max(_abs_f32(x), axis=axes, keepdims=keepdims, initial=0.0)


def _power_sum(x: Array, p: float, axes=None, keepdims=False) -> Array:
  return jnp.sum(_power_f32(x, p), axis=axes, keepdims=keepdims)


def _two_sums(x: Array, p: float, axes=None, keepdims=False) -> tuple:
  """``(sum |x|^p, sum |x * 2^-64|^p)`` in float32, as one reduction.

  The plain sum and the overflow-free scaled one (see :func:`overflow_guarded`) are
  the real and imaginary parts of one complex64 sum, which adds them componentwise:
  the same float32 sums, in one reduction that reads ``x`` once. Two separate
  reductions of ``x`` are at XLA:GPU's mercy: for some column reductions (unit
  norms over axis 0 of a ``[3072, 1024]`` or ``[4096, 1024]`` leaf) it wrote the
  scaled squares to memory from the first reduction's kernel and read them back in a
  second, a full extra write and read of the leaf in float32. With the complex sum,
  AGC's compiled H100 program moves the least traffic its formula allows
  (``benchmarks/gpu_traffic.py``).
  """
  z = jnp.sum(lax.complex(_power_f32(x, p), _power_f32(_abs_f32(x) * _RESCUE_DOWN, p)),
              axis=axes, keepdims=keepdims)
  return jnp.real(z), jnp.imag(z)


def stacked_sum(scalars: Sequence[Array]) -> Array:
  """Sum of float32 scalars as one reduction (see :func:`tree_max_abs`)."""
  return jnp.sum(jnp.stack(list(scalars))) if scalars else jnp.zeros((), jnp.float32)


def tree_max_abs(leaves: Sequence[Array], axis_name: AxisName = None) -> Array:
  """max |x| over all leaves (and devices), float32; 0 for an empty tree."""
  # One stacked reduction, not a chain of maximums: XLA would otherwise copy the
  # whole chain into every consumer's fusion (compile time quadratic in leaves).
  m = jnp.max(jnp.stack([_max_abs(x) for x in leaves] + [jnp.zeros((), jnp.float32)]))
  return _pmax(m, axis_name)


def _scaled_norm(leaves, p, axis_name, power=None, root=None):
  """The overflow-free Lp norm: every leaf scaled by its own max before powering.

  Leaf ``i`` gives ``m_i = max |x|`` and ``t_i = sum |x / m_i|^p`` (no overflow, as
  every term is <= 1); with ``m = max_i m_i`` the norm is
  ``m * (sum_i (m_i / m)^p t_i)^(1/p)``. Each leaf is scaled by its *own* maximum so
  that no leaf's reduction depends on all the others: dividing every leaf by one
  global maximum made XLA's compile time grow quadratically with the leaf count.
  ``power``/``root`` default to the static-``p`` kernels; a traced ``p`` passes
  generic ones.
  """
  power = power or _power_f32
  root = root or safe_root
  ms = [_max_abs(x) for x in leaves]
  ts = [jnp.sum(power(_abs_f32(x) / jnp.where(m_i > 0, m_i, 1.0), p))
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
  packed (and 8.6 s / 18.7 ms for ``optax.clip_by_global_norm``; measured on the
  2-core CPU). Copying the small leaves costs at most ``_PACK_CHUNK`` entries per
  chunk; leaves above ``_PACK_LEAF`` entries are reduced in place as before.
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

  float32 whatever the leaf dtypes; NaN when an entry is NaN, inf when one is inf.
  ``axis_name`` sums the per-device partial sums with ``psum`` (``pmax`` for
  ``p = inf``), for use inside ``shard_map``/``pmap``. Small leaves are reduced
  together (:func:`pack_small_leaves`).
  """
  leaves = pack_small_leaves([jnp.asarray(x) for x in leaves])
  if not leaves:
    return jnp.zeros((), jnp.float32)
  if not is_concrete(p):
    return _tree_norm_traced_p(leaves, p, axis_name)
  if p == math.inf:
    return tree_max_abs(leaves, axis_name)
  if p not in (1.0, 2.0):
    # |x|^p over- or underflows for moderate x when p is large: always rescale.
    return _scaled_norm(leaves, p, axis_name)
  # An infinite sum from finite entries is float32 overflow: redo it scaled. (A NaN
  # sum means a NaN entry; an inf entry comes back as inf from the scaled form.)
  return overflow_guarded(leaves, *_global_branches(p, _hashable(axis_name)))


def overflow_guarded(leaves: Sequence[Array], checked, fused):
  """``checked(leaves)`` on CPU, ``fused(leaves)`` on every other backend.

  Both compute a norm with its float32-overflow rescue. ``checked`` reduces once and
  reruns the reduction scaled under a ``lax.cond`` only after an overflow: on CPU the
  extra accumulator of ``fused`` doubles the time of a bfloat16 norm, and the
  ``cond`` is free. ``fused`` reduces the plain and the scaled sums in the same pass
  and selects, with no ``cond`` to hand the predicate back to the host. On an H100
  the standalone clip cost the same either way, and the f32 clip + adam step was
  1.28-1.32x adam alone with ``fused`` against 1.39-1.40x with the ``cond``
  (``benchmarks/variants/``). Only the branch of the backend being compiled for is
  lowered (``lax.platform_dependent``).
  """
  return lax.platform_dependent(leaves, cpu=checked, default=fused)


def _hashable(x):
  return tuple(x) if isinstance(x, list) else x


# Rescue scaling of the overflow branches: an exact power of two, so ``x * 2**-64`` and
# the final ``* 2**64`` are exact. A sum of squares only overflows float32 when it
# exceeds ~3.4e38; the entries whose scaled squares then underflow (|x| < ~2) add
# less than a relative 1e-29 per entry to it, so one scaled pass recovers the norm
# without the max pass of :func:`_scaled_norm` (half the code for XLA to compile).
_RESCUE_DOWN = 2.0 ** -64
_RESCUE_UP = 2.0 ** 64


# The branches of the overflow checks are module-level and cached per static
# argument: lax.cond then traces them once, also outside jit (closures over the
# arrays would be traced again at every eager call).
@functools.lru_cache(maxsize=None)
def _global_branches(p, axis_name):
  """(checked, fused) global Lp norms, p in (1, 2); see :func:`overflow_guarded`."""

  def checked(leaves):
    s = _psum(stacked_sum([_power_sum(x, p) for x in leaves]), axis_name)
    return lax.cond(jnp.isposinf(s), rescue, plain, leaves, s)

  def fused(leaves):
    pairs = [_two_sums(x, p) for x in leaves]
    s = stacked_sum([s for s, _ in pairs])
    t = stacked_sum([t for _, t in pairs])
    s, t = _psum(jnp.stack([s, t]), axis_name)
    return jnp.where(jnp.isposinf(s), _RESCUE_UP * safe_root(t, p), safe_root(s, p))

  def rescue(leaves, s):
    # Runs only after an overflow: the sum again with every entry scaled by an exact
    # power of two (see _RESCUE_DOWN), over one flat copy of the tree. One reduction
    # keeps this branch cheap for XLA to compile: with 1,000 leaves, a reduction per
    # leaf here compiled 30% slower (18 s against 14 s, measured with the clip + adam
    # step of benchmarks/run.py on a busy 2-core CPU), and the flat form's one scan
    # replaces the max pass of _scaled_norm.
    del s
    flat = jnp.concatenate([jnp.ravel(_abs_f32(x) * _RESCUE_DOWN) for x in leaves])
    return _RESCUE_UP * safe_root(_psum(_power_sum(flat, p), axis_name), p)

  def plain(leaves, s):
    del leaves
    return safe_root(s, p)

  return checked, fused


def _tree_norm_traced_p(leaves, p, axis_name):
  """:func:`tree_norm` for a ``p`` known only at run time: one branch runs."""
  p = jnp.asarray(p, jnp.float32)
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


def _normalize_axes(axes: Any, ndim: int) -> Optional[tuple]:
  """``axes`` as a sorted tuple of non-negative ints, or None for all axes."""
  if axes is None:
    return None
  axes = (axes,) if isinstance(axes, (numbers.Integral, np.integer)) else axes
  out = []
  for a in axes:
    a = int(a)
    if not -ndim <= a < ndim:
      raise ValueError(f"axis {a} is out of range for a leaf of rank {ndim}")
    out.append(a % ndim)
  return tuple(sorted(set(out)))


class LeafGroups:
  """The leaves of a tree batched by shape, dtype and reduction axes.

  The per-leaf rules (:func:`gradclip_jax.clip_by_norm`, AGC, AdaGC) compute a norm
  and a scale per leaf. Done leaf by leaf, a tree of many small leaves becomes a
  reduction kernel and a scale kernel per leaf, and XLA's compile time grows faster
  than the leaf count: with 1,000 leaves a clip_by_norm + adam step took 38 s to
  compile and adaptive_grad_clip + adam 297 s (benchmarks/clip_overhead.py on the
  2-core CPU). Instead, the small leaves of one shape, dtype and reduction axes are
  stacked into one array (a cheap copy: at most ``_PACK_LEAF`` entries per leaf),
  the norms and scales are computed once per group, and only the final multiply is
  per leaf. A large leaf is a group of its own (``x[None]``, no copy).

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
      a = _normalize_axes(a, x.ndim)
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
    """L2 norm of every leaf of every group (keepdims), float32; see leaf_norms."""
    stacked = list(stacked)
    if not stacked:
      return []
    axes = tuple(self.reduce_axes(j) for j in range(len(stacked)))
    return overflow_guarded(stacked, *_leaf_branches(axes))

  def scale(self, leaves: Sequence[Array], scales: Sequence[Array]) -> list:
    """:func:`scale_leaves` of every leaf by its entry of its group's ``scales``.

    The group scales pass the barrier whole and are sliced after it, where XLA:GPU
    fuses each leaf's slice into that leaf's multiply. Sliced before the barrier,
    every slice was a kernel of its own on the GPU (1,000 leaves: 1,000 more
    launches, ``benchmarks/gpu_traffic.py``); XLA:CPU compiles the same kernels
    either way. Known cost on CPU: the slice index makes every leaf's kernel unique,
    and XLA:CPU compiles unique kernels one by one (~8 ms each).
    """
    return scale_leaves(leaves, scales, split=self.unstack)


def leaf_norms(leaves: Sequence[Array], axes: Sequence[Any]) -> list:
  """L2 norm of each leaf over its ``axes`` (all axes when None), keepdims, float32.

  ``axes`` holds one entry per leaf. Computed per :class:`LeafGroups` group, with one
  overflow check for all leaves: on CPU, if any sum of squares is infinite, every
  group is recomputed in scaled form under a single ``lax.cond``, so compile time does
  not grow with a ``cond`` per leaf (elsewhere see :func:`overflow_guarded`).
  """
  groups = LeafGroups(leaves, axes)
  return groups.unstack(groups.norms(groups.stack(list(leaves))))


@functools.lru_cache(maxsize=None)
def _leaf_branches(axes):
  """(checked, fused) per-leaf L2 norms of stacked groups; see :func:`overflow_guarded`."""

  def sums_of(leaves):
    return [jnp.sum(_sq_f32(x), axis=a, keepdims=True) for x, a in zip(leaves, axes)]

  def scaled_sums_of(leaves):
    return [jnp.sum(_sq_f32(_abs_f32(x) * _RESCUE_DOWN), axis=a, keepdims=True)
            for x, a in zip(leaves, axes)]

  def select(sums, scaled):
    return [jnp.where(jnp.isposinf(s), _RESCUE_UP * safe_root(t, 2.0), safe_root(s, 2.0))
            for s, t in zip(sums, scaled)]

  def checked(leaves):
    sums = sums_of(leaves)
    overflow = stacked_any([jnp.isposinf(s) for s in sums])
    return lax.cond(overflow, rescue, plain, leaves, sums)

  def fused(leaves):
    pairs = [_two_sums(x, 2.0, a, keepdims=True) for x, a in zip(leaves, axes)]
    return select([s for s, _ in pairs], [t for _, t in pairs])

  def rescue(leaves, sums):
    return select(sums, scaled_sums_of(leaves))

  def plain(leaves, sums):
    del leaves
    return [safe_root(s, 2.0) for s in sums]

  return checked, fused


def leaf_norm(x: Array, axes=None) -> Array:
  """L2 norm of one leaf over ``axes`` (see :func:`leaf_norms`), keepdims, float32."""
  return leaf_norms([x], [axes])[0]


def clip_scale(norm: Array, max_norm: Any) -> Array:
  """``min(1, max_norm / norm)`` in float32, defined for every input.

  1 when ``norm <= max_norm`` (zero gradients with ``max_norm = 0``, an infinite
  norm under ``max_norm = inf``), ``max_norm / norm`` when ``norm > max_norm``, NaN
  when ``norm`` is NaN. The division only ever sees ``norm > 0``, so the derivative
  with respect to both the gradients and ``max_norm`` is finite.
  """
  max_norm = jnp.maximum(jnp.asarray(max_norm, jnp.float32), 0.0)
  clipped = norm > max_norm
  denom = jnp.where(clipped, norm, 1.0)
  scale = jnp.where(clipped, max_norm / denom, 1.0)
  return jnp.where(jnp.isnan(norm), jnp.nan, scale).astype(jnp.float32)


def apply_scale(x: Array, scale: Array) -> Array:
  """``x * scale`` computed in float32 (complex64), returned in ``x``'s dtype.

  Written as ``where(scale != 1, x * scale, x)``: entries whose scale is exactly 1
  are passed through untouched, and when no clipping happens at all XLA's select on
  a donated buffer costs almost nothing (about 3x faster than a multiply by 1 on
  CPU, measured in benchmarks/run.py). A NaN scale still reaches every entry.
  """
  wide = jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32
  return jnp.where(scale != 1, (x.astype(wide) * scale).astype(x.dtype), x)


def scale_leaves(leaves: Sequence[Array], scales: Any, split=None) -> list:
  """``[apply_scale(x, s) ...]`` for one scale per leaf (or one ``scales`` for all).

  ``split``, if given, turns ``scales`` into the per-leaf scales after the barrier
  (:meth:`LeafGroups.scale`).

  The scales and the leaves pass through one ``lax.optimization_barrier`` first, so
  the multiply cannot be fused with the reductions that produced the scales. XLA's
  CPU backend otherwise materialises a float32 copy of every low-precision leaf for
  the norm's reduction (a bfloat16 clip became ~10x slower: 48 ms instead of 4.7 ms
  for 25M entries, measured with ``benchmarks/clip_overhead.py``); on GPU/TPU the
  barrier changes nothing, as the reduction is a kernel of its own there anyway.
  """
  leaves = list(leaves)
  if not leaves:
    return []
  if not isinstance(scales, (list, tuple)):
    scales = [scales] * len(leaves)
  scales, leaves = lax.optimization_barrier((list(scales), leaves))
  if split is not None:
    scales = split(scales)
  return [apply_scale(x, s) for x, s in zip(leaves, computed_once(scales))]


def never(leaf: Array) -> Array:
  """A run-time False that XLA cannot fold: one entry's bit count exceeds its width."""
  x = jnp.real(leaf.reshape(-1)[0])
  bits = x.dtype.itemsize * 8
  word = lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))
  return lax.population_count(word) > bits


def computed_once(values: Sequence[Array]) -> list:
  """``values`` unchanged; on CPU the non-scalar ones are computed into buffers first.

  XLA fuses the elementwise chain that turns norms into scales (the compares and
  selects of :func:`clip_scale`) into every consumer. A scalar chain is hoisted out
  of the consumer's loop, but a per-unit scale vector (AGC, ``clip_by_norm`` with
  ``axes``) was recomputed for every entry of its leaf, in each Adam moment's kernel.
  The outputs of a conditional are buffers, so the non-scalar values go through one
  ``lax.cond`` whose predicate is :func:`never` (False at run time, and XLA cannot
  fold it); its other branch, never taken, would return NaN. One conditional serves
  every leaf: a conditional per leaf would grow the compile time. Other backends have
  the compute to spare and would pay the conditional's host round trip: unchanged.
  """
  values = list(values)
  picked = [i for i, v in enumerate(values) if jnp.size(v) > 1]
  if not picked:
    return values

  def cpu(vs):
    return lax.cond(never(vs[0]), lambda v: [jnp.full_like(x, jnp.nan) for x in v],
                    lambda v: list(v), vs)

  done = lax.platform_dependent([values[i] for i in picked], cpu=cpu,
                                default=lambda vs: list(vs))
  for i, v in zip(picked, done):
    values[i] = v
  return values


def stacked_any(flags: Sequence[Array]) -> Array:
  """``any`` of boolean arrays as one stacked reduction (see :func:`stacked_sum`)."""
  flags = [jnp.any(f) for f in flags]
  return jnp.any(jnp.stack(flags)) if flags else jnp.zeros((), bool)


def leaves_of(tree: Any) -> list:
  """The non-None leaves of a tree (``None`` entries pass through, as in TF)."""
  return jax.tree.leaves(tree)
