"""The rules inside Optax's combinators and Flax NNX's optimizer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gradclip_jax as gc

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
          "head": {"kernel": jnp.ones((2, 1))}}
GRADS = jax.tree.map(lambda p: 4.0 * p, PARAMS)  # global norm 4 * sqrt(10)


class CompositionTest(chex.TestCase):

  def test_chain_equals_manual_composition(self):
    tx = optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(0.5))
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    clipped, _ = gc.functional.clip_by_global_norm(GRADS, 1.0)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -0.5 * g, clipped))

  @chex.variants(with_jit=True, without_jit=True)
  def test_inject_hyperparams_changes_the_threshold(self):
    tx = optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=1.0)
    state = tx.init(PARAMS)
    update = self.variant(tx.update)
    out, state = update(GRADS, state)
    np.testing.assert_allclose(float(gc.functional.global_norm(out)), 1.0, rtol=1e-6)
    state.hyperparams["max_norm"] = jnp.asarray(3.0)
    out, state = update(GRADS, state)
    np.testing.assert_allclose(float(gc.functional.global_norm(out)), 3.0, rtol=1e-6)
    np.testing.assert_allclose(float(optax.tree_utils.tree_get(state, "global_norm")),
                               4.0 * np.sqrt(10), rtol=1e-6)
    for factory, kw in ((gc.clip_by_norm, dict(max_norm=0.5)),
                        (gc.clip_by_average_norm, dict(max_norm=0.1)),
                        (gc.clip_by_value, dict(min_value=-1.0, max_value=1.0))):
      injected = optax.inject_hyperparams(factory)(**kw)
      plain = factory(**kw)
      out, _ = self.variant(injected.update)(GRADS, injected.init(PARAMS))
      chex.assert_trees_all_close(out, plain.update(GRADS, plain.init(PARAMS))[0])

  def test_masked_clips_only_the_selected_leaves(self):
    mask = {"dense": {"kernel": True, "bias": False}, "head": {"kernel": False}}
    tx = optax.masked(gc.clip_by_global_norm(1.0), mask)
    out, _ = tx.update(GRADS, tx.init(PARAMS))
    np.testing.assert_allclose(float(jnp.linalg.norm(out["dense"]["kernel"])), 1.0,
                               rtol=1e-6)
    chex.assert_trees_all_equal(out["dense"]["bias"], GRADS["dense"]["bias"])
    chex.assert_trees_all_equal(out["head"], GRADS["head"])

  def test_multi_transform_gives_each_group_its_rule(self):
    labels = {"dense": {"kernel": "body", "bias": "body"}, "head": {"kernel": "head"}}
    tx = optax.multi_transform(
        {"body": optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(1.0)),
         "head": optax.chain(gc.clip_by_value(-0.5, 0.5), optax.sgd(1.0))}, labels)
    out, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    body = [out["dense"]["kernel"], out["dense"]["bias"]]
    np.testing.assert_allclose(float(gc.functional.global_norm(body)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["head"]["kernel"], -0.5 * jnp.ones((2, 1)))

  def test_multisteps_clips_the_accumulated_gradient(self):
    tx = optax.MultiSteps(optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(1.0)),
                          every_k_schedule=2)
    state = tx.init(PARAMS)
    out1, state = tx.update(GRADS, state, PARAMS)
    chex.assert_trees_all_equal(out1, jax.tree.map(jnp.zeros_like, PARAMS))
    out2, state = tx.update(jax.tree.map(lambda g: 3 * g, GRADS), state, PARAMS)
    # mean of (g, 3g) = 2g, clipped to norm 1
    np.testing.assert_allclose(float(gc.functional.global_norm(out2)), 1.0, rtol=1e-6)

  def test_apply_if_finite_wraps_a_clipped_chain(self):
    tx = optax.apply_if_finite(optax.chain(gc.clip_by_global_norm(1.0),
                                           optax.sgd(1.0)), max_consecutive_errors=2)
    state = tx.init(PARAMS)
    bad = jax.tree.map(lambda g: g * jnp.nan, GRADS)
    out, state = tx.update(bad, state, PARAMS)
    chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, PARAMS))
    out, state = tx.update(GRADS, state, PARAMS)
    np.testing.assert_allclose(float(gc.functional.global_norm(out)), 1.0, rtol=1e-6)

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
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))

    @nnx.jit
    def train_step(model, optimizer, x):
      grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
      optimizer.update(model, grads)

    train_step(model, optimizer, x)
    after = nnx.state(model, nnx.Param)
    delta = jax.tree.map(lambda a, b: a - b, after, before)
    # sgd(1.0) moves the parameters by exactly the clipped gradient: norm 0.01.
    np.testing.assert_allclose(float(gc.functional.global_norm(delta)), 0.01,
                               rtol=1e-4)
    self.assertGreater(
        float(optax.tree_utils.tree_get(optimizer.opt_state, "global_norm")), 0.01)


def test_inject_hyperparams_can_schedule_the_norm_type():
  """norm_type becomes a traced hyperparameter too; the kernel dispatches at run time."""
  tx = optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=1.0)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  for p in (2.0, 1.0, 3.0, np.inf):
    state.hyperparams["norm_type"] = jnp.asarray(p)
    _, state = update(GRADS, state)
    np.testing.assert_allclose(
        float(optax.tree_utils.tree_get(state, "global_norm")),
        float(gc.functional.global_norm(GRADS, p)), rtol=1e-5)
