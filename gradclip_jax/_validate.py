"""Input checks shared by every rule: build-time arguments and run-time trees.

Everything a rule checks before it computes lives here, so that every rule reports a
bad input the same way, naming the argument (and the leaf's path in a pytree):

* :func:`check_gradient_tree`: the gradients (or parameters) have floating or complex
  leaves; integer and boolean leaves are a ``TypeError`` naming their path.
* :func:`check_threshold`, :func:`check_range`, :func:`check_int`,
  :func:`check_norm_type`: one family of build-time checks of hyperparameters. Traced
  values (``optax.inject_hyperparams`` under ``jit``) cannot be inspected and pass;
  the rules clamp them instead.
* :func:`broadcast_thresholds`: one shape rule for per-leaf thresholds and bounds
  (a threshold must *fit* its leaf, :func:`fits`).
* :func:`unit_axes` and :func:`kept_shape`: reduction axes of a leaf, checked.

The numerics (dtypes, norms, scales) are in :mod:`gradclip_jax._norms`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def dtype_of(x: Any) -> np.dtype:
  dtype = getattr(x, "dtype", None)
  return jnp.dtype(dtype) if dtype is not None else np.asarray(x).dtype


def leaf_paths(tree: Any):
  """(path string, leaf) for every non-None leaf of ``tree``."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path) or "<root>", leaf) for path, leaf in flat]


def _label(name: str, path: str) -> str:
  return name if path == "<root>" else f"{name}{path}"


def check_gradient_tree(tree: Any, what: str = "gradient") -> None:
  """Raises ``TypeError`` naming the first leaf that is not floating or complex.

  Integer and boolean arrays have no meaningful norm-preserving rescaling (and
  ``jax.grad`` never produces them: it gives ``float0``), so they are refused.
  """
  for path, leaf in leaf_paths(tree):
    dtype = dtype_of(leaf)
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


def as_real_array(name: str, value: Any) -> np.ndarray:
  """``value`` as a NumPy array of a real (or bool) dtype, else ``TypeError``."""
  try:
    arr = np.asarray(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be a number, got {type(value).__name__}") from e
  ok = (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_ or
        jnp.issubdtype(arr.dtype, jnp.floating))  # bfloat16 & co. (ml_dtypes)
  if not ok or np.issubdtype(arr.dtype, np.complexfloating):
    raise TypeError(f"{name} must be a real number, got {value!r}")
  if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
    arr = arr.astype(np.float32)
  return arr


def check_threshold(name: str, value: Any, *, allow_inf: bool = True,
                    scalar: bool = False) -> None:
  """``ValueError`` for a negative or NaN threshold known at build time.

  ``value`` may be a Python number, a NumPy/JAX scalar or (unless ``scalar``) a
  pytree of them (per-leaf thresholds; their shapes are checked against the leaves by
  :func:`broadcast_thresholds`). Traced values (``optax.inject_hyperparams`` under
  ``jit``) cannot be inspected; the rules clamp them at zero instead. With
  ``scalar=True`` anything but one number (shape ``()``) is a ``TypeError``.
  """
  if scalar and not is_scalar_threshold(value):
    raise TypeError(f"{name} must be one number (a scalar), got "
                    f"{type(value).__name__} of shape {np.shape(value)}")
  for path, leaf in leaf_paths(value):
    label = _label(name, path)
    if not is_concrete(leaf):
      continue
    arr = as_real_array(label, leaf)
    if np.any(np.isnan(arr)):
      raise ValueError(f"{label} is NaN; a clipping threshold must be a number >= 0")
    if np.any(arr < 0):
      raise ValueError(f"{label} = {arr.tolist()} is negative; a clipping threshold "
                       "must be >= 0")
    if not allow_inf and np.any(np.isinf(arr)):
      raise ValueError(f"{label} must be finite, got {arr.tolist()}")


def check_value_bounds(min_value, max_value) -> None:
  """``ValueError`` for a NaN bound or ``min_value > max_value`` (known ones only)."""
  for name, v in (("min_value", min_value), ("max_value", max_value)):
    for path, leaf in leaf_paths(v):
      label = _label(name, path)
      if is_concrete(leaf):
        arr = as_real_array(label, leaf)
        if np.isnan(arr).any():
          raise ValueError(f"{label} is NaN")
  lo, hi = jax.tree.leaves(min_value), jax.tree.leaves(max_value)
  if len(lo) == len(hi):
    for a, b in zip(lo, hi):
      if is_concrete(a) and is_concrete(b) and bool(
          np.any(np.asarray(a, np.float64) > np.asarray(b, np.float64))):
        raise ValueError(f"clip_by_value needs min_value <= max_value, got "
                         f"min_value={a} > max_value={b}")


def _concrete_scalar(name: str, value: Any) -> Optional[np.ndarray]:
  """``value`` as a NumPy scalar, or None when it is traced (inject_hyperparams)."""
  if np.ndim(value) != 0:
    raise TypeError(f"{name} must be a real number (a scalar), got shape "
                    f"{np.shape(value)}")
  if not is_concrete(value):
    return None
  return as_real_array(name, value)


def check_range(name: str, value: Any, lo: float, hi: float, *,
                lo_open: bool = False, hi_open: bool = False) -> None:
  """``ValueError`` unless ``lo <(=) value <(=) hi`` (skipped for traced values)."""
  arr = _concrete_scalar(name, value)
  if arr is None:
    return
  v = float(arr)
  ok = not math.isnan(v)
  ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  if not ok:
    interval = (f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
    raise ValueError(f"{name} must be in {interval}, got {v}")


def check_int(name: str, value: Any, minimum: int, *, static: bool = False) -> None:
  """``ValueError`` for an integer argument below ``minimum``.

  ``static=True``: the value fixes a shape, so it must be a Python int (``TypeError``).
  """
  if static:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
      raise TypeError(f"{name} must be a Python int (it fixes a shape; list it in "
                      f"inject_hyperparams' static_args), got {value!r}")
  arr = _concrete_scalar(name, value)
  if arr is None:
    return
  if not np.issubdtype(arr.dtype, np.integer) and float(arr) != int(arr):
    raise TypeError(f"{name} must be an integer, got {value!r}")
  if int(arr) < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {int(arr)}")


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


def fits(shape: Sequence[int], target: Sequence[int]) -> bool:
  """Whether an array of ``shape`` broadcasts to ``target`` without changing it."""
  shape, target = tuple(shape), tuple(target)
  if len(shape) > len(target):
    return False
  return all(s in (1, t) for s, t in zip(shape[::-1], target[::-1]))


def _is_array_like(value: Any) -> bool:
  """An array, or a (nested) list/tuple of plain numbers: one array threshold."""
  if hasattr(value, "shape"):
    return True
  if isinstance(value, (list, tuple)) and value:
    try:
      arr = np.asarray(value)
    except (TypeError, ValueError):
      return False
    return arr.dtype != object and (np.issubdtype(arr.dtype, np.number) or
                                    arr.dtype == np.bool_)
  return False


def broadcast_thresholds(name: str, value: Any, tree: Any,
                         target: Optional[Callable[[Any], tuple]] = None) -> Any:
  """A threshold per leaf of ``tree``: a scalar is repeated, a pytree is checked.

  ``value`` is one number (used for every leaf), a pytree with the structure of
  ``tree`` (one threshold per leaf; ``None`` gradient leaves are skipped on both
  sides), or one array (or list of numbers) that does not have that structure, used
  for every leaf. Raises ``ValueError`` when a threshold tree has another structure,
  and, when ``target`` is given, when a threshold's shape does not *fit* its leaf: it
  must broadcast to ``target(leaf)`` without changing that shape (see :func:`fits`).
  The message names the leaf's path and both shapes.
  """
  structure = jax.tree.structure(tree)
  if is_scalar_threshold(value):
    return jax.tree.unflatten(structure, [value] * structure.num_leaves)
  try:
    out = jax.tree.map(lambda _, v: v, tree, value)
  except (ValueError, TypeError) as e:
    if not _is_array_like(value):
      raise ValueError(
          f"{name} is a pytree of per-leaf thresholds whose structure does not "
          f"match the gradients:\n  gradients: {structure}\n  {name}: "
          f"{jax.tree.structure(value)}") from e
    value = value if hasattr(value, "shape") else jnp.asarray(value)
    out = jax.tree.unflatten(structure, [value] * structure.num_leaves)
  # A leaf of the gradients may face a list of numbers: one array threshold.
  per_leaf = [v if hasattr(v, "shape") or isinstance(v, numbers.Number)
              else jnp.asarray(v) for v in structure.flatten_up_to(out)]
  out = jax.tree.unflatten(structure, per_leaf)
  if target is not None:
    for (path, leaf), v in zip(leaf_paths(tree), per_leaf):
      if np.ndim(v) == 0:
        continue  # a scalar fits every leaf
      want = tuple(target(leaf))
      if not fits(np.shape(v), want):
        raise ValueError(
            f"{_label(name, path)} has shape {tuple(np.shape(v))}, which does not fit "
            f"the leaf {path} of shape {tuple(jnp.shape(leaf))}: it must broadcast to "
            f"{want} without changing it")
  return out


def unit_axes(axes: Any, ndim: int, what: str = "axis") -> Optional[tuple]:
  """``axes`` (None, an int or a sequence of ints) as a sorted tuple of axes >= 0.

  ``None`` stays ``None`` (the whole leaf). ``ValueError`` for an axis out of range
  for a leaf of rank ``ndim``, ``TypeError`` for a non-integer axis.
  """
  if axes is None:
    return None
  axes = (axes,) if isinstance(axes, (numbers.Integral, np.integer)) else axes
  out = []
  for a in axes:
    if isinstance(a, bool) or not isinstance(a, (numbers.Integral, np.integer)):
      raise TypeError(f"{what} must be an int or a tuple of ints, got {a!r}")
    a = int(a)
    if not -ndim <= a < ndim:
      raise ValueError(f"{what} {a} is out of range for a leaf of rank {ndim}")
    out.append(a % ndim)
  return tuple(sorted(set(out)))


def kept_shape(shape: Sequence[int], axes: Optional[tuple]) -> tuple:
  """The shape of a norm over ``axes`` (all when None) with the reduced dims kept."""
  if axes is None:
    return (1,) * len(shape)
  return tuple(1 if i in axes else d for i, d in enumerate(shape))
