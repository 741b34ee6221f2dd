"""The rules inside Optax's combinators and Flax NNX's optimizer.

Every expected value is computed here with NumPy (float64) from the formulas of the
rules' docstrings, never with another function of gradclip_jax.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gradclip_jax as gc

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
          "head": {"kernel": jnp.ones((2, 1))}}
GRADS = jax.tree.map(lambda p: 4.0 * p, PARAMS)  # 10 entries of 4: global norm 4 sqrt(10)
GRADS_NORM = 4.0 * np.sqrt(10.0)


def np_tree(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def np_norm(tree, p=2.0):
  """The Lp norm of all entries of ``tree`` together, in NumPy float64."""
  a = np.concatenate([np.abs(np.asarray(x, np.float64)).ravel()
                      for x in jax.tree.leaves(tree)])
  if p == np.inf:
    return float(a.max())
  return float((a ** p).sum() ** (1.0 / p))


def np_clip_global(tree, max_norm):
  """``g * min(1, max_norm / ||g||)`` over the whole tree (Pascanu et al., 2013)."""
  scale = min(1.0, max_norm / np_norm(tree))
  return jax.tree.map(lambda x: np.asarray(x, np.float64) * scale, tree)


def assert_tree_close(got, want, rtol=1e-6, atol=1e-7):
  chex.assert_trees_all_equal_structs(got, want)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), w, rtol=rtol,
                                                       atol=atol), got, want)


class CompositionTest(chex.TestCase):

  def test_chain_equals_manual_composition(self):
    tx = optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(0.5))
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    # Clipped to norm 1: every entry 4 / (4 sqrt(10)) = 1 / sqrt(10); sgd(0.5) negates
    # and halves.
    want = jax.tree.map(lambda g: -0.5 * np.full(g.shape, 1 / np.sqrt(10.0)), GRADS)
    assert_tree_close(updates, want)

  @chex.variants(with_jit=True, without_jit=True)
  def test_inject_hyperparams_changes_the_threshold(self):
    tx = optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=1.0)
    state = tx.init(PARAMS)
    update = self.variant(tx.update)
    out, state = update(GRADS, state)
    assert_tree_close(out, np_clip_global(GRADS, 1.0))
    state.hyperparams["max_norm"] = jnp.asarray(3.0)
    out, state = update(GRADS, state)
    assert_tree_close(out, np_clip_global(GRADS, 3.0))
    np.testing.assert_allclose(np_norm(out), 3.0, rtol=1e-6)
    np.testing.assert_allclose(float(optax.tree_utils.tree_get(state, "global_norm")),
                               GRADS_NORM, rtol=1e-6)
    g = np_tree(GRADS)
    per_leaf_norm = lambda x: np.linalg.norm(x.ravel())
    cases = (
        # tf.clip_by_norm per leaf: t * c / max(||t||, c).
        (gc.clip_by_norm, dict(max_norm=0.5),
         jax.tree.map(lambda x: x * 0.5 / max(per_leaf_norm(x), 0.5), g)),
        # tf.clip_by_average_norm: t * min(1, c * t.size / ||t||).
        (gc.clip_by_average_norm, dict(max_norm=0.1),
         jax.tree.map(lambda x: x * min(1.0, 0.1 * x.size / per_leaf_norm(x)), g)),
        (gc.clip_by_value, dict(min_value=-1.0, max_value=1.0),
         jax.tree.map(lambda x: np.clip(x, -1.0, 1.0), g)),
    )
    for factory, kw, want in cases:
      injected = optax.inject_hyperparams(factory)(**kw)
      out, _ = self.variant(injected.update)(GRADS, injected.init(PARAMS))
      assert_tree_close(out, want)

  def test_masked_clips_only_the_selected_leaves(self):
    mask = {"dense": {"kernel": True, "bias": False}, "head": {"kernel": False}}
    tx = optax.masked(gc.clip_by_global_norm(1.0), mask)
    out, _ = tx.update(GRADS, tx.init(GRADS))
    # Only dense/kernel (6 entries of 4, norm 4 sqrt(6)) is seen and clipped to norm 1.
    np.testing.assert_allclose(np.asarray(out["dense"]["kernel"]),
                               np.full((3, 2), 1 / np.sqrt(6.0)), rtol=1e-6)
    chex.assert_trees_all_equal(out["dense"]["bias"], GRADS["dense"]["bias"])
    chex.assert_trees_all_equal(out["head"], GRADS["head"])

  def test_multi_transform_gives_each_group_its_rule(self):
    labels = {"dense": {"kernel": "body", "bias": "body"}, "head": {"kernel": "head"}}
    tx = optax.multi_transform(
        {"body": optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(1.0)),
         "head": optax.chain(gc.clip_by_value(-0.5, 0.5), optax.sgd(1.0))}, labels)
    out, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    # body: 8 entries of 4 (norm 4 sqrt(8)) clipped to norm 1 -> each 1 / sqrt(8).
    body = 1 / np.sqrt(8.0)
    np.testing.assert_allclose(np.asarray(out["dense"]["kernel"]),
                               np.full((3, 2), -body), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["dense"]["bias"]), np.full(2, -body),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["head"]["kernel"]),
                                  np.full((2, 1), -0.5))

  def test_multisteps_clips_the_accumulated_gradient(self):
    tx = optax.MultiSteps(optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(1.0)),
                          every_k_schedule=2)
    state = tx.init(PARAMS)
    out1, state = tx.update(GRADS, state, PARAMS)
    chex.assert_trees_all_equal(out1, jax.tree.map(jnp.zeros_like, PARAMS))
    out2, state = tx.update(jax.tree.map(lambda g: 3 * g, GRADS), state, PARAMS)
    # mean of (g, 3g) = 2g: 10 entries of 8, clipped to norm 1 -> each 1 / sqrt(10).
    want = jax.tree.map(lambda g: np.full(g.shape, -1 / np.sqrt(10.0)), GRADS)
    assert_tree_close(out2, want)

  def test_apply_if_finite_wraps_a_clipped_chain(self):
    tx = optax.apply_if_finite(optax.chain(gc.clip_by_global_norm(1.0),
                                           optax.sgd(1.0)), max_consecutive_errors=2)
    state = tx.init(PARAMS)
    bad = jax.tree.map(lambda g: g * jnp.nan, GRADS)
    out, state = tx.update(bad, state, PARAMS)
    chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, PARAMS))
    self.assertEqual(int(state.notfinite_count), 1)
    out, state = tx.update(GRADS, state, PARAMS)
    assert_tree_close(out, jax.tree.map(lambda g: -g, np_clip_global(GRADS, 1.0)))
    self.assertEqual(int(state.notfinite_count), 0)

  def test_flax_nnx_optimizer(self):

    class Model(nnx.Module):

      def __init__(self, rngs):
        self.linear = nnx.Linear(4, 2, rngs=rngs)

      def __call__(self, x):
        return self.linear(x)

    model = Model(nnx.Rngs(0))
    tx = optax.chain(gc.clip_by_global_norm(0.01), optax.sgd(1.0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.ones((8, 4)) * 10
    loss = lambda m: jnp.mean(m(x) ** 2)
    before = np_tree(nnx.state(model, nnx.Param))
    grads = np_tree(nnx.grad(loss)(model))
    grad_norm = np_norm(grads)
    self.assertGreater(grad_norm, 0.01)

    @nnx.jit
    def train_step(model, optimizer, x):
      optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))

    train_step(model, optimizer, x)
    after = np_tree(nnx.state(model, nnx.Param))
    delta = jax.tree.map(lambda a, b: a - b, after, before)
    # sgd(1.0) moves the parameters by minus the gradient clipped to norm 0.01.
    want = jax.tree.map(lambda g: -g * 0.01 / grad_norm, grads)
    assert_tree_close(delta, want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        float(optax.tree_utils.tree_get(optimizer.opt_state, "global_norm")),
        grad_norm, rtol=1e-5)


def test_inject_hyperparams_can_schedule_the_norm_type():
  """norm_type becomes a traced hyperparameter too; the kernel dispatches at run time."""
  g = {"a": jnp.array([3.0, -4.0, 1.0]), "b": jnp.array([[2.0, -6.0]])}
  tx = optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=1.0)
  update = jax.jit(tx.update)
  state = tx.init(g)
  for p in (2.0, 1.0, 3.0, np.inf):
    state.hyperparams["norm_type"] = jnp.asarray(p)
    out, state = update(g, state)
    n = np_norm(g, p)  # sqrt(66), 16, 316**(1/3), 6
    np.testing.assert_allclose(float(optax.tree_utils.tree_get(state, "global_norm")),
                               n, rtol=1e-5)
    assert_tree_close(out, jax.tree.map(lambda x: np.asarray(x, np.float64) / n, g),
                      rtol=1e-5)
