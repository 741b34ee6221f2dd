"""Tests of the pieces the PTB and classify trainers share (clip, flags, metrics,
checkpoints, mesh)."""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax
from gradclip_jax.training import checkpoints, clip, flags, metrics
from gradclip_jax.training import mesh as mesh_lib


def _grads():
  return {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.0, 12.0]])}  # global norm 13


def _apply(tx, grads, params=None):
  params = jax.tree.map(jnp.zeros_like, grads) if params is None else params
  state = tx.init(params)
  updates, new_state = tx.update(grads, state, params)
  return updates, state, new_state


def test_rules_listed():
  assert clip.RULES[:3] == ("none", "global_norm", "value")
  for r in ("norm", "autoclip", "zclip", "adagc", "average_norm", "agc"):
    assert r in clip.RULES


def test_build_clip_none_is_identity():
  g = _grads()
  updates, old, new = _apply(clip.build_clip("none", None, 5.0), g)
  jax.tree.map(np.testing.assert_array_equal, updates, g)
  assert not clip.clipped_this_step(old, new)


def test_build_clip_global_norm_uses_default_threshold():
  g = _grads()
  updates, old, new = _apply(clip.build_clip("global_norm", None, 6.5), g)
  np.testing.assert_allclose(optax.tree.norm(updates), 6.5, rtol=1e-6)
  assert bool(clip.clipped_this_step(old, new))
  # --clip-value overrides the config's threshold.
  updates, old, new = _apply(clip.build_clip("global_norm", 100.0, 6.5), g)
  jax.tree.map(np.testing.assert_allclose, updates, g)
  assert not clip.clipped_this_step(old, new)


def test_build_clip_value_norm_average_norm():
  g = _grads()
  upd, _, _ = _apply(clip.build_clip("value", 2.0, 5.0), g)
  np.testing.assert_allclose(upd["a"], [2.0, 2.0])
  np.testing.assert_allclose(upd["b"], [[0.0, 2.0]])
  upd, _, _ = _apply(clip.build_clip("norm", 1.0, 5.0), g)
  np.testing.assert_allclose(jnp.linalg.norm(upd["a"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(upd["b"]), 1.0, rtol=1e-6)
  tx = clip.build_clip("average_norm", 1.0, 5.0)
  assert isinstance(tx, optax.GradientTransformation)
  _apply(tx, g)


def test_build_clip_uses_gradclip_jax(monkeypatch):
  calls = []

  def fake(v):
    calls.append(v)
    return optax.identity()

  monkeypatch.setattr(gradclip_jax, "clip_by_global_norm", fake)
  clip.build_clip("global_norm", None, 5.0)
  assert calls == [5.0]


def test_build_clip_errors():
  with pytest.raises(ValueError, match="unknown clipping rule"):
    clip.build_clip("bogus", None, 1.0)
  with pytest.raises(ValueError, match="positive"):
    clip.build_clip("global_norm", -1.0, 1.0)


@pytest.mark.parametrize("rule", ["autoclip", "zclip", "adagc", "agc"])
def test_build_clip_adaptive(rule):
  tx = clip.build_clip(rule, None, 5.0)
  params = {"a": jnp.ones(2), "b": jnp.ones((1, 2))}
  updates, _, _ = _apply(tx, _grads(), params)  # params always passed
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_clipped_this_step_in_jit():
  tx = clip.build_clip("global_norm", None, 1.0)
  params = jax.tree.map(jnp.zeros_like, _grads())

  @jax.jit
  def f(grads, state):
    _, new = tx.update(grads, state, params)
    return clip.clipped_this_step(state, new), new

  state = tx.init(params)
  clipped, state = f(_grads(), state)
  assert bool(clipped)
  clipped, state = f(jax.tree.map(lambda x: x * 1e-3, _grads()), state)
  assert not bool(clipped)


def test_add_common_arguments_defaults():
  p = argparse.ArgumentParser()
  flags.add_common_arguments(p)
  a = p.parse_args(["--data-dir", "d", "--workdir", "w"])
  assert (a.clip, a.clip_value, a.max_steps, a.max_epochs, a.seed, a.resume) == (
      "global_norm", None, None, None, 0, False)
  a = p.parse_args(["--data-dir", "d", "--workdir", "w", "--clip", "zclip", "--resume",
                    "--max-steps", "3", "--seed", "7", "--clip-value", "2.5"])
  assert (a.clip, a.clip_value, a.max_steps, a.seed, a.resume) == ("zclip", 2.5, 3, 7, True)
  with pytest.raises(SystemExit):
    p.parse_args(["--data-dir", "d", "--workdir", "w", "--clip", "bogus"])


def test_metrics_writer(tmp_path):
  w = metrics.MetricsWriter(tmp_path)
  w.write({"epoch": 1, "x": np.float32(1.5), "y": jnp.int32(3)})
  w.write({"epoch": 2, "x": 2.0})
  recs = metrics.MetricsWriter.read(tmp_path)
  assert recs == [{"epoch": 1, "x": 1.5, "y": 3}, {"epoch": 2, "x": 2.0}]
  # Re-creating with the records of a checkpoint rewrites the file.
  w2 = metrics.MetricsWriter(tmp_path, recs[:1])
  assert metrics.MetricsWriter.read(tmp_path) == recs[:1]
  assert w2.records == recs[:1]
  for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
    json.loads(line)


def test_checkpointer_roundtrip(tmp_path):
  n = mesh_lib.num_data_devices(4)
  mesh = mesh_lib.make_mesh(n)
  tx = optax.chain(gradclip_jax.clip_by_global_norm(1.0), optax.sgd(0.1))
  params = mesh_lib.replicate({"w": jnp.arange(6.0).reshape(2, 3)}, mesh)
  state = {"params": params, "opt_state": tx.init(params),
           "carry": mesh_lib.shard_batch(jnp.arange(8.0).reshape(4, 2), mesh),
           "key": jax.random.key_data(jax.random.key(1))}
  ck = checkpoints.Checkpointer(tmp_path)
  assert ck.restore(state) is None
  ck.save(3, state, {"epoch": 0})
  ck.save(3, state, {"epoch": 1, "acc": np.float64(0.1)})  # same step: replaced
  ck.close()
  ck = checkpoints.Checkpointer(tmp_path)
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
  assert mesh_lib.num_data_devices(20) == max(d for d in range(1, n + 1) if 20 % d == 0)
  assert mesh_lib.num_data_devices(20, 1) == 1
  with pytest.raises(ValueError, match="does not divide"):
    mesh_lib.num_data_devices(20, 3)
  with pytest.raises(ValueError, match="available"):
    mesh_lib.num_data_devices(20, n + 100)


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs several devices")
def test_mesh_shard_and_replicate():
  mesh = mesh_lib.make_mesh(2)
  x = mesh_lib.shard_batch(jnp.ones((4, 3)), mesh)
  assert x.sharding.spec == jax.sharding.PartitionSpec(mesh_lib.DATA_AXIS)
  r = mesh_lib.replicate({"w": jnp.ones(3)}, mesh)
  assert r["w"].sharding.is_fully_replicated
  assert mesh_lib.make_mesh(1) is None
  assert mesh_lib.shard_batch(jnp.ones(2), None).shape == (2,)


def test_progress_bar_disabled_off_tty():
  bar = metrics.progress_bar(10, "x")
  bar.update(3)
  bar.set_postfix(wps="1")
  bar.close()
  assert metrics.progress_bar(5, disable=True).disable


def test_build_clip_adaptive_value_keyword(monkeypatch):
  seen = {}

  def fake(**kw):
    seen.update(kw)
    return optax.identity()

  monkeypatch.setattr(gradclip_jax, "zclip", fake, raising=False)
  clip.build_clip("zclip", 3.0, 5.0)
  assert seen == {"z_threshold": 3.0}


def test_grad_norm_reuses_clip_state():
  g = _grads()
  assert float(clip.grad_norm(g)) == pytest.approx(13.0)
  tx = clip.build_clip("global_norm", None, 1.0)
  _, _, new = _apply(tx, g)
  assert float(clip.grad_norm(g, new)) == pytest.approx(13.0)
  _, _, new = _apply(clip.build_clip("value", 1.0, 1.0), g)
  assert float(clip.grad_norm(g, new)) == pytest.approx(13.0)


def test_update_with_norm_logs_the_pre_clip_norm():
  g = _grads()  # global norm 13
  for tx in (clip.build_clip("global_norm", None, 1.0), clip.build_clip("none", None, 1.0),
             clip.build_clip("value", 1.0, 1.0)):
    updates, _, norm = jax.jit(lambda g, s, tx=tx: clip.update_with_norm(tx, g, s, g))(
        g, tx.init(g))
    assert float(norm) == pytest.approx(13.0)


# ---------------------------------------------------------------------------
# Workdir policy, resume check, run options, flags, multi-host rows.
# ---------------------------------------------------------------------------


def test_prepare_workdir(tmp_path):
  from gradclip_jax.training.errors import UsageError  # pylint: disable=import-outside-toplevel
  fresh = tmp_path / "fresh"
  checkpoints.prepare_workdir(fresh, resume=False, overwrite=False)  # nothing there: fine
  assert not fresh.exists()
  w = tmp_path / "used"
  (w / "checkpoints" / "3").mkdir(parents=True)
  (w / "metrics.jsonl").write_text("{}\n")
  (w / "member-0").mkdir()
  (w / "data_cache").mkdir()
  (w / "notes.txt").write_text("mine")
  with pytest.raises(UsageError, match=r"holds a run \(checkpoints, metrics.jsonl, "
                     r"member-0\): continue it with --resume, or start afresh with "
                     r"--overwrite"):
    checkpoints.prepare_workdir(w, resume=False, overwrite=False)
  checkpoints.prepare_workdir(w, resume=True, overwrite=False)
  assert (w / "checkpoints" / "3").is_dir()
  with pytest.raises(UsageError, match="give one of them"):
    checkpoints.prepare_workdir(w, resume=True, overwrite=True)
  checkpoints.prepare_workdir(w, resume=False, overwrite=True)
  assert sorted(p.name for p in w.iterdir()) == ["data_cache", "notes.txt"]
  (tmp_path / "file").write_text("x")
  with pytest.raises(UsageError, match="is a file"):
    checkpoints.prepare_workdir(tmp_path / "file", resume=False, overwrite=False)


def test_check_resume_config_names_the_changed_fields():
  from gradclip_jax.training.errors import UsageError  # pylint: disable=import-outside-toplevel
  saved = {"seed": 0, "hparams": {"hidden_size": 2, "pooling": ["last"]}, "dp": None}
  checkpoints.check_resume_config(saved, {"seed": 0, "dp": None,
                                          "hparams": {"hidden_size": 2,
                                                      "pooling": ("last",)}})
  with pytest.raises(UsageError, match=r"hparams.hidden_size: 2 in the checkpoint, 3 now; "
                     r"seed: 0 in the checkpoint, 1 now\)"):
    checkpoints.check_resume_config(saved, {"seed": 1, "dp": None,
                                            "hparams": {"hidden_size": 3,
                                                        "pooling": ("last",)}})
  with pytest.raises(UsageError, match="records no config"):
    checkpoints.check_resume_config(None, saved)


def test_run_options_refuse_bad_values(tmp_path):
  from gradclip_jax.training.dp import DPFlags  # pylint: disable=import-outside-toplevel
  from gradclip_jax.training.errors import UsageError  # pylint: disable=import-outside-toplevel
  from gradclip_jax.training.options import RunOptions  # pylint: disable=import-outside-toplevel
  ok = RunOptions(data_dir=str(tmp_path))
  assert ok.data_dir == tmp_path and ok.clip == "global_norm"
  for kwargs, message in (({"clip": "bogus"}, "unknown clipping rule"),
                          ({"clip_value": -1.0}, "--clip-value must be positive"),
                          ({"clip_value": float("inf")}, "--clip-value must be positive"),
                          ({"max_steps": 0}, "--max-steps must be an integer >= 1"),
                          ({"checkpoint_every": -1}, "--checkpoint-every"),
                          ({"clip": "dp"}, "clip='dp' goes with dp="),
                          ({"dp": DPFlags(noise_multiplier=1.0)}, "clip='dp' goes with")):
    with pytest.raises(UsageError, match=message):
      RunOptions(data_dir=tmp_path, **kwargs)
  dp = RunOptions(data_dir=tmp_path, clip="dp", dp=DPFlags(noise_multiplier=1.0))
  desc = dp.describe()
  assert desc["dp"]["noise_multiplier"] == 1.0 and "max_steps" not in desc
  assert "data_dir" not in desc and "num_devices" not in desc


def test_parser_suggests_and_never_abbreviates(capsys):
  p = flags.ArgumentParser(prog="gradclip ptb")
  p.add_argument("--max-steps", type=flags.positive_int)
  p.add_argument("--max-epochs", type=flags.positive_int)
  args, extra = p.parse_known_args(["--max-step", "3"])
  assert args.max_steps is None and extra == ["--max-step", "3"]
  with pytest.raises(SystemExit) as e:
    p.unknown_arguments(extra)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "usage: gradclip ptb" in err and "did you mean --max-steps?" in err
  assert flags.suggest_flag(p, "--zzz") is None
  with pytest.raises(SystemExit):
    p.parse_args(["--max-steps", "-2"])
  assert "must be >= 1, got -2" in capsys.readouterr().err


def test_process_rows_of_each_process(monkeypatch):
  """Two processes of four devices each: process 1 feeds rows 8-15 of a batch of 16."""

  class FakeDevice:
    def __init__(self, process_index):
      self.process_index = process_index

  class FakeMesh:
    devices = np.array([FakeDevice(i // 4) for i in range(8)])
    size = 8

  for process, rows in ((0, slice(0, 8)), (1, slice(8, 16))):
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    assert mesh_lib.process_rows(16, FakeMesh()) == rows
  FakeMesh.devices = np.array([FakeDevice(i % 2) for i in range(8)])  # interleaved
  with pytest.raises(ValueError, match="not contiguous"):
    mesh_lib.process_rows(16, FakeMesh())


def test_shard_batch_places_rows_on_the_mesh():
  m = mesh_lib.make_mesh(4)
  x = np.arange(8 * 3).reshape(8, 3)
  a = mesh_lib.shard_batch({"x": x}, m)["x"]
  assert a.shape == (8, 3) and len(a.sharding.device_set) == 4
  for shard in a.addressable_shards:
    np.testing.assert_array_equal(shard.data, x[shard.index])
  np.testing.assert_array_equal(mesh_lib.to_host(a), x)


def test_train_loop_refuses_a_checkpoint_of_another_layout(tmp_path):
  """A checkpoint written before the shared loop (its meta has no ``epoch_seconds``) is
  refused with a UsageError naming --overwrite, not an Orbax traceback."""
  from gradclip_jax.training.errors import UsageError  # pylint: disable=import-outside-toplevel
  from gradclip_jax.training.loop import Task, TrainLoop  # pylint: disable=C0415
  from gradclip_jax.training.options import RunOptions  # pylint: disable=C0415
  ck = checkpoints.Checkpointer(tmp_path)
  ck.save(3, {"w": jnp.zeros(2)}, {"epoch": 0, "pos": 3, "global_step": 3,
                                   "config": {"seed": 0}})
  ck.close()
  loop = TrainLoop(tmp_path, {"seed": 0}, RunOptions(data_dir=tmp_path),
                   steps_per_epoch=4, max_epochs=1)
  with pytest.raises(UsageError, match="older gradclip.*--overwrite"):
    loop.restore(Task(), {"w": jnp.zeros(2)})
  loop.close()
