"""The fixed-threshold rules against plain NumPy references, jit and no jit, all dtypes."""

import math

import chex
from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax as gc

from _support import TuningOff

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
TOL = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


# ------------------------------------------------------------------ NumPy references


def np_global_norm(leaves, p=2.0):
  flat = np.concatenate([np.abs(np.asarray(x, np.float64)).ravel() for x in leaves])
  if p == math.inf:
    return flat.max()
  return (flat ** p).sum() ** (1.0 / p)


def np_clip_global(leaves, c, p=2.0):
  n = np_global_norm(leaves, p)
  s = 1.0 if n <= c else c / n
  return [np.asarray(x, np.float64) * s for x in leaves], n


def np_clip_norm(x, c, axes=None):
  x = np.asarray(x, np.float64)
  n = np.sqrt((x * x).sum(axis=axes, keepdims=True))
  return x * c / np.maximum(n, c)


def np_clip_avg(x, c):
  x = np.asarray(x, np.float64)
  avg = np.sqrt((x * x).sum()) / x.size
  return x * c / max(avg, c)


def tree(dtype, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(scale * rng.normal(size=(7, 5)), dtype),
          "b": jnp.asarray(scale * rng.normal(size=(5,)), dtype),
          "nested": [jnp.asarray(scale * rng.normal(size=(3, 2, 4)), dtype)]}


def run(tx, g, variant=lambda f: f, params=None):
  state = tx.init(g)
  return variant(tx.update)(g, state, params)


def run_many(cases, variant=lambda f: f):
  """``[run(tx, g, variant) for tx, g in cases]`` as one (variant-wrapped) call: under
  jit one compiled program serves every case instead of one program per case."""
  txs = [tx for tx, _ in cases]
  gs = [g for _, g in cases]
  states = [tx.init(g) for tx, g in cases]

  def update_all(gs, states):
    return [tx.update(g, s) for tx, g, s in zip(txs, gs, states)]

  return variant(update_all)(gs, states)


# --------------------------------------------------------------------------- rules


class ClipByGlobalNormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_all_dtypes_and_norms(self):
    c = 2.0
    cases = [(dtype, p) for dtype in DTYPES for p in (1.0, 2.0, 3.0, 0.5, math.inf)]
    results = run_many([(gc.clip_by_global_norm(c, norm_type=p), tree(dtype, scale=3.0))
                        for dtype, p in cases], self.variant)
    for (dtype, p), (out, state) in zip(cases, results):
      g = tree(dtype, scale=3.0)
      ref, n = np_clip_global(jax.tree.leaves(g), c, p)
      tol = TOL[dtype]
      np.testing.assert_allclose(float(state.global_norm), n, rtol=max(tol, 1e-5))
      for o, r, x in zip(jax.tree.leaves(out), ref, jax.tree.leaves(g)):
        self.assertEqual(o.dtype, x.dtype)
        np.testing.assert_allclose(np.asarray(o, np.float64), r, rtol=tol * 4,
                                   atol=tol * 4)
      self.assertEqual(state.global_norm.dtype, jnp.float32)
      self.assertEqual(int(state.num_clipped), 1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_no_op_under_bound_and_counters(self):
    g = tree(jnp.float32, scale=0.01)
    tx = gc.clip_by_global_norm(100.0)
    state = tx.init(g)
    update = self.variant(tx.update)
    for _ in range(3):
      out, state = update(g, state)
    chex.assert_trees_all_equal(out, g)
    self.assertEqual(float(state.scale), 1.0)
    self.assertEqual(int(state.num_clipped), 0)
    self.assertEqual(int(state.num_nonfinite), 0)

  def test_tree_get_reads_the_norm_inside_a_chain(self):
    g = {"a": jnp.array([3.0, 4.0])}
    tx = optax.chain(gc.clip_by_global_norm(1.0), optax.adam(0.1))
    _, state = tx.update(g, tx.init(g), g)
    self.assertEqual(float(optax.tree_utils.tree_get(state, "global_norm")), 5.0)
    np.testing.assert_allclose(float(optax.tree_utils.tree_get(state, "scale")), 0.2)

  def test_none_leaves_and_empty_tree(self):
    g = {"a": jnp.array([3.0, 4.0]), "frozen": None}
    out, state = run(gc.clip_by_global_norm(1.0), g)
    self.assertIsNone(out["frozen"])
    np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-6)
    out, state = run(gc.clip_by_global_norm(1.0), {})
    self.assertEqual(out, {})
    self.assertEqual(float(state.global_norm), 0.0)


class ClipByNormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_tf_formula(self):
    results = run_many([(gc.clip_by_norm(1.5), tree(dtype, scale=2.0)) for dtype in DTYPES],
                       self.variant)
    for dtype, (out, state) in zip(DTYPES, results):
      g = tree(dtype, scale=2.0)
      for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
        self.assertEqual(o.dtype, x.dtype)
        np.testing.assert_allclose(np.asarray(o, np.float64), np_clip_norm(x, 1.5),
                                   rtol=4 * TOL[dtype], atol=4 * TOL[dtype])
      np.testing.assert_allclose(float(state.global_norm),
                                 np_global_norm(jax.tree.leaves(g)), rtol=TOL[dtype])

  @chex.variants(with_jit=True, without_jit=True)
  def test_axes(self):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6, 3)) * 3, jnp.float32)
    all_axes = (None, 0, -1, (0, 1), (1, 2), [0, 2])
    results = run_many([(gc.clip_by_norm(1.0, axes=axes), x) for axes in all_axes],
                       self.variant)
    for axes, (out, _) in zip(all_axes, results):
      ref_axes = tuple(axes) if isinstance(axes, list) else axes
      np.testing.assert_allclose(out, np_clip_norm(x, 1.0, ref_axes), rtol=1e-5,
                                 atol=1e-6)

  def test_per_leaf_thresholds(self):
    g = {"embed": jnp.full((4,), 10.0), "dense": jnp.full((4,), 10.0)}
    out, _ = run(gc.clip_by_norm({"embed": 8.0, "dense": 2.0}), g)
    np.testing.assert_allclose(jnp.linalg.norm(out["embed"]), 8.0, rtol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(out["dense"]), 2.0, rtol=1e-6)

  def test_mismatched_threshold_tree(self):
    g = {"a": jnp.ones(3), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match="structure does not match"):
      run(gc.clip_by_norm({"a": 1.0, "c": 1.0}), g)


class ClipByAverageNormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_tf_v1_formula(self):
    results = run_many([(gc.clip_by_average_norm(0.2), tree(dtype, scale=2.0))
                        for dtype in DTYPES], self.variant)
    for dtype, (out, _) in zip(DTYPES, results):
      g = tree(dtype, scale=2.0)
      for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
        self.assertEqual(o.dtype, x.dtype)
        np.testing.assert_allclose(np.asarray(o, np.float64), np_clip_avg(x, 0.2),
                                   rtol=4 * TOL[dtype], atol=4 * TOL[dtype])


class ClipByValueTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    results = run_many([(gc.clip_by_value(-0.5, 1.0), tree(dtype, scale=2.0))
                        for dtype in DTYPES], self.variant)
    for dtype, (out, state) in zip(DTYPES, results):
      g = tree(dtype, scale=2.0)
      for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
        self.assertEqual(o.dtype, x.dtype)
        np.testing.assert_array_equal(np.asarray(o, np.float32),
                                      np.clip(np.asarray(x, np.float32), -0.5, 1.0))
      self.assertEqual(int(state.num_clipped), 1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_entries_do_not_stop_the_clip(self):
    # A NaN entry used to hide the leaf's out-of-range entries from the max/min test.
    x = np.array([np.nan, 5.0, -3.0, 0.25], np.float32)
    gs = [{"a": jnp.asarray(x, dtype), "b": jnp.asarray([0.5, -0.5], dtype)}
          for dtype in DTYPES]
    for out, state in run_many([(gc.clip_by_value(-1.0, 1.0), g) for g in gs],
                               self.variant):
      np.testing.assert_array_equal(np.asarray(out["a"], np.float32), np.clip(x, -1.0, 1.0))
      np.testing.assert_array_equal(np.asarray(out["b"], np.float32), [0.5, -0.5])
      self.assertEqual(int(state.num_clipped), 1)
    # A NaN alone passes through (and the step counts, see ClipByValueState).
    out, state = run(gc.clip_by_value(-1.0, 1.0), {"a": jnp.array([np.nan, 0.5])},
                     self.variant)
    np.testing.assert_array_equal(np.asarray(out["a"]), [np.nan, 0.5])
    self.assertEqual(int(state.num_clipped), 1)

  def test_per_leaf_bounds(self):
    g = {"a": jnp.array([-5.0, 5.0]), "b": jnp.array([-5.0, 5.0])}
    out, _ = run(gc.clip_by_value({"a": -1.0, "b": -2.0}, {"a": 1.0, "b": 3.0}), g)
    np.testing.assert_array_equal(out["a"], [-1.0, 1.0])
    np.testing.assert_array_equal(out["b"], [-2.0, 3.0])


class ClipByValuePlainFormTest(TuningOff, ClipByValueTest):
  """The same tests with the backend tuning off: the plain ``jnp.clip`` form, which is
  also what GPU/TPU run (the CPU in-range test form is ``value_clip_tested``)."""

  def test_infinite_entries_are_clipped_and_counted(self):
    self.assertFalse(gc.config.backend_tuning("value_clip_tested"))
    tx = gc.clip_by_value(-1.0, 1.0)
    g = {"a": jnp.array([0.5, jnp.inf, -jnp.inf])}
    out, state = tx.update(g, tx.init(g))
    np.testing.assert_array_equal(out["a"], [0.5, 1.0, -1.0])
    self.assertEqual(int(state.num_clipped), 1)


# ------------------------------------------------------------------------ bad input


class BadInputTest(chex.TestCase):

  def test_bad_thresholds_fail_at_build(self):
    for make in (lambda: gc.clip_by_global_norm(-1.0),
                 lambda: gc.clip_by_global_norm(float("nan")),
                 lambda: gc.clip_by_global_norm(jnp.float32(-2.0)),
                 lambda: gc.clip_by_norm(-0.1),
                 lambda: gc.clip_by_norm({"a": 1.0, "b": -1.0}),
                 lambda: gc.clip_by_average_norm(float("nan")),
                 lambda: gc.clip_by_value(1.0, -1.0),
                 lambda: gc.clip_by_value(float("nan"), 1.0),
                 lambda: gc.clip_by_global_norm(1.0, norm_type=0.0),
                 lambda: gc.clip_by_global_norm(1.0, norm_type=-2),
                 lambda: gc.clip_by_global_norm(1.0, norm_type=float("nan")),
                 lambda: gc.clip_by_global_norm(1.0, nonfinite="ignore")):
      with self.assertRaises(ValueError):
        make()

  def test_non_numeric_threshold(self):
    with self.assertRaises(TypeError):
      gc.clip_by_global_norm("1.0")
    with self.assertRaises(TypeError):
      gc.clip_by_global_norm({"a": 1.0})  # per-leaf thresholds are clip_by_norm's

  def test_integer_and_bool_leaves_name_the_path(self):
    for tx in (gc.clip_by_global_norm(1.0), gc.clip_by_norm(1.0),
               gc.clip_by_average_norm(1.0), gc.clip_by_value(-1.0, 1.0)):
      for bad in (jnp.arange(3), jnp.array([True, False])):
        g = {"layer": {"kernel": jnp.ones(3), "step": bad}}
        with self.assertRaisesRegex(TypeError, r"\['layer'\]\['step'\]"):
          tx.update(g, tx.init(g))


# ----------------------------------------------------------------------- properties

# XLA flushes float32 subnormals to zero on CPU, so they are left out.
finite_floats = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False,
                          width=32)
vectors = st.lists(finite_floats, min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(a=vectors, b=vectors, c=st.floats(0.0, 100.0, width=32))
def test_global_norm_properties(a, b, c):
  g = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  tx = gc.clip_by_global_norm(c)
  out, state = tx.update(g, tx.init(g))
  n_in = float(state.global_norm)
  n_out = float(gc.functional.global_norm(out))
  assert n_out <= c * (1 + 1e-5) + 1e-30  # clipped norm <= bound
  if n_in <= c:  # no-op under the bound
    chex.assert_trees_all_equal(out, g)
  else:  # direction kept: out is a non-negative multiple of g
    x = np.concatenate([np.asarray(g["a"]), np.asarray(g["b"])])
    y = np.concatenate([np.asarray(out["a"]), np.asarray(out["b"])])
    np.testing.assert_allclose(y, x * (c / n_in), rtol=1e-4, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(out["a"])))


@settings(max_examples=30, deadline=None)
@given(a=st.lists(finite_floats, min_size=6, max_size=6), c=st.floats(0.0, 50.0,
                                                                     width=32))
def test_clip_by_norm_axes_property(a, c):
  x = jnp.asarray(a, jnp.float32).reshape(2, 3)
  out, _ = run(gc.clip_by_norm(c, axes=1), x)
  row_norms = np.linalg.norm(np.asarray(out, np.float64), axis=1)
  assert np.all(row_norms <= c * (1 + 1e-5) + 1e-30)
  in_norms = np.linalg.norm(np.asarray(x, np.float64), axis=1)
  for i in range(2):
    if in_norms[i] <= c:
      np.testing.assert_array_equal(out[i], x[i])


@settings(max_examples=30, deadline=None)
@given(a=vectors, lo=st.floats(-10, 0, width=32), width=st.floats(0, 10, width=32))
def test_clip_by_value_property(a, lo, width):
  hi = lo + width
  x = jnp.asarray(a, jnp.float32)
  out, _ = run(gc.clip_by_value(lo, hi), x)
  assert np.all(np.asarray(out) >= np.float32(lo)) and np.all(
      np.asarray(out) <= np.float32(hi))
  inside = (np.asarray(x) >= np.float32(lo)) & (np.asarray(x) <= np.float32(hi))
  np.testing.assert_array_equal(np.asarray(out)[inside], np.asarray(x)[inside])
