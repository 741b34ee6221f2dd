"""Trees of many small leaves: packed global norms and batched per-leaf rules.

``_norms.pack_small_leaves`` (global norms) and ``_norms.LeafGroups`` (per-leaf
rules) regroup small leaves so that XLA compiles a few kernels instead of several per
leaf. Regrouping must not change a single result: every test here compares against a
leaf-by-leaf NumPy reference, on trees that mix shapes, dtypes and reduction axes.
The compile-time effect itself is measured in ``benchmarks/clip_overhead.py``; the
structural test at the end checks that the HLO really has few reductions.
"""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradclip_jax as gc
from gradclip_jax import _norms
from gradclip_jax import functional as F


def _mixed_tree(seed=0, n=60):
  """n leaves: repeated small shapes in three dtypes, a scalar, an empty leaf."""
  rng = np.random.default_rng(seed)
  shapes = [(8, 4), (4,), (3, 2, 5), ()]
  dtypes = [jnp.float32, jnp.bfloat16, jnp.float16]
  tree = {}
  for i in range(n):
    shape, dtype = shapes[i % len(shapes)], dtypes[(i // 4) % len(dtypes)]
    tree[f"p{i:03d}"] = jnp.asarray(rng.normal(size=shape) * (1 + i % 7), dtype)
  tree["empty"] = jnp.zeros((0, 3), jnp.float32)
  return tree


def _np_leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _np_norm(tree, p=2.0):
  flat = np.concatenate([x.ravel() for x in _np_leaves(tree)])
  if p == math.inf:
    return np.abs(flat).max()
  return (np.abs(flat) ** p).sum() ** (1 / p)


class PackedGlobalNormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_reference_for_every_p(self):
    tree = _mixed_tree()
    for p in (1.0, 2.0, 3.0, math.inf):
      n = self.variant(lambda t, p=p: F.global_norm(t, p))(tree)
      np.testing.assert_allclose(float(n), _np_norm(tree, p), rtol=2e-6)

  def test_packing_regroups_small_leaves_only(self):
    big = jnp.ones((_norms._PACK_LEAF + 1,), jnp.float32)
    leaves = [big] + jax.tree.leaves(_mixed_tree(n=12))
    packed = _norms.pack_small_leaves(leaves)
    self.assertIs(packed[0], big)  # large leaves are not copied
    # One flat chunk per dtype (f32 with the empty leaf, bf16, f16).
    self.assertEqual(len(packed), 4)
    self.assertEqual(sum(x.size for x in packed), sum(x.size for x in leaves))

  def test_chunks_are_bounded(self):
    old = _norms._PACK_CHUNK
    _norms._PACK_CHUNK = 50
    try:
      tree = _mixed_tree()
      leaves = jax.tree.leaves(tree)
      packed = _norms.pack_small_leaves(leaves)
      self.assertGreater(len(packed), 3)
      # A chunk only exceeds the bound when one leaf alone does.
      self.assertTrue(all(x.size <= 50 for x in packed))
      np.testing.assert_allclose(float(F.global_norm(tree)), _np_norm(tree), rtol=2e-6)
    finally:
      _norms._PACK_CHUNK = old

  def test_overflow_rescue_and_nonfinite_still_work_when_packed(self):
    tree = {f"a{i}": jnp.full((5,), 1e30, jnp.float32) for i in range(20)}
    np.testing.assert_allclose(float(F.global_norm(tree)), 1e30 * 10, rtol=1e-5)
    tree["a7"] = tree["a7"].at[2].set(jnp.nan)
    self.assertTrue(np.isnan(float(F.global_norm(tree))))
    tree["a7"] = tree["a7"].at[2].set(jnp.inf)
    self.assertEqual(float(F.global_norm(tree)), math.inf)

  def test_global_clip_of_many_leaves_keeps_dtypes_and_bound(self):
    tree = _mixed_tree()
    tx = gc.clip_by_global_norm(1.0)
    out, state = tx.update(tree, tx.init(tree))
    np.testing.assert_allclose(float(state.global_norm), _np_norm(tree), rtol=2e-6)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
      self.assertEqual(a.dtype, b.dtype)
    self.assertLessEqual(float(F.global_norm(out)), 1.0 * (1 + 1e-2))


class GroupedPerLeafRulesTest(chex.TestCase):

  def test_groups_batch_same_shape_dtype_and_axes(self):
    leaves = [jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.ones((4, 3), jnp.bfloat16),
              jnp.ones((4, 3)), jnp.ones((5,))]
    groups = _norms.LeafGroups(leaves, [None, None, None, -1, None])
    self.assertEqual(groups.members, [[0, 1], [2], [3], [4]])
    self.assertEqual(groups.reduce_axes(0), (1, 2))
    self.assertEqual(groups.reduce_axes(2), (2,))  # axis -1 of the leaf
    self.assertEqual(groups.unstack(groups.stack(leaves))[3].shape, (4, 3))

  @chex.variants(with_jit=True, without_jit=True)
  def test_leaf_norms_match_reference(self):
    tree = _mixed_tree()
    leaves = jax.tree.leaves(tree)
    for axes in (None, -1, 0):
      per_leaf = [None if axes is None or x.ndim == 0 else axes for x in leaves]
      got = self.variant(lambda ls, a=tuple(per_leaf): _norms.leaf_norms(ls, list(a)))(
          leaves)
      for x, a, n in zip(_np_leaves(tree), per_leaf, got):
        ref = np.sqrt((x ** 2).sum(axis=a, keepdims=True))
        np.testing.assert_allclose(np.asarray(n, np.float64), ref, rtol=2e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_clip_by_norm_per_leaf_thresholds(self):
    tree = _mixed_tree()
    names = sorted(tree)
    max_norm = {k: 0.5 + (i % 5) for i, k in enumerate(names)}
    out = self.variant(lambda t: F.clip_by_norm(t, max_norm))(tree)
    for k in names:
      x = np.asarray(tree[k], np.float64)
      n = np.sqrt((x ** 2).sum())
      ref = x * min(1.0, max_norm[k] / n) if n > 0 else x
      np.testing.assert_allclose(np.asarray(out[k], np.float64), ref,
                                 rtol=1e-2 if tree[k].dtype != jnp.float32 else 1e-5,
                                 atol=1e-6)
      self.assertEqual(out[k].dtype, tree[k].dtype)

  @chex.variants(with_jit=True, without_jit=True)
  def test_clip_by_average_norm(self):
    tree = {f"w{i}": jnp.full((3, 4), float(i), jnp.float32) for i in range(10)}
    out = self.variant(lambda t: F.clip_by_average_norm(t, 0.5))(tree)
    for i in range(10):
      n = i * math.sqrt(12)
      expected = i * min(1.0, 0.5 * 12 / n) if n else 0.0
      np.testing.assert_allclose(np.asarray(out[f"w{i}"]), expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_agc_matches_unitwise_reference(self):
    rng = np.random.default_rng(1)
    params = {f"k{i}": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
              for i in range(12)}
    params.update({f"b{i}": jnp.asarray(rng.normal(size=(3,)), jnp.float32)
                   for i in range(12)})
    grads = jax.tree.map(lambda w: w * (1 + 0.1 * rng.normal(size=w.shape)).astype(
        np.float32), params)
    tx = gc.adaptive_grad_clip(0.05)
    out, state = self.variant(tx.update)(grads, tx.init(params), params)
    ratios = []
    for k in params:
      g, w = np.asarray(grads[k], np.float64), np.asarray(params[k], np.float64)
      axes = 0 if g.ndim == 2 else None
      gn = np.sqrt((g ** 2).sum(axis=axes, keepdims=True))
      wn = np.maximum(np.sqrt((w ** 2).sum(axis=axes, keepdims=True)), 1e-3)
      ratios.append((gn / wn).max())
      ref = g * np.minimum(1.0, 0.05 * wn / gn)
      np.testing.assert_allclose(np.asarray(out[k]), ref, rtol=1e-5)
    np.testing.assert_allclose(float(state.max_ratio), max(ratios), rtol=1e-5)

  def test_adagc_matches_leaf_by_leaf_reference(self):
    rng = np.random.default_rng(2)
    shapes = [(4, 2), (4, 2), (3,), (4, 2), (3,)]
    steps = [{f"t{i}": jnp.asarray(rng.normal(size=s) * (10 if t == 3 else 1),
                                   jnp.float32) for i, s in enumerate(shapes)}
             for t in range(5)]
    tx = gc.adagc(lambda_abs=2.0, lambda_rel=1.1, beta=0.5, warmup_steps=2)
    state = tx.init(steps[0])
    gamma = {k: math.inf for k in steps[0]}
    for t, g in enumerate(steps):
      out, state = tx.update(g, state)
      total = math.sqrt(sum(float((np.asarray(x, np.float64) ** 2).sum())
                            for x in g.values()))
      for k, x in g.items():
        x = np.asarray(x, np.float64)
        n = math.sqrt((x ** 2).sum())
        if t < 2:
          scale = min(1.0, 2.0 / total)
          gamma[k] = min(gamma[k], n * scale)
        else:
          scale = min(1.0, 1.1 * gamma[k] / n)
          gamma[k] = 0.5 * gamma[k] + 0.5 * n * scale
        np.testing.assert_allclose(np.asarray(out[k]), x * scale, rtol=1e-5)
        np.testing.assert_allclose(float(state.gamma[k]), gamma[k], rtol=1e-5)


class FewKernelsTest(chex.TestCase):
  """200 same-shape leaves must not give 200 reductions (compile time, see above)."""

  def _num_reductions(self, tx, tree):
    def step(g, s, p):
      return tx.update(g, s, p)
    text = jax.jit(step).lower(tree, tx.init(tree), tree).as_text()
    return len(re.findall(r"stablehlo\.reduce[ (]", text))

  def test_reductions_do_not_grow_with_the_leaf_count(self):
    tree = {f"l{i:03d}": jnp.ones((16, 8), jnp.float32) for i in range(200)}
    for tx in (gc.clip_by_global_norm(1.0), gc.clip_by_norm(1.0),
               gc.adaptive_grad_clip(0.01), gc.adagc()):
      self.assertLess(self._num_reductions(tx, tree), 20)
    # The reference point: Optax reduces every leaf separately.
    self.assertGreaterEqual(
        self._num_reductions(optax.clip_by_global_norm(1.0), tree), 200)
