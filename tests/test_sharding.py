"""Multi-device: GSPMD-sharded jit, and shard_map / pmap with an ``axis_name``.

tests/conftest.py asks XLA for 8 virtual CPU devices, so this runs on any machine.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import gradclip_jax as gc

try:
  from jax import shard_map  # jax >= 0.7
except ImportError:  # pragma: no cover - older jax
  from jax.experimental.shard_map import shard_map

N = 8
needs_8 = pytest.mark.skipif(jax.device_count() < N,
                             reason="needs 8 devices (XLA_FLAGS, see conftest.py)")


def grads(dtype=jnp.float32):
  rng = np.random.default_rng(3)
  return {"w": jnp.asarray(rng.normal(size=(16, 24)) * 3, dtype),
          "b": jnp.asarray(rng.normal(size=(8,)) * 3, dtype),
          "e": jnp.asarray(rng.normal(size=(32, 8)) * 3, dtype)}


RULES = {
    "global_norm": lambda **kw: gc.clip_by_global_norm(1.0, **kw),
    "global_l1": lambda **kw: gc.clip_by_global_norm(5.0, norm_type=1.0, **kw),
    "global_linf": lambda **kw: gc.clip_by_global_norm(0.5, norm_type=jnp.inf, **kw),
    "global_l3": lambda **kw: gc.clip_by_global_norm(1.0, norm_type=3.0, **kw),
}


@needs_8
@pytest.mark.parametrize("rule", sorted(RULES))
def test_gspmd_sharded_jit_equals_unsharded(rule):
  g = grads()
  tx = RULES[rule]()
  expected, expected_state = tx.update(g, tx.init(g))
  mesh = Mesh(np.array(jax.devices()[:N]).reshape(4, 2), ("data", "model"))
  specs = {"w": P("data", "model"), "b": P("data"), "e": P(None, "model")}
  sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in g.items()}
  out, state = jax.jit(tx.update)(sharded, tx.init(sharded))
  chex.assert_trees_all_close(out, expected, rtol=1e-6)
  np.testing.assert_allclose(float(state.global_norm),
                             float(expected_state.global_norm), rtol=1e-6)
  assert out["w"].sharding.is_equivalent_to(sharded["w"].sharding, 2)


@needs_8
@pytest.mark.parametrize("rule", sorted(RULES))
def test_shard_map_axis_name_gives_the_norm_of_the_whole(rule):
  """Each device holds a slice of every gradient; psum makes the norm global."""
  g = grads()
  expected, expected_state = RULES[rule]().update(g, RULES[rule]().init(g))
  mesh = Mesh(np.array(jax.devices()[:N]), ("x",))
  spec = {"w": P("x"), "b": P("x"), "e": P("x")}
  tx = RULES[rule](axis_name="x")

  @functools.partial(shard_map, mesh=mesh, in_specs=(spec,),
                     out_specs=(spec, P()))
  def clip(local):
    out, state = tx.update(local, tx.init(local))
    return out, state.global_norm

  out, norm = jax.jit(clip)(g)
  np.testing.assert_allclose(float(norm), float(expected_state.global_norm), rtol=1e-5)
  chex.assert_trees_all_close(out, expected, rtol=1e-5)

  # Without axis_name each device would clip by the norm of its own slice.
  local_tx = RULES[rule]()

  @functools.partial(shard_map, mesh=mesh, in_specs=(spec,), out_specs=spec)
  def clip_local(local):
    return local_tx.update(local, local_tx.init(local))[0]

  wrong = jax.jit(clip_local)(g)
  assert not np.allclose(np.asarray(wrong["w"]), np.asarray(expected["w"]))


@needs_8
def test_functional_global_norm_under_pmap():
  g = grads()
  per_device = jax.tree.map(lambda x: x.reshape(N, -1), g)
  norms = jax.pmap(lambda t: gc.functional.global_norm(t, axis_name="i"),
                   axis_name="i")(per_device)
  np.testing.assert_allclose(np.asarray(norms), float(gc.functional.global_norm(g)),
                             rtol=1e-5)


@needs_8
def test_data_parallel_step_with_replicated_params():
  """The usual DP set-up: batch sharded, params replicated, GSPMD inserts the psum."""
  mesh = Mesh(np.array(jax.devices()[:N]), ("batch",))
  params = {"w": jnp.ones((4, 2))}
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 4)), jnp.float32)
  tx = optax.chain(gc.clip_by_global_norm(0.1), optax.sgd(1.0))

  def step(params, state, x):
    g = jax.grad(lambda p: jnp.mean((x @ p["w"]) ** 2))(params)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  expected, _ = jax.jit(step)(params, tx.init(params), x)
  xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
  ps = jax.device_put(params, NamedSharding(mesh, P()))
  out, _ = jax.jit(step)(ps, tx.init(ps), xs)
  chex.assert_trees_all_close(out, expected, rtol=1e-6)
