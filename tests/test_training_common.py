"""Tests of gradclip_jax.training.common (shared by the PTB and classify trainers)."""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax
from gradclip_jax.training import common


def _grads():
  return {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.0, 12.0]])}  # global norm 13


def _apply(tx, grads, params=None):
  params = jax.tree.map(jnp.zeros_like, grads) if params is None else params
  state = tx.init(params)
  updates, new_state = tx.update(grads, state, params)
  return updates, state, new_state


def test_rules_listed():
  assert common.RULES[:3] == ("none", "global_norm", "value")
  for r in ("norm", "autoclip", "zclip", "adagc", "average_norm", "agc"):
    assert r in common.RULES


def test_build_clip_none_is_identity():
  g = _grads()
  updates, old, new = _apply(common.build_clip("none", None, 5.0), g)
  jax.tree.map(np.testing.assert_array_equal, updates, g)
  assert not common.clipped_this_step(old, new)


def test_build_clip_global_norm_uses_default_threshold():
  g = _grads()
  updates, old, new = _apply(common.build_clip("global_norm", None, 6.5), g)
  np.testing.assert_allclose(optax.tree.norm(updates), 6.5, rtol=1e-6)
  assert bool(common.clipped_this_step(old, new))
  # --clip-value overrides the config's threshold.
  updates, old, new = _apply(common.build_clip("global_norm", 100.0, 6.5), g)
  jax.tree.map(np.testing.assert_allclose, updates, g)
  assert not common.clipped_this_step(old, new)


def test_build_clip_value_norm_average_norm():
  g = _grads()
  upd, _, _ = _apply(common.build_clip("value", 2.0, 5.0), g)
  np.testing.assert_allclose(upd["a"], [2.0, 2.0])
  np.testing.assert_allclose(upd["b"], [[0.0, 2.0]])
  upd, _, _ = _apply(common.build_clip("norm", 1.0, 5.0), g)
  np.testing.assert_allclose(jnp.linalg.norm(upd["a"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(upd["b"]), 1.0, rtol=1e-6)
  tx = common.build_clip("average_norm", 1.0, 5.0)
  assert isinstance(tx, optax.GradientTransformation)
  _apply(tx, g)


def test_build_clip_uses_gradclip_jax(monkeypatch):
  calls = []

  def fake(v):
    calls.append(v)
    return optax.identity()

  monkeypatch.setattr(gradclip_jax, "clip_by_global_norm", fake)
  common.build_clip("global_norm", None, 5.0)
  assert calls == [5.0]


def test_build_clip_errors(monkeypatch):
  with pytest.raises(ValueError, match="unknown clipping rule"):
    common.build_clip("bogus", None, 1.0)
  with pytest.raises(ValueError, match="positive"):
    common.build_clip("global_norm", -1.0, 1.0)
  monkeypatch.delattr(gradclip_jax, "zclip", raising=False)
  with pytest.raises(NotImplementedError, match="gradclip_jax.zclip"):
    common.build_clip("zclip", None, 1.0)


@pytest.mark.parametrize("rule", ["autoclip", "zclip", "adagc", "agc"])
def test_build_clip_adaptive(rule):
  attr = {"agc": "adaptive_grad_clip"}.get(rule, rule)
  if not hasattr(gradclip_jax, attr):
    pytest.skip(f"gradclip_jax.{attr} not available yet")
  tx = common.build_clip(rule, None, 5.0)
  params = {"a": jnp.ones(2), "b": jnp.ones((1, 2))}
  updates, _, _ = _apply(tx, _grads(), params)  # params always passed
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_clipped_this_step_in_jit():
  tx = common.build_clip("global_norm", None, 1.0)
  params = jax.tree.map(jnp.zeros_like, _grads())

  @jax.jit
  def f(grads, state):
    _, new = tx.update(grads, state, params)
    return common.clipped_this_step(state, new), new

  state = tx.init(params)
  clipped, state = f(_grads(), state)
  assert bool(clipped)
  clipped, state = f(jax.tree.map(lambda x: x * 1e-3, _grads()), state)
  assert not bool(clipped)


def test_add_common_arguments_defaults():
  p = argparse.ArgumentParser()
  common.add_common_arguments(p)
  a = p.parse_args(["--data-dir", "d", "--workdir", "w"])
  assert (a.clip, a.clip_value, a.max_steps, a.max_epochs, a.seed, a.resume) == (
      "global_norm", None, None, None, 0, False)
  a = p.parse_args(["--data-dir", "d", "--workdir", "w", "--clip", "zclip", "--resume",
                    "--max-steps", "3", "--seed", "7", "--clip-value", "2.5"])
  assert (a.clip, a.clip_value, a.max_steps, a.seed, a.resume) == ("zclip", 2.5, 3, 7, True)
  with pytest.raises(SystemExit):
    p.parse_args(["--data-dir", "d", "--workdir", "w", "--clip", "bogus"])


def test_metrics_writer(tmp_path):
  w = common.MetricsWriter(tmp_path)
  w.write({"epoch": 1, "x": np.float32(1.5), "y": jnp.int32(3)})
  w.write({"epoch": 2, "x": 2.0})
  recs = common.MetricsWriter.read(tmp_path)
  assert recs == [{"epoch": 1, "x": 1.5, "y": 3}, {"epoch": 2, "x": 2.0}]
  # Re-creating with the records of a checkpoint rewrites the file.
  w2 = common.MetricsWriter(tmp_path, recs[:1])
  assert common.MetricsWriter.read(tmp_path) == recs[:1]
  assert w2.records == recs[:1]
  for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
    json.loads(line)


def test_checkpointer_roundtrip(tmp_path):
  n = common.num_data_devices(4)
  mesh = common.make_mesh(n)
  tx = optax.chain(gradclip_jax.clip_by_global_norm(1.0), optax.sgd(0.1))
  params = common.replicate({"w": jnp.arange(6.0).reshape(2, 3)}, mesh)
  state = {"params": params, "opt_state": tx.init(params),
           "carry": common.shard_batch(jnp.arange(8.0).reshape(4, 2), mesh),
           "key": jax.random.key_data(jax.random.key(1))}
  ck = common.Checkpointer(tmp_path)
  assert ck.restore(state) is None
  ck.save(3, state, {"epoch": 0})
  ck.save(3, state, {"epoch": 1, "acc": np.float64(0.1)})  # same step: replaced
  ck.close()
  ck = common.Checkpointer(tmp_path)
  assert ck.latest_step() == 3
  target = jax.tree.map(jnp.zeros_like, state)
  restored, meta = ck.restore(target)
  assert meta == {"epoch": 1, "acc": 0.1}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
  ck.close()


def test_num_data_devices():
  n = len(jax.devices())
  assert common.num_data_devices(20) == max(d for d in range(1, n + 1) if 20 % d == 0)
  assert common.num_data_devices(20, 1) == 1
  with pytest.raises(ValueError, match="does not divide"):
    common.num_data_devices(20, 3)
  with pytest.raises(ValueError, match="available"):
    common.num_data_devices(20, n + 100)


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs several devices")
def test_mesh_shard_and_replicate():
  mesh = common.make_mesh(2)
  x = common.shard_batch(jnp.ones((4, 3)), mesh)
  assert x.sharding.spec == jax.sharding.PartitionSpec(common.DATA_AXIS)
  r = common.replicate({"w": jnp.ones(3)}, mesh)
  assert r["w"].sharding.is_fully_replicated
  assert common.make_mesh(1) is None
  assert common.shard_batch(jnp.ones(2), None).shape == (2,)


def test_progress_bar_disabled_off_tty():
  bar = common.progress_bar(10, "x")
  bar.update(3)
  bar.set_postfix(wps="1")
  bar.close()
  assert common.progress_bar(5, disable=True).disable


def test_build_clip_adaptive_value_keyword(monkeypatch):
  seen = {}

  def fake(**kw):
    seen.update(kw)
    return optax.identity()

  monkeypatch.setattr(gradclip_jax, "zclip", fake, raising=False)
  common.build_clip("zclip", 3.0, 5.0)
  assert seen == {"z_threshold": 3.0}


def test_grad_norm_reuses_clip_state():
  g = _grads()
  assert float(common.grad_norm(g)) == pytest.approx(13.0)
  tx = common.build_clip("global_norm", None, 1.0)
  _, _, new = _apply(tx, g)
  assert float(common.grad_norm(g, new)) == pytest.approx(13.0)
  _, _, new = _apply(common.build_clip("value", 1.0, 1.0), g)
  assert float(common.grad_norm(g, new)) == pytest.approx(13.0)


def test_norm_before_update_keeps_every_bit():
  g = {"a": jnp.array([3.0, -0.0, jnp.inf, -jnp.inf]), "b": jnp.array([4.0], jnp.bfloat16),
       "c": jnp.array([jnp.nan, 1.0])}
  for state in (optax.identity().init(g), common.build_clip("value", 1.0, 1.0).init(g)):
    out, norm = jax.jit(common.norm_before_update)(g, state)
    assert np.isnan(float(norm))
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(out)):
      assert x.dtype == y.dtype
      np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
      np.testing.assert_array_equal(np.signbit(np.asarray(x, np.float32)),
                                    np.signbit(np.asarray(y, np.float32)))
  out, norm = common.norm_before_update(_grads(), optax.identity().init(_grads()))
  assert float(norm) == pytest.approx(13.0)
  # A rule that records the norm: nothing computed here, grad_norm reads the state.
  tx = common.build_clip("global_norm", None, 1.0)
  out, norm = common.norm_before_update(_grads(), tx.init(_grads()))
  assert norm is None
  jax.tree.map(np.testing.assert_array_equal, out, _grads())


def test_sgd_step_without_clipping_does_not_copy_donated_weights():
  """The reason for norm_before_update: XLA:CPU copied the weights at every step."""
  from gradclip_jax.training.ptb import configs, train  # pylint: disable=import-outside-toplevel
  import dataclasses  # pylint: disable=import-outside-toplevel
  config = dataclasses.replace(configs.get_config("test"), vocab_size=1000)
  model = train.build_model(config)
  tx = train.build_optimizer(config, common.build_clip("none", None, 1.0), 10)
  state = train.init_state(model, tx, config, 0)
  x = jnp.zeros((config.batch_size, config.num_steps), jnp.int32)
  hlo = train.make_train_step(model, tx).lower(state, x, x).compile().as_text()
  softmax_w = state["params"]["softmax_w"].shape
  shape = f"f32[{','.join(map(str, softmax_w))}]"
  copies = [l for l in hlo.splitlines() if " copy(" in l and f"= {shape}" in l]
  assert not copies, copies
