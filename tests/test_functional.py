"""The TensorFlow-style functional API: TF semantics, and one kernel with the transforms.

TensorFlow is not a dependency: the expected values are TensorFlow's documented
formulas, evaluated here in float64 NumPy.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradclip_jax as gc
from gradclip_jax import functional as F

RNG = np.random.default_rng(7)
T_LIST = [jnp.asarray(RNG.normal(size=(4, 3)) * 2, jnp.float32), None,
          jnp.asarray(RNG.normal(size=(5,)) * 2, jnp.float32)]


def _np(x):
  return np.asarray(x, np.float64)


class FunctionalTest(chex.TestCase):

  def test_global_norm_is_tf_linalg_global_norm(self):
    expected = np.sqrt(sum((_np(t) ** 2).sum() for t in T_LIST if t is not None))
    np.testing.assert_allclose(float(F.global_norm(T_LIST)), expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_clip_by_global_norm_tf_semantics(self):
    clipped, norm = self.variant(lambda t: F.clip_by_global_norm(t, 1.5))(T_LIST)
    n = float(F.global_norm(T_LIST))
    self.assertIsNone(clipped[1])  # None entries pass through
    for c, t in zip(clipped, T_LIST):
      if t is not None:
        np.testing.assert_allclose(_np(c), _np(t) * 1.5 / max(n, 1.5), rtol=1e-6)
    np.testing.assert_allclose(float(norm), n, rtol=1e-6)

  def test_use_norm_replaces_the_computed_norm(self):
    clipped, norm = F.clip_by_global_norm(T_LIST, 1.0, use_norm=10.0)
    self.assertEqual(float(norm), 10.0)
    np.testing.assert_allclose(_np(clipped[0]), _np(T_LIST[0]) / 10.0, rtol=1e-6)
    clipped, _ = F.clip_by_global_norm(T_LIST, 1.0, use_norm=jnp.inf)
    self.assertTrue(np.isnan(_np(clipped[0])).all())  # TF: all NaN on inf norm

  def test_clip_by_norm_and_average_norm(self):
    t = T_LIST[0]
    n = np.sqrt((_np(t) ** 2).sum())
    np.testing.assert_allclose(_np(F.clip_by_norm(t, 1.0)), _np(t) / max(n, 1.0),
                               rtol=1e-6)
    rows = np.sqrt((_np(t) ** 2).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(_np(F.clip_by_norm(t, 1.0, axes=[1])),
                               _np(t) * 1.0 / np.maximum(rows, 1.0), rtol=1e-6)
    # TF v1: t * clip_norm * min(1 / clip_norm, n_element / l2norm(t))
    expected = _np(t) * 0.1 * min(1 / 0.1, t.size / n)
    np.testing.assert_allclose(_np(F.clip_by_average_norm(t, 0.1)), expected,
                               rtol=1e-6)
    out = F.clip_by_norm(T_LIST, 1.0)
    self.assertIsNone(out[1])

  def test_clip_by_value(self):
    out = F.clip_by_value(T_LIST, -0.5, 0.5)
    np.testing.assert_array_equal(_np(out[2]), np.clip(_np(T_LIST[2]), -0.5, 0.5))
    with pytest.raises(ValueError):
      F.clip_by_value(T_LIST, 1.0, 0.0)

  def test_same_numbers_as_the_transforms(self):
    g = {"a": T_LIST[0], "b": T_LIST[2]}
    for norm_type in (1.0, 2.0, np.inf):
      tx = gc.clip_by_global_norm(1.0, norm_type=norm_type)
      out_tx, state = tx.update(g, tx.init(g))
      out_f, norm = F.clip_by_global_norm(g, 1.0, norm_type=norm_type)
      chex.assert_trees_all_equal(out_tx, out_f)
      self.assertEqual(float(state.global_norm), float(norm))
    tx = gc.clip_by_norm(0.7, axes=0)
    chex.assert_trees_all_equal(tx.update(g, tx.init(g))[0], F.clip_by_norm(g, 0.7, 0))

  def test_bad_input(self):
    with pytest.raises(TypeError, match=r"\[1\]"):
      F.global_norm([jnp.ones(2), jnp.arange(2)])
    with pytest.raises(ValueError):
      F.clip_by_global_norm(T_LIST, -1.0)
    with pytest.raises(ValueError):
      F.global_norm(T_LIST, norm_type=-1)
    with pytest.raises(ValueError):
      F.clip_by_norm(T_LIST, -1.0)
