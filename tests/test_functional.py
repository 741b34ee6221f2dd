"""The TensorFlow-style functional API against TensorFlow's formulas, in NumPy.

TensorFlow is not a dependency: the expected values are TensorFlow's documented
formulas (``tf.linalg.global_norm``, ``tf.clip_by_global_norm``, ``tf.clip_by_norm``,
TF 1's ``tf.clip_by_average_norm``, ``tf.clip_by_value``) evaluated in float64 NumPy on
the inputs' exact values, plus a few values computed by hand. Nothing here is
computed by another code path of gradclip_jax. Every function runs jitted in float32,
bfloat16, float16 and float64 (under x64), and eagerly in float32 and bfloat16.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradclip_jax import functional as F

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64]
# Relative tolerance of a result rounded to its dtype (the norms are float32 at least).
RTOL = {jnp.float32: 2e-6, jnp.bfloat16: 8e-3, jnp.float16: 1e-3, jnp.float64: 1e-12}


def _dtype_id(d):
  return jnp.dtype(d).name


@contextlib.contextmanager
def _x64_for(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    yield


def _call(fn, jit, *args):
  return jax.jit(fn)(*args) if jit else fn(*args)


def _t_list(dtype, seed=7):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(4, 3)) * 2, dtype), None,
          jnp.asarray(rng.normal(size=(5,)) * 2, dtype)]


def _np(x):
  """The exact values of ``x`` in float64 (bfloat16 goes through float32)."""
  return np.asarray(np.asarray(x, np.float32) if x.dtype == jnp.bfloat16 else x,
                    np.float64)


def _np_norm(arrays, p):
  flat = np.concatenate([np.abs(_np(a)).ravel() for a in arrays if a is not None])
  if p == np.inf:
    return flat.max()
  return (flat ** p).sum() ** (1.0 / p)


def _close(actual, expected, dtype, rtol=None):
  np.testing.assert_allclose(_np(actual), expected, rtol=rtol or RTOL[dtype],
                             atol=0)


# ------------------------------------------------------------------ hand values


def test_hand_computed_values():
  @jax.jit
  def run():
    return dict(
        l2=F.global_norm([jnp.array([3.0]), None, jnp.array([4.0])]),
        l1=F.global_norm({"a": jnp.array([3.0, -4.0])}, 1.0),
        linf=F.global_norm([jnp.array([3.0, -4.0]), jnp.array([2.0])], jnp.inf),
        complex=F.global_norm([jnp.array([3.0 + 4.0j])]),  # |3 + 4i| = 5
        global_=F.clip_by_global_norm([jnp.array([6.0]), jnp.array([8.0])], 5.0),
        rows=F.clip_by_norm(jnp.array([[3.0, 4.0], [0.3, 0.4]]), 1.0, axes=1),
        # ||(6, 8)|| = 10 > 1.0 * 2 entries: scaled by 2 / 10.
        average=F.clip_by_average_norm(jnp.array([6.0, 8.0]), 1.0),
        value=F.clip_by_value([jnp.array([-2.0, 0.5, 3.0])], -1.0, 1.0))

  out = run()
  norms = [float(out[k]) for k in ("l2", "l1", "linf", "complex")]
  assert norms == [5.0, 7.0, 4.0, 5.0]
  clipped, norm = out["global_"]
  assert float(norm) == 10.0 and [c.tolist() for c in clipped] == [[3.0], [4.0]]
  np.testing.assert_allclose(np.asarray(out["rows"]), [[0.6, 0.8], [0.3, 0.4]],
                             rtol=1e-7)
  np.testing.assert_allclose(np.asarray(out["average"]), [1.2, 1.6], rtol=1e-7)
  assert out["value"][0].tolist() == [-1.0, 0.5, 1.0]


# ------------------------------------------------- every function, every dtype

P_VALUES = (1.0, 2.0, 3.0, np.inf)
AXES = (None, [1], 0, (0, 1))
THRESHOLDS = (1.5, 1e6)  # one clips this tree, the other does not


def _all_outputs(t):
  """Every function of the API on ``t`` (one program per dtype under jit)."""
  return {
      "global_norm": [F.global_norm(t, p) for p in P_VALUES],
      "clip_by_global_norm": [F.clip_by_global_norm(t, c) for c in THRESHOLDS],
      "clip_by_norm": F.clip_by_norm(t, 1.0),
      "clip_by_norm_axes": [F.clip_by_norm(t[0], 1.0, axes=a) for a in AXES],
      "clip_by_average_norm": [F.clip_by_average_norm(t[0], c) for c in (0.1, 10.0)],
      "clip_by_value": F.clip_by_value(t, -0.5, 0.5),
  }


# Eager (op-by-op) calls compile every primitive anew per dtype: float32 and bfloat16
# cover that path; every dtype runs jitted.
CASES = [(d, True) for d in DTYPES] + [(jnp.float32, False), (jnp.bfloat16, False)]


CASE_IDS = [f"{_dtype_id(d)}-{'jit' if j else 'eager'}" for d, j in CASES]


@pytest.mark.parametrize("dtype,jit", CASES, ids=CASE_IDS)
def test_every_function_matches_tf_formulas(dtype, jit):
  with _x64_for(dtype):
    t = _t_list(dtype)
    out = _call(_all_outputs, jit, t)
  x0, x2 = _np(t[0]), _np(t[2])
  norm_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  # The norms accumulate in float32 at least: the float32 bound for 16-bit input.
  norm_rtol = 1e-12 if dtype == jnp.float64 else 2e-6

  # tf.linalg.global_norm (p = 2) and its Lp generalisation.
  for p, norm in zip(P_VALUES, out["global_norm"]):
    assert norm.dtype == norm_dtype, p
    _close(norm, _np_norm(t, p), dtype, norm_rtol)

  # tf.clip_by_global_norm: t * clip_norm / max(global_norm, clip_norm).
  n = _np_norm(t, 2.0)
  for c, (clipped, norm) in zip(THRESHOLDS, out["clip_by_global_norm"]):
    _close(norm, n, dtype, norm_rtol)
    assert clipped[1] is None  # None entries pass through
    for y, x in ((clipped[0], t[0]), (clipped[2], t[2])):
      assert y.dtype == x.dtype and y.shape == x.shape
      _close(y, _np(x) * c / max(n, c), dtype)

  # tf.clip_by_norm: t * clip_norm / max(l2norm(t, axes), clip_norm), per leaf.
  clipped = out["clip_by_norm"]
  assert clipped[1] is None
  _close(clipped[0], x0 / max(np.sqrt((x0 ** 2).sum()), 1.0), dtype)
  _close(clipped[2], x2 / max(np.sqrt((x2 ** 2).sum()), 1.0), dtype)
  for axes, y in zip(AXES, out["clip_by_norm_axes"]):
    red = None if axes is None else axes if isinstance(axes, int) else tuple(axes)
    rows = np.sqrt((x0 ** 2).sum(axis=red, keepdims=True))
    assert y.dtype == dtype
    _close(y, x0 / np.maximum(rows, 1.0), dtype)

  # TF 1's clip_by_average_norm: t * clip_norm * min(1 / clip_norm, n / l2norm(t)).
  for c, y in zip((0.1, 10.0), out["clip_by_average_norm"]):
    _close(y, x0 * c * min(1.0 / c, x0.size / np.sqrt((x0 ** 2).sum())), dtype)

  # tf.clip_by_value: exact.
  clipped = out["clip_by_value"]
  assert clipped[1] is None
  for y, x in ((clipped[0], x0), (clipped[2], x2)):
    assert y.dtype == dtype
    np.testing.assert_array_equal(_np(y), np.clip(x, -0.5, 0.5))


def test_global_norm_accumulates_float16_in_float32():
  t = [jnp.full((4,), 300.0, jnp.float16)]  # 300^2 overflows float16
  np.testing.assert_allclose(float(F.global_norm(t)), 600.0, rtol=1e-7)


def test_global_norm_rescues_overflow_and_underflow():
  for scale in (1e30, 1e-30):
    t = [jnp.asarray([3.0 * scale, 4.0 * scale], jnp.float32)]
    np.testing.assert_allclose(float(F.global_norm(t)), 5.0 * scale, rtol=1e-6)


def test_clip_by_global_norm_p1_and_inf():
  t = _t_list(jnp.float32)
  for p in (1.0, np.inf):
    clipped, norm = F.clip_by_global_norm(t, 0.5, norm_type=p)
    n = _np_norm(t, p)
    np.testing.assert_allclose(float(norm), n, rtol=2e-6)
    np.testing.assert_allclose(_np(clipped[0]), _np(t[0]) * 0.5 / n, rtol=2e-6)


def test_use_norm_replaces_the_computed_norm():
  t = _t_list(jnp.float32)
  clipped, norm = F.clip_by_global_norm(t, 1.0, use_norm=10.0)
  assert float(norm) == 10.0
  np.testing.assert_allclose(_np(clipped[0]), _np(t[0]) / 10.0, rtol=1e-6)
  clipped, _ = F.clip_by_global_norm(t, 1.0, use_norm=jnp.inf)
  assert np.isnan(_np(clipped[0])).all()  # TF: all NaN on an inf norm


def test_nonfinite_entry_makes_every_entry_nan():
  t = [jnp.array([1.0, np.nan]), jnp.array([2.0])]
  clipped, norm = F.clip_by_global_norm(t, 1.0)
  assert np.isnan(float(norm))
  assert all(np.isnan(np.asarray(c)).all() for c in clipped)


def test_bad_input():
  t = _t_list(jnp.float32)
  with pytest.raises(TypeError, match=r"\[1\]"):
    F.global_norm([jnp.ones(2), jnp.arange(2)])
  with pytest.raises(ValueError):
    F.clip_by_global_norm(t, -1.0)
  with pytest.raises(ValueError):
    F.global_norm(t, norm_type=-1)
  with pytest.raises(ValueError):
    F.clip_by_norm(t, -1.0)
  with pytest.raises(ValueError):
    F.clip_by_value(t, 1.0, 0.0)
  with pytest.raises(ValueError, match="use_norm"):
    F.clip_by_global_norm(t, 1.0, use_norm=jnp.ones(2))
