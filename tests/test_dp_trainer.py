"""Tests of the DP-SGD trainers: ``gradclip classify --dp`` and ``gradclip ptb --dp``."""
from __future__ import annotations

import contextlib
import io
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax
from gradclip_jax.training import cli, flags
from gradclip_jax.training import mesh as mesh_lib
from gradclip_jax.training import dp as dp_lib
from gradclip_jax.training.metrics import MetricsWriter
from gradclip_jax.training.classify import configs, input_pipeline
from gradclip_jax.training.classify import train as classify_train
from gradclip_jax.training.ptb import input_pipeline as ptb_input
from gradclip_jax.training.ptb import train as ptb_train

pytest.importorskip("dp_accounting")
from gradclip_jax.dp import accounting  # noqa: E402  pylint: disable=wrong-import-position


def _classify(workdir, data_dir, cache_dir, *extra) -> int:
  # MR, smoke config, 64 examples per split: 4 steps of 16 per epoch. The bag-of-
  # embeddings model compiles fastest (the LSTM is checked in the step test below).
  return cli.main(["classify", "--no-progress", "--dataset", "mr", "--config", "smoke",
                   "--data-dir", str(data_dir / "rt-polarity"), "--cache-dir",
                   str(cache_dir), "--workdir", str(workdir), "--num-devices", "1",
                   "--set", "max_examples=64", "--set", "num_layers=0", "--set",
                   "pooling=mean,max", *extra])


def _records(workdir):
  return MetricsWriter.read(workdir)


@pytest.fixture(scope="module")
def target_output(shared_data_dir, cache_dir, tmp_path_factory):
  """Three epochs with the noise multiplier derived from --target-epsilon 4: the workdir
  and what the run printed."""
  workdir = tmp_path_factory.mktemp("dp_target")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert _classify(workdir, shared_data_dir, cache_dir, "--max-epochs", "3", "--dp",
                     "--target-epsilon", "4", "--delta", "1e-5", "--dp-max-norm", "0.5",
                     "--clip", "none") == 0
  return workdir, out.getvalue()


@pytest.fixture(scope="module")
def target_run(target_output):
  return target_output[0]


def _draw_sizes(seed, n, b, steps):
  """The Poisson batch sizes of steps ``0..steps-1`` (the sampler's documented stream:
  ``default_rng([seed, step, 0x504F4953])``, every example with probability b / n)."""
  return [int(np.sum(np.random.default_rng([seed, t, 0x504F4953]).random(n) < b / n))
          for t in range(steps)]


def test_classify_dp_logs_epsilon_per_epoch(target_run):
  records = _records(target_run)
  result = json.loads((target_run / "results.json").read_text())
  dp = result["dp"]
  assert [r["epoch"] for r in records] == [1, 2, 3]
  assert [r["step"] for r in records] == [4, 8, 12]
  assert dp["batch_size"] == 16 and dp["dataset_size"] == 64 and dp["planned_steps"] == 12
  q = dp["batch_size"] / dp["dataset_size"]
  sigma = records[0]["noise_multiplier"]
  for r in records:
    assert (r["dp_max_norm"], r["delta"], r["noise_multiplier"]) == (0.5, 1e-5, sigma)
    assert r["epsilon"] == pytest.approx(accounting.epsilon_spent(sigma, q, r["step"], 1e-5),
                                         rel=1e-9)
    assert 0 <= r["clip_fraction"] <= 1 and r["grad_norm_mean"] > 0
  eps = [r["epsilon"] for r in records]
  assert eps[0] < eps[1] < eps[2]
  # Derived from the target: the planned run spends at most (and nearly) epsilon 4.
  assert sigma == pytest.approx(accounting.noise_multiplier_for_epsilon(4.0, 1e-5, q, 12))
  assert 3.9 < eps[-1] <= 4.0
  assert result["dp"]["epsilon"] == eps[-1] and result["clip"] == "dp"
  # Each record's realized batch sizes are those of the epoch's Poisson draws.
  sizes = _draw_sizes(0, 64, 16, 12)
  for e, r in enumerate(records):
    mine = sizes[4 * e:4 * e + 4]
    assert r["dp_sampling"] == "poisson" and result["dp"]["dp_sampling"] == "poisson"
    assert (r["batch_size_min"], r["batch_size_max"]) == (min(mine), max(mine))
    assert r["batch_size_mean"] == pytest.approx(np.mean(mine), rel=1e-12)


def test_accountant_event_matches_the_sampler(target_run):
  """results.json: the sampler that ran and the event accounted agree (rate, steps, no
  truncation), and dp_accounting, given that event, gives the epsilon recorded."""
  import dp_accounting  # pylint: disable=import-outside-toplevel
  from dp_accounting import rdp  # pylint: disable=import-outside-toplevel
  dp = json.loads((target_run / "results.json").read_text())["dp"]
  sampler, acct = dp["sampler"], dp["accountant"]
  assert sampler["kind"] == "poisson" and sampler["sample_rate"] == 16 / 64
  assert sampler["dataset_size"] == 64 and sampler["steps_per_epoch"] == 64 // 16
  assert "no example dropped" in sampler["overflow"] and sampler["capacity"] >= 16
  event = acct["event"]
  assert event["class_name"] == "SelfComposedDpEvent" and event["count"] == 12
  assert event["event"]["class_name"] == "PoissonSampledDpEvent"  # not truncated
  assert event["event"]["sampling_probability"] == sampler["sample_rate"]
  assert event["event"]["event"] == {"class_name": "GaussianDpEvent",
                                     "noise_multiplier": dp["noise_multiplier"]}
  assert acct["neighboring_relation"] == "ADD_OR_REMOVE_ONE" and acct["delta"] == 1e-5
  acc = rdp.RdpAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      16 / 64, dp_accounting.GaussianDpEvent(dp["noise_multiplier"])), 12))
  assert acc.get_epsilon(1e-5) == pytest.approx(dp["epsilon"], rel=1e-12)
  assert acct["epsilon"] == dp["epsilon"]


def test_printed_epsilon_matches_the_accountant(target_output):
  """Every epsilon the run prints is gradclip_jax.dp.accounting's for the steps run."""
  workdir, out = target_output
  sigma = _records(workdir)[0]["noise_multiplier"]
  printed = [(int(e), float(eps)) for e, eps in
             re.findall(r"^epoch (\d+): .* epsilon (\d+\.\d+)", out, flags=re.M)]
  assert [e for e, _ in printed] == [1, 2, 3]
  for e, eps in printed:
    assert eps == round(accounting.epsilon_spent(sigma, 16 / 64, 4 * e, 1e-5), 3)
  planned = re.search(r"^DP-SGD: noise multiplier (\d+\.\d+), .*Poisson sampling.* "
                      r"epsilon (\d+\.\d+) after the planned 12 steps", out, flags=re.M)
  assert float(planned[1]) == round(sigma, 4)
  assert float(planned[2]) == round(accounting.epsilon_spent(sigma, 0.25, 12, 1e-5), 3)


def test_classify_dp_resume_reproduces_the_run(target_run, shared_data_dir, cache_dir,
                                               tmp_path, capsys):
  args = ["--max-epochs", "3", "--dp", "--target-epsilon", "4", "--dp-max-norm", "0.5"]
  assert _classify(tmp_path, shared_data_dir, cache_dir, *args, "--max-steps", "6") == 0
  partial = _records(tmp_path)
  assert partial[-1]["partial"] and partial[-1]["step"] == 6
  assert _classify(tmp_path, shared_data_dir, cache_dir, *args, "--resume") == 0
  strip = lambda rs: [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rs]
  assert strip(_records(tmp_path)) == strip(_records(target_run))
  # Other DP settings than the checkpoint's: refused, nothing touched.
  before = (tmp_path / "metrics.jsonl").read_bytes()
  assert _classify(tmp_path, shared_data_dir, cache_dir, "--max-epochs", "3", "--dp",
                   "--noise-multiplier", "3", "--resume") == 2
  assert "another config" in capsys.readouterr().err
  assert (tmp_path / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("argv,message", [
    (["--dp"], "needs --noise-multiplier SIGMA or --target-epsilon"),
    (["--noise-multiplier", "1"], "only apply with --dp"),
    (["--target-epsilon", "1", "--delta", "1e-6"], "only apply with --dp"),
    (["--dp", "--noise-multiplier", "1", "--clip", "value"], "in place of --clip"),
    (["--dp", "--noise-multiplier", "1", "--clip", "global_norm"], "in place of --clip"),
    (["--dp", "--noise-multiplier", "1", "--clip-value", "2"], "--dp-max-norm"),
    (["--dp", "--noise-multiplier", "0"], "positive"),
    (["--dp", "--target-epsilon", "1", "--delta", "1.5"], "--delta must be in"),
    (["--dp", "--noise-multiplier", "1", "--dp-max-norm", "-1"], "--dp-max-norm"),
])
def test_bad_flag_combinations(argv, message, tmp_path, capsys):
  assert cli.main(["classify", "--dataset", "mr", "--data-dir", str(tmp_path / "none"),
                   "--workdir", str(tmp_path / "w"), *argv]) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "w").exists()  # refused before any work


def test_contradicting_noise_and_target(shared_data_dir, cache_dir, tmp_path, capsys):
  assert _classify(tmp_path, shared_data_dir, cache_dir, "--dp", "--noise-multiplier", "0.3",
                   "--target-epsilon", "1") == 2
  assert "contradict" in capsys.readouterr().err
  flags = dp_lib.DPFlags(noise_multiplier=5.0, target_epsilon=1.0)  # enough noise: fine
  dp = flags.resolve(batch_size=16, dataset_size=64, planned_steps=12, default_max_norm=1.0)
  assert dp.noise_multiplier == 5.0 and dp.epsilon(12) <= 1.0


def _tiny_classifier(num_layers):
  cfg = flags.override(configs.get_config("smoke"), [
      "optimizer=sgd", "momentum=0", "learning_rate=0.5", f"num_layers={num_layers}",
      "pooling=mean,max" if num_layers == 0 else "pooling=last,max", "embed_dim=6",
      "hidden_size=5"])
  return cfg, classify_train.make_model(cfg, vocab_size=30)


@pytest.mark.parametrize("num_layers", [0, 1])
def test_dp_step_matches_vmap_reference(num_layers):
  """One DP step = clip each example (vmap), sum, the same noise, / B, SGD.

  The batch has 6 real examples with padded positions holding garbage and 2 weight-0
  examples that only fill it: neither may change the update or the counts.
  """
  cfg, model = _tiny_classifier(num_layers)
  rng = np.random.default_rng(0)
  b, real, t = 8, 6, 9
  lengths = np.array([9, 3, 5, 1, 7, 2, 4, 6])
  mask = np.arange(t)[None] < lengths[:, None]
  tokens = np.where(mask, rng.integers(2, 30, (b, t)), 0).astype(np.int32)
  labels = rng.integers(0, 2, b).astype(np.int32)
  weights = (np.arange(b) < real).astype(np.float32)
  batch = {"tokens": tokens, "mask": mask, "labels": labels, "weights": weights}

  # (Everything jitted: eager op-by-op dispatch would compile each primitive.)
  params = jax.jit(model.init)(jax.random.key(1), tokens, mask)["params"]
  # Reference per-example gradients of the real examples, one example at a time.
  def single(p, tok, m, y):
    logits = model.apply({"params": p}, tok[None], m[None])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y[None])[0]
  per_ex = jax.jit(jax.vmap(jax.grad(single), in_axes=(None, 0, 0, 0)))(
      params, tokens[:real], mask[:real], labels[:real])
  flat = [np.asarray(l, np.float64).reshape(real, -1) for l in jax.tree.leaves(per_ex)]
  norms = np.sqrt(sum((f ** 2).sum(1) for f in flat))
  c = float(np.median(norms))  # half the examples get clipped
  scale = np.minimum(1.0, c / norms)
  ref_sum = jax.tree.map(lambda g: np.tensordot(scale, np.asarray(g, np.float64), 1),
                         per_ex)

  dp = dp_lib.DPSettings(noise_multiplier=0.7, max_norm=c, delta=1e-5, batch_size=b,
                         dataset_size=100, planned_steps=10, method="auto")
  tx = classify_train.make_optimizer(cfg, dp_lib.dp_transform(dp, seed=3), 10)
  step = classify_train.make_train_step(model, tx, dp)
  state = classify_train.ClassifyState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params),
      rng=jax.random.key_data(jax.random.key(2)))
  state = jax.tree.map(jnp.copy, state)
  garbage = dict(batch, tokens=np.where(mask, tokens, 17).astype(np.int32))
  new_state, m = step(state, garbage)

  noise_tx = gradclip_jax.add_noise(0.7, c, seed=dp_lib.dp_noise_seed(3))
  noise, _ = jax.jit(noise_tx.update)(jax.tree.map(jnp.zeros_like, params),
                                      noise_tx.init(params))
  lr = cfg.learning_rate
  # params1 = params0 - lr * (clipped sum + noise) / B
  got = jax.tree.map(lambda p1, p0, z: (np.asarray(p0, np.float64) - np.asarray(p1))
                     * b / lr - np.asarray(z), new_state.params, params, noise)
  num = sum(float(np.sum((g - r) ** 2)) for g, r in zip(jax.tree.leaves(got),
                                                           jax.tree.leaves(ref_sum)))
  den = sum(float(np.sum(r ** 2)) for r in jax.tree.leaves(ref_sum))
  assert math.sqrt(num / den) < 1e-4
  assert float(m["count"]) == real
  assert float(m["grad_norm"]) == pytest.approx(norms.sum(), rel=1e-4)
  assert float(m["clipped"]) == np.sum(norms > c)
  assert int(new_state.opt_state[0][0].count) == 1  # add_noise state advanced


def _tiny_split(rng, n=12, t=9, vocab=30):
  lengths = rng.integers(1, t + 1, n).astype(np.int32)
  tokens = np.where(np.arange(t)[None] < lengths[:, None], rng.integers(2, vocab, (n, t)),
                    0).astype(np.int32)
  return input_pipeline.Split(tokens, lengths, rng.integers(0, 2, n).astype(np.int32))


def _close(a, b, rtol=1e-6, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_padded_poisson_batch_changes_nothing():
  """A Poisson draw padded to the capacity gives the unpadded batch's update (plain SGD,
  the same noise: so the same clipped sum) and metrics (loss, accuracy, count, sum of
  the per-example norms, examples clipped)."""
  cfg, model = _tiny_classifier(0)
  rng = np.random.default_rng(1)
  split = _tiny_split(rng)
  idx = np.array([0, 3, 4, 7, 10])
  padded = input_pipeline.padded_batch(split, idx, 8, pad_multiple=cfg.pad_multiple)
  plain = input_pipeline.padded_batch(split, idx, 5, pad_multiple=cfg.pad_multiple)
  assert padded["weights"].tolist() == [1] * 5 + [0] * 3
  assert plain["weights"].tolist() == [1] * 5
  params = jax.jit(model.init)(jax.random.key(1), plain["tokens"], plain["mask"])["params"]

  dp = dp_lib.DPSettings(noise_multiplier=0.7, max_norm=0.94, delta=1e-5, batch_size=5,
                         dataset_size=12, planned_steps=10, method="auto")
  tx = classify_train.make_optimizer(cfg, dp_lib.dp_transform(dp, seed=3), 10)
  step = classify_train.make_train_step(model, tx, dp)
  new = lambda: jax.tree.map(jnp.copy, classify_train.ClassifyState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params),
      rng=jax.random.key_data(jax.random.key(2))))
  s8, m8 = step(new(), padded)
  s5, m5 = step(new(), plain)
  _close(s8.params, s5.params)
  for k in ("loss_sum", "correct", "count", "grad_norm", "clipped"):
    np.testing.assert_allclose(float(m8[k]), float(m5[k]), rtol=1e-6, err_msg=k)
  assert float(m8["count"]) == 5 and 1 <= float(m8["clipped"]) < 5  # C = 0.94 clips some


def test_dp_example_stats_ignore_filler_and_nonfinite():
  s = dp_lib.dp_example_stats(jnp.array([0.5, 2.0, 0.0, jnp.nan, 3.0]),
                              jnp.array([1.0, 1.0, 0.0, 1.0, 0.0]), 1.0)
  assert float(s["norm_sum"]) == 2.5 and float(s["norm_max"]) == 2.0
  assert float(s["num_clipped"]) == 1.0


def test_ptb_dp_smoke(shared_data_dir, tmp_path):
  assert cli.main(["ptb", "--config", "test", "--data-dir", str(shared_data_dir / "ptb"),
                   "--workdir", str(tmp_path), "--max-tokens", "4000", "--no-progress",
                   "--num-devices", "1", "--max-epochs", "2", "--dp",
                   "--noise-multiplier", "1.5", "--dp-max-norm", "2"]) == 0
  records = MetricsWriter.read(tmp_path)
  e1, e2, final = records
  windows = 4000 // 3  # disjoint windows of num_steps + 1 = 3 tokens
  sizes = _draw_sizes(0, windows, 20, 2 * 66)  # 1333 // 20 = 66 steps per epoch
  for r, steps in ((e1, 66), (e2, 132)):
    assert r["step"] == steps and r["noise_multiplier"] == 1.5 and r["dp_max_norm"] == 2
    assert r["epsilon"] == pytest.approx(
        accounting.epsilon_spent(1.5, 20 / windows, steps, 1e-5), rel=1e-9)
    assert np.isfinite(r["train_ppl"]) and np.isfinite(r["valid_ppl"])
    assert 0 <= r["clip_fraction"] <= 1 and r["grad_norm_max"] >= r["grad_norm_mean"]
    mine = sizes[steps - 66:steps]
    assert r["dp_sampling"] == "poisson"
    assert (r["batch_size_min"], r["batch_size_max"]) == (min(mine), max(mine))
    assert r["batch_size_mean"] == pytest.approx(np.mean(mine), rel=1e-12)
  assert e1["epsilon"] < e2["epsilon"] and "test_ppl" in final
  dp = json.loads((tmp_path / "results.json").read_text())["dp"]
  assert dp["sampler"]["dataset_size"] == windows and dp["accountant"]["event"]["count"] == 132
  assert dp["epsilon"] == e2["epsilon"]


def test_ptb_padded_windows_change_nothing():
  """PTB's DP step: 24 windows padded with 24 weight-0 rows give the unpadded step's
  update and epoch accumulators (cost, words, windows, norms, clipped). (The program is
  test_ptb_dp_smoke's, at its capacity 24 and its overflow 48: compiled there once.)"""
  from gradclip_jax.training.ptb import configs as ptb_configs  # pylint: disable=C0415
  hp = ptb_configs.get_config("test")
  model = ptb_train.build_model(hp)
  dp = dp_lib.DPSettings(noise_multiplier=1.5, max_norm=2.0, delta=1e-5, batch_size=20,
                         dataset_size=1333, planned_steps=132, method="vmap")
  tx = ptb_train.build_optimizer(hp, dp_lib.dp_transform(dp, seed=0), epoch_size=66)
  step = ptb_train.make_train_step(model, tx, dp=dp)
  rng = np.random.default_rng(0)
  x, y = (rng.integers(0, 10000, (24, 2)).astype(np.int32) for _ in range(2))
  pad = lambda a: np.concatenate([a, np.zeros_like(a)])
  out = {}
  for name, args in (("plain", (x, y, np.ones(24, np.float32))),
                     ("padded", (pad(x), pad(y), pad(np.ones(24, np.float32))))):
    state = ptb_train.place_state(ptb_train.init_state(model, tx, hp, seed=0), None)
    out[name] = step(state, *(mesh_lib.shard_batch(a, None) for a in args))
  _close(out["padded"].params, out["plain"].params)
  a, b = jax.device_get(out["padded"].acc), jax.device_get(out["plain"].acc)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)
  assert float(a["examples"]) == 24 and float(a["words"]) == 48 and a["grad_norm_sum"] > 0


def test_ptb_dp_windows_are_disjoint():
  ids = np.arange(23)
  x, y = ptb_input.windows(ids, 4)  # 23 // 5 = 4 windows of 5 tokens
  assert x.shape == y.shape == (4, 4)
  np.testing.assert_array_equal(x[1], [5, 6, 7, 8])
  np.testing.assert_array_equal(y[1], [6, 7, 8, 9])
  np.testing.assert_array_equal(np.sort(np.concatenate([x[:, :1], y], 1).ravel()),
                                np.arange(20))  # every token in exactly one window
  with pytest.raises(ValueError, match="too few"):
    ptb_input.windows(ids[:4], 4)


def test_bag_of_embeddings_model_needs_no_last_pooling():
  from gradclip_jax.training.classify import models  # pylint: disable=import-outside-toplevel
  tok = jnp.ones((2, 4), jnp.int32)
  m = models.LSTMClassifier(vocab_size=10, num_layers=0, pooling=("mean", "max"))
  assert m.apply(m.init(jax.random.key(0), tok, tok > 0), tok, tok > 0).shape == (2, 2)
  with pytest.raises(ValueError, match="pooling 'last'"):
    models.LSTMClassifier(vocab_size=10, num_layers=0).init(jax.random.key(0), tok, tok > 0)
