"""Tests of the PTB LSTM language model trainer (``gradclip ptb``)."""
import gzip
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradclip_jax.training import cli, clip, mesh
from gradclip_jax.training.metrics import MetricsWriter
from gradclip_jax.training.ptb import configs, input_pipeline, models, train

from conftest import PTB_REFERENCE_FLAGS, ptb_argv  # pylint: disable=C0411

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------

TUTORIAL = {  # TF ptb_word_lm.py
    "small": (0.1, 1.0, 5, 2, 20, 200, 4, 13, 1.0, 0.5, 20, 10000),
    "medium": (0.05, 1.0, 5, 2, 35, 650, 6, 39, 0.5, 0.8, 20, 10000),
    "large": (0.04, 1.0, 10, 2, 35, 1500, 14, 55, 0.35, 1 / 1.15, 20, 10000),
    "test": (0.1, 1.0, 1, 1, 2, 2, 1, 1, 1.0, 0.5, 20, 10000),
}
FIELDS = ("init_scale", "learning_rate", "max_grad_norm", "num_layers", "num_steps",
          "hidden_size", "max_epoch", "max_max_epoch", "keep_prob", "lr_decay",
          "batch_size", "vocab_size")


@pytest.mark.parametrize("name", sorted(TUTORIAL))
def test_configs_match_tutorial(name):
  c = configs.get_config(name)
  assert tuple(getattr(c, f) for f in FIELDS) == TUTORIAL[name]


def test_lr_schedule():
  c = configs.get_config("small")
  assert [c.lr_at(e) for e in range(7)] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]
  tx = train.build_optimizer(c, optax.identity(), epoch_size=3)
  params = {"w": jnp.zeros(())}
  state = tx.init(params)
  lrs = []
  for _ in range(18):
    u, state = tx.update({"w": jnp.ones(())}, state, params)
    lrs.append(-float(u["w"]))
  assert lrs == [c.lr_at(i // 3) for i in range(18)]


# ---------------------------------------------------------------------------
# Input pipeline.
# ---------------------------------------------------------------------------

TRAIN = " the cat sat on the mat \n the dog <unk> on the log \n"
VALID = " the cat sat \n"
TEST = " a dog on the mat \n".replace(" a ", " the ")


def _write(d, texts, gz=False):
  d.mkdir(parents=True, exist_ok=True)
  for split, text in texts.items():
    if gz:
      with gzip.open(d / f"ptb.{split}.txt.gz", "wt") as f:
        f.write(text)
    else:
      (d / f"ptb.{split}.txt").write_text(text)
  return d


def test_load_plain_and_gz_agree(tmp_path):
  texts = {"train": TRAIN, "valid": VALID, "test": TEST}
  a = input_pipeline.load_ptb(_write(tmp_path / "a", texts), vocab_size=None)
  b = input_pipeline.load_ptb(_write(tmp_path / "b", texts, gz=True), vocab_size=None)
  assert a.vocab == b.vocab
  for x, y in zip(a[:3], b[:3]):
    np.testing.assert_array_equal(x, y)
  assert a.vocab["the"] == 0 and a.vocab["<eos>"] == 1  # by frequency
  assert len(a.train) == 14 and a.train[6] == a.vocab["<eos>"]
  assert len(a.vocab) == 9


def test_missing_file(tmp_path):
  d = _write(tmp_path, {"train": TRAIN, "test": TEST})
  with pytest.raises(FileNotFoundError, match=r"ptb\.valid\.txt\(\.gz\) not found in"):
    input_pipeline.load_ptb(d, vocab_size=None)
  with pytest.raises(FileNotFoundError, match="not found"):
    input_pipeline.load_ptb(tmp_path / "nope")


def test_malformed_files(tmp_path):
  texts = {"train": TRAIN, "valid": VALID, "test": TEST}
  d = _write(tmp_path / "vocab", texts)
  with pytest.raises(ValueError, match=r"ptb\.train\.txt.*vocabulary has 9 words"):
    input_pipeline.load_ptb(d)  # expects 10000 words
  d = _write(tmp_path / "oov", dict(texts, test=" the zebra \n"))
  with pytest.raises(ValueError, match=r"ptb\.test\.txt.*not in the train vocabulary"):
    input_pipeline.load_ptb(d, vocab_size=None)
  d = _write(tmp_path / "empty", dict(texts, valid="\n\n"))
  with pytest.raises(ValueError, match=r"ptb\.valid\.txt: no words"):
    input_pipeline.load_ptb(d, vocab_size=None)
  d = _write(tmp_path / "gz", {"train": TRAIN, "valid": VALID})
  (d / "ptb.test.txt.gz").write_bytes(b"\x1f\x8b\x08garbage")
  with pytest.raises(ValueError, match=r"malformed PTB file .*ptb\.test\.txt\.gz"):
    input_pipeline.load_ptb(d, vocab_size=None)


def test_batchify_matches_tutorial_producer():
  ids = np.arange(103, dtype=np.int32)
  x, y = input_pipeline.batchify(ids, batch_size=4, num_steps=5)
  # batch_len = 25, epoch_size = (25 - 1) // 5 = 4
  assert x.shape == y.shape == (4, 4, 5)
  np.testing.assert_array_equal(x[0, 1], [25, 26, 27, 28, 29])
  np.testing.assert_array_equal(y[0, 1], [26, 27, 28, 29, 30])
  np.testing.assert_array_equal(x[3, 2], [65, 66, 67, 68, 69])
  # Consecutive windows continue each row (the LSTM state is carried across them).
  np.testing.assert_array_equal(np.concatenate(list(x[:, 0])), np.arange(20))
  assert input_pipeline.epoch_size(103, 4, 5) == 4
  with pytest.raises(ValueError, match="too few"):
    input_pipeline.batchify(ids[:8], 4, 5)


def test_real_ptb(shared_data_dir):
  d = input_pipeline.load_ptb(shared_data_dir / "ptb")
  assert (len(d.train), len(d.valid), len(d.test)) == (929589, 73760, 82430)
  assert len(d.vocab) == 10000
  assert (d.vocab["the"], d.vocab["<unk>"], d.vocab["<eos>"]) == (0, 1, 2)
  assert input_pipeline.epoch_size(len(d.train), 20, 20) == 2323


# ---------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------


def _np_reference(params, tokens, carry, num_layers):
  """TF BasicLSTMCell, step by step, in numpy (gate order i, j, f, o; forget bias 0)."""
  sig = lambda v: 1 / (1 + np.exp(-v))
  p = jax.tree.map(np.asarray, params)
  carry = [tuple(np.asarray(a) for a in lc) for lc in carry]
  logits = []
  for t in range(tokens.shape[1]):
    x = p["embedding"][tokens[:, t]]
    for l in range(num_layers):
      lp = p[f"lstm_{l}"]
      c, h = carry[l]
      kernel = np.concatenate([lp["kernel_x"], lp["kernel_h"]], 0)  # TF's [in + H, 4H]
      z = np.concatenate([x, h], 1) @ kernel + lp["bias"]
      i, j, f, o = np.split(z, 4, axis=1)
      c = c * sig(f) + sig(i) * np.tanh(j)
      h = np.tanh(c) * sig(o)
      carry[l] = (c, h)
      x = h
    logits.append(x @ p["softmax_w"] + p["softmax_b"])
  return carry, np.stack(logits)  # [T, B, V]


def _tiny_model(keep_prob=1.0):
  return models.PTBModel(vocab_size=11, hidden_size=3, num_layers=2, init_scale=0.5,
                         keep_prob=keep_prob)


def test_model_init():
  m = models.PTBModel(vocab_size=100, hidden_size=8, num_layers=2, init_scale=0.1)
  params = m.init(jax.random.key(0), m.initial_carry(4), jnp.zeros((4, 5), jnp.int32))
  params = params["params"]
  assert params["embedding"].shape == (100, 8)
  assert params["lstm_0"]["kernel_x"].shape == (8, 32)
  assert params["lstm_1"]["kernel_h"].shape == (8, 32)
  assert params["softmax_w"].shape == (8, 100)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if "lstm" in name and "bias" in name:
      np.testing.assert_array_equal(leaf, 0.0)
    else:
      assert float(jnp.abs(leaf).max()) <= 0.1
      assert float(jnp.abs(leaf).max()) > 0.05


def test_model_matches_tf_basic_lstm_cell():
  m = _tiny_model()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 11, (4, 6)).astype(np.int32)
  carry = tuple((jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                 jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)) for _ in range(2))
  params = m.init(jax.random.key(1), carry, tokens)["params"]
  new_carry, logits = m.apply({"params": params}, carry, tokens)
  ref_carry, ref_logits = _np_reference(params, tokens, carry, 2)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  for (c, h), (rc, rh) in zip(new_carry, ref_carry):
    np.testing.assert_allclose(c, rc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, rh, rtol=1e-5, atol=1e-5)


def test_custom_vjp_matches_autodiff():
  T, B, H = 5, 3, 4
  k = jax.random.split(jax.random.key(0), 4)
  w = jax.random.uniform(k[0], (H, 4 * H), minval=-0.5, maxval=0.5)
  xp = jax.random.normal(k[1], (T, B, 4 * H))
  c0, h0 = jax.random.normal(k[2], (B, H)), jax.random.normal(k[3], (B, H))

  def reference(w, xp, c0, h0):
    def step(carry, x):
      c, h, _ = models._cell(w, x, *carry, 0.0)  # pylint: disable=protected-access
      return (c, h), h
    (c, h), hs = jax.lax.scan(step, (c0, h0), xp)
    return hs, c, h

  def loss(f):
    def fn(*a):
      hs, c, h = f(*a)
      return jnp.sum(hs ** 2) + jnp.sum(1.3 * c) + jnp.sum(jnp.sin(h))
    return fn

  fast = lambda *a: models.lstm_recurrence(*a, 0.0)
  for a, b in zip(reference(w, xp, c0, h0), fast(w, xp, c0, h0)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  g_ref = jax.grad(loss(reference), (0, 1, 2, 3))(w, xp, c0, h0)
  g_fast = jax.grad(loss(fast), (0, 1, 2, 3))(w, xp, c0, h0)
  for a, b in zip(g_ref, g_fast):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_time_distributed_matmul_float32_and_mixed():
  k = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(k[0], (5, 3, 8))
  w = jax.random.normal(k[1], (8, 6))
  dy = jax.random.normal(k[2], (5, 3, 6))
  ref = np.einsum("tbi,io->tbo", np.asarray(x, np.float64), np.asarray(w, np.float64))
  loss = lambda dt: (lambda x, w: jnp.sum(models.time_distributed_matmul(x, w, dt) * dy))
  y32 = models.time_distributed_matmul(x, w)
  np.testing.assert_allclose(y32, ref, rtol=1e-5, atol=1e-5)
  # bfloat16 inputs, float32 accumulation: within bf16 rounding of the inputs.
  y16 = models.time_distributed_matmul(x, w, jnp.bfloat16)
  assert y16.dtype == jnp.float32 and y16.shape == (5, 3, 6)
  np.testing.assert_allclose(y16, ref, rtol=0, atol=0.05 * np.abs(ref).max())
  assert not np.array_equal(np.asarray(y16), np.asarray(y32))  # really rounded
  g32 = jax.grad(loss(None), (0, 1))(x, w)
  g16 = jax.grad(loss(jnp.bfloat16), (0, 1))(x, w)
  for a, b in zip(g32, g16):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(b, a, rtol=0, atol=0.05 * np.abs(a).max())
  # The f32 gradients against NumPy: dx = dy w^T, dw = x^T dy over all T*B rows.
  dyn, xn, wn = (np.asarray(a, np.float64) for a in (dy, x, w))
  np.testing.assert_allclose(g32[0], dyn @ wn.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g32[1], np.einsum("tbi,tbo->io", xn, dyn), rtol=1e-5, atol=1e-5)


def test_build_model_matmul_dtype():
  config = configs.get_config("test")
  assert train.build_model(config).matmul_dtype is None
  assert train.build_model(config, "bfloat16").matmul_dtype == "bfloat16"
  with pytest.raises(ValueError, match="matmul_dtype"):
    train.build_model(config, "float16")


def test_tune_host_allocator_can_be_disabled(monkeypatch):
  monkeypatch.setenv(cli.ALLOCATOR_ENV, "0")
  assert cli.tune_host_allocator() is False
  monkeypatch.delenv(cli.ALLOCATOR_ENV)
  applied = cli.tune_host_allocator()
  assert isinstance(applied, bool)
  if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):
    assert applied


def test_dropout_only_in_training():
  m = _tiny_model(keep_prob=0.5)
  tokens = jnp.ones((2, 4), jnp.int32)
  carry = m.initial_carry(2)
  params = m.init(jax.random.key(0), carry, tokens)["params"]
  _, a = m.apply({"params": params}, carry, tokens)
  _, b = m.apply({"params": params}, carry, tokens)
  _, c = m.apply({"params": params}, carry, tokens, train=True,
                 rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_sequence_cost_is_batch_mean_summed_over_time():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 2, 5)).astype(np.float32)  # [T, B, V]
  targets = rng.integers(0, 5, (2, 3))  # [B, T]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets.T[..., None], -1)[..., 0]  # [T, B]
  np.testing.assert_allclose(models.sequence_cost(logits, targets), ce.mean(1).sum(),
                             rtol=1e-6)


# ---------------------------------------------------------------------------
# Train step and clipping rules.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rule", clip.RULES)
def test_train_step_every_rule(rule):
  config = configs.get_config("test")
  model = train.build_model(config)
  tx = train.build_optimizer(config, clip.build_clip(rule, None, 0.05), epoch_size=10)
  state = train.init_state(model, tx, config, seed=0)
  step = train.make_train_step(model, tx)
  x = jnp.asarray(np.arange(40).reshape(20, 2) % 10000, jnp.int32)
  for _ in range(3):
    state = step(state, x, x + 1)
  acc = jax.device_get(state.acc)
  assert int(acc["steps"]) == 3 and np.isfinite(acc["cost"])
  assert acc["grad_norm_max"] > 0
  if rule == "none":
    assert int(acc["clipped"]) == 0
  if rule == "global_norm":
    assert int(acc["clipped"]) == 3  # threshold 0.05 is below the gradient norm


# ---------------------------------------------------------------------------
# CLI runs on a slice of the real data (test config: conftest.ptb_argv).
# ---------------------------------------------------------------------------


def _run(data_dir, workdir, *extra):
  assert cli.main(ptb_argv(data_dir, workdir, *extra)) == 0
  return MetricsWriter.read(workdir)


def _without_timing(records):
  return [{k: v for k, v in r.items() if k != "wps"} for r in records]


@pytest.fixture
def smoke_run(ptb_reference):
  """Two epochs of the test config, checkpointing every 100 steps (conftest's
  ``ptb_reference``, shared with test_cli's SIGTERM test)."""
  return ptb_reference


def test_smoke_perplexity_falls(smoke_run):
  _, records = smoke_run
  assert len(records) == 3
  e1, e2, final = records
  for r in (e1, e2):
    assert set(r) == {"epoch", "lr", "train_ppl", "valid_ppl", "wps", "grad_norm_mean",
                      "grad_norm_max", "clip_fraction"}
  assert (e1["epoch"], e2["epoch"], e1["lr"], e2["lr"]) == (1, 2, 1.0, 0.5)
  assert e2["train_ppl"] < e1["train_ppl"] < 10000 * 0.5
  assert e2["valid_ppl"] < e1["valid_ppl"]
  assert set(final) == {"epoch", "test_ppl"} and final["test_ppl"] < 10000 * 0.5
  assert 0.0 <= e1["clip_fraction"] <= 1.0 and e1["grad_norm_max"] >= e1["grad_norm_mean"]


def test_mixed_precision_smoke_run(shared_data_dir, tmp_path):
  records = _run(shared_data_dir, tmp_path, "--max-epochs", "1", "--matmul-dtype",
                 "bfloat16")
  assert records[0]["train_ppl"] < 10000 * 0.5 and np.isfinite(records[-1]["test_ppl"])


def test_max_steps_then_resume_is_exact(smoke_run, tmp_path):
  data_dir, reference = smoke_run
  partial = _run(data_dir, tmp_path, *PTB_REFERENCE_FLAGS, "--max-steps", "300")
  # stopped mid epoch 2
  assert partial[-1]["partial"] and partial[-1]["epoch"] == 2
  assert _without_timing(partial[:1]) == _without_timing(reference[:1])
  resumed = _run(data_dir, tmp_path, *PTB_REFERENCE_FLAGS, "--resume")
  assert _without_timing(resumed) == _without_timing(reference)


def test_data_parallel_matches_single_device(smoke_run, tmp_path):
  data_dir, reference = smoke_run
  if mesh.num_data_devices(20) == 1:
    pytest.skip("only one device")
  parallel = _run(data_dir, tmp_path, "--max-epochs", "1", "--num-devices", "2")
  np.testing.assert_allclose(parallel[0]["train_ppl"], reference[0]["train_ppl"],
                             rtol=1e-4)
  np.testing.assert_allclose(parallel[0]["valid_ppl"], reference[0]["valid_ppl"],
                             rtol=1e-4)


def test_kill_and_resume_is_exact(smoke_run, tmp_path):
  """A process killed (SIGKILL) mid-run resumes to the uninterrupted run's metrics."""
  data_dir, reference = smoke_run
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen(
      [sys.executable, "-m", "gradclip_jax.training.cli",
       *ptb_argv(data_dir, tmp_path, *PTB_REFERENCE_FLAGS)],
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = tmp_path / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
      break
    time.sleep(0.02)
  if proc.poll() is not None:
    pytest.skip("the run finished before it could be killed")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed = _run(data_dir, tmp_path, *PTB_REFERENCE_FLAGS, "--resume")
  assert _without_timing(resumed) == _without_timing(reference)


def test_cli_help_lists_subcommands(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert "ptb" in out and "classify" in out and "data" in out
  assert cli.main(["ptb", "--help"]) == 0
  out = capsys.readouterr().out
  for flag in ("--config", "--data-dir", "--workdir", "--clip", "--max-steps",
               "--max-epochs", "--seed", "--resume", "zclip", "adagc"):
    assert flag in out
