"""Bounds and thresholds that do not fit their leaf are refused, not broadcast.

TensorFlow's ``clip_ops_test.testClipByValueBadShape`` / ``testClipByNormBadShape``: a
``[1., 2.]`` bound on a ``(2, 3, 1)`` gradient, or a ``[1., 2.]`` norm threshold on a
``(2, 3)`` one, is a ``ValueError``. Broadcasting it instead changes the result's shape
(``clip_by_value`` returned ``(2, 3, 2)``, and through ``optax.chain`` the parameters
took that shape) or scales each slice by its own threshold over the whole leaf's norm.
The error names the leaf (its pytree path) and both shapes.

Also here, the other bad input the project's standards name that the rule-specific
test files do not cover yet (tests/test_clipping.py, test_adaptive.py,
test_functional.py and test_dp.py cover negative / NaN thresholds, scalar min > max,
integer leaves of the Optax transforms, bad hyperparameter ranges, AGC's params and
per_example_clip's batch axis): elementwise min > max, integer leaves in the
functional API, non-scalar hyperparameters of the adaptive rules, mismatched trees of
per-leaf bounds and of AdaGC's state. And bounds that do fit keep working, with the
values NumPy gives.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax as gc
from gradclip_jax import functional as F


def _compact(text):
  return re.sub(r"\s+", "", text)


def assert_bad_shape(fn, shapes, leaf=None):
  """``fn()`` raises a ValueError whose message names ``leaf`` and every shape."""
  with pytest.raises(ValueError) as info:
    out = fn()
    jax.block_until_ready(out)
  msg = str(info.value)
  for shape in shapes:
    assert _compact(str(tuple(shape))) in _compact(msg), (
        f"the error must name the shape {tuple(shape)}; got: {msg}")
  if leaf is not None:
    assert leaf in msg, f"the error must name the leaf {leaf!r}; got: {msg}"


def _update(tx, g, params=None):
  return tx.update(g, tx.init(g if params is None else params), params)


# TF's cases: x of shape (2, 3, 1) with a [1., 2.] bound; x of shape (2, 3) with a
# [1., 2.] norm threshold.
X231 = jnp.asarray(np.array([-5.0, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape(2, 3, 1),
                   jnp.float32)
X23 = jnp.asarray(np.array([-3.0, 0.0, 0.0, 4.0, 0.0, 0.0]).reshape(2, 3), jnp.float32)
CLIP2 = jnp.array([1.0, 2.0])


# ------------------------------------------------------------------ clip_by_value


@pytest.mark.parametrize("bounds", [(-CLIP2, CLIP2), (1.0, CLIP2), (-CLIP2, 10.0)],
                         ids=["both", "max", "min"])
def test_clip_by_value_bad_shape_tf(bounds):
  """testClipByValueBadShape: a (2,) bound does not fit a (2, 3, 1) gradient."""
  assert_bad_shape(lambda: _update(gc.clip_by_value(*bounds), X231), [(2, 3, 1), (2,)])
  assert_bad_shape(lambda: F.clip_by_value(X231, *bounds), [(2, 3, 1), (2,)])
  # The same bound given to every leaf of a tree (however the rule reads an array
  # bound there: one bound for all leaves, or a tree of one leaf) is refused too.
  with pytest.raises(ValueError):
    _update(gc.clip_by_value(*bounds), {"layer": {"kernel": X231}})


def test_clip_by_value_bad_shape_cannot_reshape_parameters_through_chain():
  params = jnp.zeros((2, 3, 1))
  tx = optax.chain(gc.clip_by_value(-CLIP2, CLIP2), optax.sgd(1.0))
  assert_bad_shape(lambda: tx.update(X231, tx.init(params), params),
                   [(2, 3, 1), (2,)])
  assert_bad_shape(lambda: jax.jit(tx.update)(X231, tx.init(params), params),
                   [(2, 3, 1), (2,)])


def test_clip_by_value_bound_that_would_grow_the_leaf():
  """(3, 2) broadcasts with (3, 1) to (3, 2): the leaf would change shape."""
  x = jnp.ones((3, 1))
  assert_bad_shape(lambda: _update(gc.clip_by_value(-jnp.ones((3, 2)), 1.0), x),
                   [(3, 1), (3, 2)])
  g = {"bias": x, "w": jnp.ones(2)}
  assert_bad_shape(
      lambda: _update(gc.clip_by_value({"bias": -jnp.ones((3, 2)), "w": -1.0}, 1.0), g),
      [(3, 1), (3, 2)], leaf="bias")


def test_clip_by_value_per_leaf_tree_with_a_wrong_shaped_entry():
  g = {"a": jnp.ones((2, 4)), "b": jnp.ones((5,))}
  lo = {"a": -1.0, "b": -1.0}
  hi = {"a": 1.0, "b": jnp.ones((3,))}
  assert_bad_shape(lambda: _update(gc.clip_by_value(lo, hi), g), [(5,), (3,)],
                   leaf="b")
  assert_bad_shape(lambda: F.clip_by_value(g, lo, hi), [(5,), (3,)], leaf="b")


def test_clip_by_value_injected_bound_of_the_wrong_shape():
  """A traced bound (inject_hyperparams under jit) has a static shape: still refused."""
  tx = optax.inject_hyperparams(gc.clip_by_value)(min_value=-CLIP2, max_value=CLIP2)
  assert_bad_shape(lambda: jax.jit(tx.update)(X231, tx.init(X231)), [(2, 3, 1), (2,)])


def test_clip_by_value_bounds_that_fit():
  """A bound of the leaf's exact shape clips elementwise, as np.clip does."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 1)).astype(np.float32) * 3
  lo = -np.abs(rng.normal(size=(2, 3, 1))).astype(np.float32)
  hi = np.abs(rng.normal(size=(2, 3, 1))).astype(np.float32)
  g = {"w": jnp.asarray(x), "s": jnp.asarray(np.float32(5.0))}
  tx = gc.clip_by_value({"w": jnp.asarray(lo), "s": -1.0},
                        {"w": jnp.asarray(hi), "s": 2.0})
  out, _ = _update(tx, g)
  assert out["w"].shape == (2, 3, 1)
  np.testing.assert_array_equal(np.asarray(out["w"]), np.clip(x, lo, hi))
  assert float(out["s"]) == 2.0
  out = F.clip_by_value(jnp.asarray(x), jnp.asarray(lo), jnp.asarray(hi))
  np.testing.assert_array_equal(np.asarray(out), np.clip(x, lo, hi))


def test_clip_by_value_min_above_max_elementwise():
  with pytest.raises(ValueError, match="min_value"):
    gc.clip_by_value(jnp.array([0.0, 2.0]), jnp.array([1.0, 1.0]))
  with pytest.raises(ValueError, match="min_value"):
    gc.clip_by_value({"a": 0.0, "b": 2.0}, {"a": 1.0, "b": 1.0})


def test_clip_by_value_mismatched_bound_trees():
  g = {"a": jnp.ones(2), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match="structure"):
    _update(gc.clip_by_value({"a": -1.0, "c": -1.0}, 1.0), g)
  with pytest.raises(ValueError, match="structure"):
    F.clip_by_value(g, -1.0, {"a": 1.0})


# ---------------------------------------------------- clip_by_norm / average_norm


def test_clip_by_norm_bad_shape_tf():
  """testClipByNormBadShape: a (2,) threshold on a (2, 3) leaf (whole-leaf norm)."""
  assert_bad_shape(lambda: F.clip_by_norm(X23, CLIP2), [(2, 3), (2,)])
  assert_bad_shape(lambda: _update(gc.clip_by_norm(CLIP2), X23), [(2, 3), (2,)])
  assert_bad_shape(lambda: F.clip_by_norm(X23, [1.0, 2.0]), [(2, 3), (2,)])
  with pytest.raises(ValueError):
    _update(gc.clip_by_norm(CLIP2), {"dense": {"kernel": X23}})


def test_clip_by_average_norm_bad_shape():
  assert_bad_shape(lambda: _update(gc.clip_by_average_norm(CLIP2), X23),
                   [(2, 3), (2,)])
  assert_bad_shape(lambda: F.clip_by_average_norm(X23, CLIP2), [(2, 3), (2,)])


def test_clip_by_norm_per_leaf_tree_with_a_wrong_shaped_entry():
  g = {"embed": jnp.ones((4, 6)), "bias": jnp.ones((6,))}
  thresholds = {"embed": jnp.ones((3,)), "bias": 1.0}
  assert_bad_shape(lambda: _update(gc.clip_by_norm(thresholds), g), [(4, 6), (3,)],
                   leaf="embed")
  assert_bad_shape(lambda: F.clip_by_norm(g, thresholds), [(4, 6), (3,)],
                   leaf="embed")
  assert_bad_shape(lambda: _update(gc.clip_by_average_norm(thresholds), g),
                   [(4, 6), (3,)], leaf="embed")


def test_clip_by_norm_with_axes_threshold_of_another_shape():
  """With axes=1 a (4, 6) leaf has 4 row norms; a (6,) threshold fits no row."""
  x = jnp.ones((4, 6))
  assert_bad_shape(lambda: _update(gc.clip_by_norm(jnp.ones(6), axes=1), x),
                   [(4, 6), (6,)])
  assert_bad_shape(lambda: F.clip_by_norm(x, jnp.ones((2, 1)), axes=1),
                   [(4, 6), (2, 1)])
  g = {"embed": x, "bias": jnp.ones(6)}
  assert_bad_shape(
      lambda: _update(gc.clip_by_norm({"embed": jnp.ones(6), "bias": 1.0}, axes=1), g),
      [(4, 6), (6,)], leaf="embed")


def test_clip_by_norm_injected_threshold_of_the_wrong_shape():
  tx = optax.inject_hyperparams(gc.clip_by_norm)(max_norm=CLIP2)
  assert_bad_shape(lambda: jax.jit(tx.update)(X23, tx.init(X23)), [(2, 3), (2,)])


def test_clip_by_norm_per_leaf_scalar_thresholds_fit():
  """A tree of one scalar per leaf (0-d arrays included) is the supported form."""
  rng = np.random.default_rng(1)
  x = {"embed": rng.normal(size=(4, 6)).astype(np.float32) * 3,
       "bias": rng.normal(size=(6,)).astype(np.float32)}
  c = {"embed": jnp.asarray(1.5, jnp.float32), "bias": 0.25}
  out, _ = _update(gc.clip_by_norm(c), jax.tree.map(jnp.asarray, x))
  for k, v in x.items():
    n = np.linalg.norm(v.astype(np.float64))
    want = v * min(1.0, float(c[k]) / n)
    np.testing.assert_allclose(np.asarray(out[k]), want, rtol=1e-6, atol=1e-7)


# -------------------------------------------------- per_example_clip (per_layer)


def test_per_example_clip_per_layer_threshold_of_the_wrong_shape():
  g = {"w": jnp.ones((4, 3, 2)), "b": jnp.ones((4, 2))}  # batch of 4
  thresholds = {"w": jnp.ones((3,)), "b": 1.0}
  tx = gc.dp.per_example_clip(thresholds, per_layer=True)
  assert_bad_shape(lambda: _update(tx, g), [(3,)], leaf="w")


# ------------------------------------------------------------- adaptive rules


@pytest.mark.parametrize("name,build", [
    ("clipping", lambda: gc.adaptive_grad_clip(clipping=jnp.array([0.01, 0.02]))),
    ("eps", lambda: gc.adaptive_grad_clip(eps=jnp.array([1e-3, 1e-3]))),
    ("percentile", lambda: gc.autoclip(percentile=jnp.array([10.0, 20.0]))),
    ("max_norm", lambda: gc.zclip(max_norm=jnp.array([1.0, 2.0]))),
    ("z_threshold", lambda: gc.zclip(z_threshold=jnp.array([2.5, 3.0]))),
    ("lambda_abs", lambda: gc.adagc(lambda_abs=jnp.array([1.0, 2.0]))),
    ("lambda_rel", lambda: gc.adagc(lambda_rel=jnp.array([1.0, 1.05]))),
    ("threshold", lambda: gc.skip_spikes(optax.sgd(1.0), threshold=jnp.array([6.0, 7.0]))),
    ("max_norm", lambda: gc.clip_by_global_norm(jnp.array([1.0, 2.0]))),
], ids=["agc-clipping", "agc-eps", "autoclip-percentile", "zclip-max_norm",
        "zclip-z_threshold", "adagc-lambda_abs", "adagc-lambda_rel",
        "skip_spikes-threshold", "clip_by_global_norm-max_norm"])
def test_adaptive_hyperparameters_must_be_scalars(name, build):
  """One number per rule, refused when the rule is built (an array would broadcast
  into the update and the state)."""
  with pytest.raises((ValueError, TypeError), match=name):
    build()


def test_adagc_gradients_must_match_the_init_tree():
  tx = gc.adagc(warmup_steps=1)
  state = tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
  with pytest.raises(ValueError, match="structure"):
    tx.update({"a": jnp.ones(2), "c": jnp.ones(2)}, state)


# --------------------------------------------------------------- functional API


@pytest.mark.parametrize("call", [
    lambda g: F.clip_by_value(g, -1.0, 1.0),
    lambda g: F.clip_by_norm(g, 1.0),
    lambda g: F.clip_by_average_norm(g, 1.0),
    lambda g: F.clip_by_global_norm(g, 1.0),
], ids=["clip_by_value", "clip_by_norm", "clip_by_average_norm", "clip_by_global_norm"])
def test_functional_refuses_integer_leaves_by_path(call):
  g = {"layer": {"kernel": jnp.ones(3), "step": jnp.arange(3)}}
  with pytest.raises(TypeError, match=r"\['layer'\]\['step'\]"):
    call(g)


def test_functional_negative_thresholds():
  g = [jnp.ones(3)]
  with pytest.raises(ValueError, match="negative"):
    F.clip_by_average_norm(g, -1.0)
  with pytest.raises(ValueError, match="negative"):
    F.clip_by_norm({"a": jnp.ones(2), "b": jnp.ones(2)}, {"a": 1.0, "b": -0.5})


def test_functional_use_norm_is_one_number():
  """use_norm is the norm of a tree: a (2,) array would scale a (2,) leaf per entry."""
  with pytest.raises(ValueError, match="use_norm"):
    F.clip_by_global_norm([jnp.ones(2)], 1.0, use_norm=jnp.array([1.0, 4.0]))


# ------------------------------------------- what the docstrings say does fit


def test_clip_by_value_broadcastable_bounds_fit():
  """clip_by_value's docstring: (3, 1) or (1,) fit a (2, 3, 1) leaf (shape unchanged)."""
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(2, 3, 1)) * 3).astype(np.float32)
  lo = -np.abs(rng.normal(size=(3, 1))).astype(np.float32)
  hi = np.array([0.5], np.float32)
  out, _ = _update(gc.clip_by_value({"w": jnp.asarray(lo)}, {"w": jnp.asarray(hi)}),
                   {"w": jnp.asarray(x)})
  assert out["w"].shape == (2, 3, 1)
  np.testing.assert_array_equal(np.asarray(out["w"]), np.clip(x, lo, hi))


def test_clip_by_norm_per_row_thresholds_fit():
  """clip_by_norm's docstring: with axes=-1 a (4, 1) threshold bounds each row."""
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(4, 3)) * 2).astype(np.float32)
  c = np.array([[0.5], [1.0], [10.0], [2.0]], np.float32)
  rows = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
  want = x * c / np.maximum(rows, c)  # tf.clip_by_norm per row
  out, _ = _update(gc.clip_by_norm({"w": jnp.asarray(c)}, axes=-1), {"w": jnp.asarray(x)})
  np.testing.assert_allclose(np.asarray(out["w"]), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(F.clip_by_norm(jnp.asarray(x), jnp.asarray(c), -1)),
                             want, rtol=1e-6, atol=1e-7)


def test_whole_leaf_thresholds_of_ones_shape_fit():
  """Without axes the norm has shape (1,) * ndim: a (1, 1) threshold is a scalar."""
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(2, 3)) * 2).astype(np.float32)
  n = np.linalg.norm(x.astype(np.float64))
  c = np.float32(0.5 * n)
  out, _ = _update(gc.clip_by_norm({"w": jnp.full((1, 1), c)}), {"w": jnp.asarray(x)})
  np.testing.assert_allclose(np.asarray(out["w"]), x * (c / n), rtol=1e-6)
  avg = np.float32(0.5 * n / x.size)  # clip_by_average_norm: budget avg * t.size
  out, _ = _update(gc.clip_by_average_norm({"w": jnp.full((1, 1), avg)}),
                   {"w": jnp.asarray(x)})
  np.testing.assert_allclose(np.asarray(out["w"]), x * (avg * x.size / n), rtol=1e-5)
