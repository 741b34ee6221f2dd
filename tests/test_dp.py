"""Tests of gradclip_jax.dp: per-example clipping, noise, clipped_grad (vmap / ghost)."""
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax
from gradclip_jax import dp
from gradclip_jax.dp import accounting

KEY = jax.random.key(0)


# ------------------------------------------------------------ NumPy reference


def np_clip_sum(tree, c):
  leaves = [np.asarray(l, np.float64) for l in jax.tree.leaves(tree)]
  b = leaves[0].shape[0]
  norms = np.sqrt(sum((l.reshape(b, -1) ** 2).sum(1) for l in leaves))
  fin = np.isfinite(norms)
  with np.errstate(all="ignore"):
    scale = np.where(norms > c, c / np.where(norms > 0, norms, 1), 1.0)
  scale = np.where(fin, scale, 0.0)
  with np.errstate(all="ignore"):
    out = [np.sum(np.where(fin.reshape((-1,) + (1,) * (l.ndim - 1)),
                           l * scale.reshape((-1,) + (1,) * (l.ndim - 1)), 0), 0)
           for l in leaves]
  return out, norms


def per_ex_tree(b=5, seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(b, 3, 4)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(b, 4)) * 3, jnp.float32)}


# ----------------------------------------------------------- per_example_clip


class PerExampleClipTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy(self):
    g = per_ex_tree()
    tx = gradclip_jax.per_example_clip(2.0)
    out, st = self.variant(tx.update)(g, tx.init(None))
    ref, norms = np_clip_sum(g, 2.0)
    for a, r in zip(jax.tree.leaves(out), ref):
      np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
    self.assertAlmostEqual(float(optax.tree_utils.tree_get(st, "mean_example_norm")),
                           norms.mean(), places=4)
    self.assertAlmostEqual(float(optax.tree_utils.tree_get(st, "max_example_norm")),
                           norms.max(), places=4)
    self.assertAlmostEqual(float(optax.tree_utils.tree_get(st, "fraction_clipped")),
                           (norms > 2.0).mean())
    self.assertEqual(int(st.num_clipped), 1)
    self.assertEqual(int(st.num_nonfinite), 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_example_is_zero_and_counted(self):
    g = per_ex_tree()
    g["w"] = g["w"].at[1, 0, 0].set(jnp.nan)
    g["b"] = g["b"].at[3, 0].set(jnp.inf)
    tx = gradclip_jax.per_example_clip(1.0)
    out, st = self.variant(tx.update)(g, tx.init(None))
    ref, _ = np_clip_sum(g, 1.0)
    for a, r in zip(jax.tree.leaves(out), ref):
      self.assertTrue(np.all(np.isfinite(a)))
      np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
    self.assertEqual(int(st.num_nonfinite), 2)
    self.assertTrue(np.isfinite(float(st.mean_example_norm)))

  def test_bf16_keeps_dtype_and_accumulates_f32(self):
    g = jax.tree.map(lambda x: (x * 100).astype(jnp.bfloat16), per_ex_tree(b=64))
    tx = gradclip_jax.per_example_clip(1.0)
    out, _ = jax.jit(tx.update)(g, tx.init(None))
    ref, _ = np_clip_sum(jax.tree.map(lambda x: x.astype(jnp.float32), g), 1.0)
    for a, r in zip(jax.tree.leaves(out), ref):
      self.assertEqual(a.dtype, jnp.bfloat16)
      np.testing.assert_allclose(np.asarray(a, np.float32), r, rtol=2e-2, atol=2e-2)

  def test_inf_threshold_is_plain_sum(self):
    g = per_ex_tree()
    tx = gradclip_jax.per_example_clip(math.inf)
    out, st = jax.jit(tx.update)(g, tx.init(None))
    for a, x in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
      np.testing.assert_allclose(a, x.sum(0), rtol=1e-6)
    self.assertEqual(int(st.num_clipped), 0)

  def test_zero_example_and_zero_threshold(self):
    g = jax.tree.map(jnp.zeros_like, per_ex_tree())
    tx = gradclip_jax.per_example_clip(0.0)
    out, _ = tx.update(g, tx.init(None))
    for a in jax.tree.leaves(out):
      np.testing.assert_array_equal(a, 0.0)

  def test_per_layer(self):
    g = per_ex_tree()
    tx = gradclip_jax.per_example_clip(2.0, per_layer=True)
    out, _ = tx.update(g, tx.init(None))
    c = 2.0 / math.sqrt(2)
    for a, x in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
      ref, _ = np_clip_sum([x], c)
      np.testing.assert_allclose(a, ref[0], rtol=1e-5, atol=1e-6)
    # Each example's whole norm is then <= C.
    clipped = [np_clip_sum([x[i:i + 1]], c)[0][0] for x in jax.tree.leaves(g)
               for i in range(5)]
    del clipped

  def test_bad_input(self):
    tx = gradclip_jax.per_example_clip(1.0)
    with pytest.raises(ValueError, match="leading batch axis"):
      tx.update({"a": jnp.ones(())}, tx.init(None))
    with pytest.raises(ValueError, match="batch size"):
      tx.update({"a": jnp.ones((2, 3)), "b": jnp.ones((3,))}, tx.init(None))
    with pytest.raises(TypeError, match="dtype"):
      tx.update({"a": jnp.ones((2, 3), jnp.int32)}, tx.init(None))
    with pytest.raises(ValueError, match="negative"):
      gradclip_jax.per_example_clip(-1.0)
    with pytest.raises(ValueError, match="NaN"):
      gradclip_jax.per_example_clip(float("nan"))


  def test_per_layer_pytree_thresholds(self):
    g = per_ex_tree()
    g["w"] = g["w"].at[2, 1, 1].set(jnp.nan)  # example 2 is dropped from every leaf
    c = {"w": 1.5, "b": 0.25}
    tx = gradclip_jax.per_example_clip(c, per_layer=True)
    out, st = jax.jit(tx.update)(g, tx.init(None))
    keep = np.arange(5) != 2
    for k in ("w", "b"):
      x = np.asarray(g[k], np.float64)[keep]
      n = np.sqrt((x.reshape(4, -1) ** 2).sum(1))
      ref = (x * np.minimum(1, c[k] / n).reshape((-1,) + (1,) * (x.ndim - 1))).sum(0)
      np.testing.assert_allclose(out[k], ref, rtol=1e-5, atol=1e-6)
    self.assertEqual(int(st.num_nonfinite), 1)
    # every finite example has some leaf over its threshold here
    nb = np.sqrt((np.asarray(g["b"]) ** 2).sum(1))
    self.assertAlmostEqual(float(st.fraction_clipped), np.mean(keep & (nb > 0.25)))
    with pytest.raises(ValueError, match="structure"):
      tx.update({"w": g["w"]}, tx.init(None))
    with pytest.raises(TypeError, match="per_layer"):
      gradclip_jax.per_example_clip(c)

  def test_float64_under_x64(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(0)
      x = rng.normal(size=(6, 3, 4)) * np.array([1e-3, 1.0, 1e3, 1, 1, 1])[:, None, None]
      g = {"w": jnp.asarray(x, jnp.float64), "s": jnp.asarray(x[:, 0, 0], jnp.float64)}
      for per_layer in (False, True):
        tx = gradclip_jax.per_example_clip(0.7, per_layer=per_layer)
        out, _ = jax.jit(tx.update)(g, tx.init(None))
        self.assertEqual(out["w"].dtype, jnp.float64)
        if not per_layer:
          ref, _ = np_clip_sum(g, 0.7)
          for a, r in zip(jax.tree.leaves(out), ref):
            np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-14)
        else:
          for k in ("s", "w"):
            ref, _ = np_clip_sum([g[k]], 0.7 / math.sqrt(2))
            np.testing.assert_allclose(out[k], ref[0], rtol=1e-12, atol=1e-14)
      noise = gradclip_jax.add_noise(1.0, 1.0, 0)
      noisy, _ = jax.jit(noise.update)(g, noise.init(g))
      self.assertEqual(noisy["w"].dtype, jnp.float64)

  def test_norm_overflow_is_clipped_not_dropped(self):
    # each entry is finite but the squared norm overflows float32: still clipped.
    g = {"a": jnp.full((2, 4), 3e19, jnp.float32), "b": jnp.ones((2, 3), jnp.float32)}
    tx = gradclip_jax.per_example_clip(1.0)
    out, st = jax.jit(tx.update)(g, tx.init(None))
    self.assertEqual(int(st.num_nonfinite), 0)
    np.testing.assert_allclose(out["a"], np.full(4, 2 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(out["b"], np.zeros(3), atol=1e-6)


class NoiseTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_reproducible_and_stddev(self):
    tx = gradclip_jax.add_noise(2.0, 0.5, seed=3)
    g = {"a": jnp.zeros((200, 100)), "b": jnp.zeros((10,), jnp.bfloat16)}
    upd = self.variant(tx.update)
    o1, s1 = upd(g, tx.init(g))
    o1b, _ = upd(g, tx.init(g))
    o2, s2 = upd(g, s1)
    np.testing.assert_array_equal(o1["a"], o1b["a"])
    self.assertFalse(np.allclose(o1["a"], o2["a"]))
    self.assertEqual(o1["b"].dtype, jnp.bfloat16)
    self.assertAlmostEqual(float(jnp.std(o1["a"])), 1.0, delta=0.03)
    self.assertEqual(int(s2.count), 2)
    o3, _ = tx.update(g, gradclip_jax.add_noise(2.0, 0.5, seed=4).init(g))
    self.assertFalse(np.allclose(o1["a"], o3["a"]))

  def test_dp_aggregate(self):
    g = per_ex_tree()
    tx = gradclip_jax.dp_aggregate(1.0, 0.0, seed=0)
    out, st = tx.update(g, tx.init(None))
    ref, _ = np_clip_sum(g, 1.0)
    for a, r in zip(jax.tree.leaves(out), ref):
      np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
    self.assertGreater(float(optax.tree_utils.tree_get(st, "mean_example_norm")), 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_layer_thresholds_sensitivity(self):
    # Per-leaf thresholds 3 and 4: the noise std is sigma * sqrt(3^2 + 4^2) = 2 * 5.
    c = {"a": 3.0, "b": 4.0}
    g = {"a": jnp.zeros((4, 300, 100)), "b": jnp.zeros((4, 100))}
    tx = gradclip_jax.dp_aggregate(c, 2.0, seed=1, per_layer=True)
    out, _ = self.variant(tx.update)(g, tx.init(None))
    z = np.concatenate([np.ravel(out["a"]), np.ravel(out["b"])])
    self.assertAlmostEqual(float(np.mean(z)), 0.0, delta=0.25)  # 4 standard errors
    # sample std of 30,100 normals: standard error 10 / sqrt(2 * 30100) ~ 0.04
    self.assertAlmostEqual(float(np.std(z)), 10.0, delta=0.16)  # 4 standard errors
    # the same key and the scalar sensitivity 5 give the same draw
    g0 = jax.tree.map(lambda x: x[0], g)
    tx1 = gradclip_jax.add_noise(2.0, 5.0, seed=1)
    ref, _ = tx1.update(g0, tx1.init(None))
    tx2 = gradclip_jax.add_noise(2.0, c, seed=1)
    out2, _ = tx2.update(g0, tx2.init(None))
    np.testing.assert_allclose(out2["a"], ref["a"], rtol=1e-6)
    with pytest.raises(ValueError, match="structure"):
      tx2.update({"a": g["a"][0]}, tx2.init(None))

  def test_bad_noise(self):
    with pytest.raises(ValueError, match="negative"):
      gradclip_jax.add_noise(-1.0, 1.0, 0)
    with pytest.raises(ValueError, match="finite"):
      gradclip_jax.add_noise(1.0, math.inf, 0)
    with pytest.raises(ValueError, match="finite"):
      gradclip_jax.add_noise(1.0, {"a": 1.0, "b": math.inf}, 0)
    with pytest.raises(TypeError, match="noise_multiplier"):
      gradclip_jax.add_noise({"a": 1.0}, 1.0, 0)
    with pytest.raises(TypeError, match="seed"):
      gradclip_jax.add_noise(1.0, 1.0, 0.5)
    with pytest.raises(TypeError, match="number"):
      gradclip_jax.add_noise(1.0, "1", 0)
    with pytest.raises(TypeError, match="per_layer"):
      gradclip_jax.per_example_clip(1.0, per_layer="yes")
    tx = gradclip_jax.add_noise(1.0, 1.0, 0)
    with pytest.raises(TypeError, match="dtype"):
      tx.update({"a": jnp.ones(3, jnp.int32)}, tx.init(None))


# -------------------------------------------------------------- models for ghost


def ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.LayerNorm()(x)
    return nn.Dense(3)(x)


class RNNClassifier(nn.Module):

  @nn.compact
  def __call__(self, tok, lengths):
    e = nn.Embed(50, 8)(tok)
    h = nn.RNN(nn.LSTMCell(12))(e, seq_lengths=lengths)
    mask = jnp.arange(tok.shape[1])[None] < lengths[:, None]
    pooled = jnp.sum(h * mask[..., None], 1) / lengths[:, None]
    return nn.Dense(2)(pooled)


class LSTMLM(nn.Module):

  @nn.compact
  def __call__(self, tok):
    e = nn.Embed(30, 8)(tok)
    h = nn.RNN(nn.LSTMCell(10))(e)
    h = nn.RNN(nn.GRUCell(10), reverse=True, keep_order=False)(h)
    h = nn.DenseGeneral((2, 5))(h).reshape(h.shape[:2] + (10,))
    return nn.Dense(30)(h)


class Mixed(nn.Module):
  """Covered layers, a raw parameter in a module with submodules, a remat'ed Dense."""

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(), (5, 7))
    h = nn.tanh(x @ w)
    shared = nn.Dense(7)
    h = shared(shared(h))  # one module called twice: handled exactly
    h = nn.remat(nn.Dense)(6)(h)
    return nn.Dense(3)(h)


def _data(b=6, t=7, seed=0):
  rng = np.random.default_rng(seed)
  lengths = jnp.asarray(rng.integers(1, t + 1, size=b))
  tok = jnp.asarray(rng.integers(1, 50, size=(b, t)))
  tok = jnp.where(jnp.arange(t)[None] < lengths[:, None], tok, 0)
  return tok, lengths, jnp.asarray(rng.integers(0, 2, size=b))


@functools.lru_cache(maxsize=None)
def _setup(name, b=6):
  """(loss_fn, params, batch) of a model, built once (init jitted: one compile)."""
  rng = np.random.default_rng(1)
  y = jnp.asarray(rng.integers(0, 3, size=b))
  if name == "mlp":
    m, x = MLP(), jnp.asarray(rng.normal(size=(b, 5)), jnp.float32)
    p = jax.jit(m.init)(KEY, x)
    return (lambda p, x, y: ce(m.apply(p, x), y)), p, (x, y)
  if name == "rnn_cls":
    tok, lengths, y2 = _data(b)
    m = RNNClassifier()
    p = jax.jit(m.init)(KEY, tok, lengths)
    return (lambda p, t, l, y: ce(m.apply(p, t, l), y)), p, (tok, lengths, y2)
  if name == "lm":
    tok = jnp.asarray(rng.integers(0, 30, size=(b, 7)))
    m = LSTMLM()
    p = jax.jit(m.init)(KEY, tok)
    # one loss per sequence: the mean over its tokens.
    return (lambda p, t: ce(m.apply(p, t)[:, :-1], t[:, 1:]).mean(-1)), p, (tok,)
  if name == "mixed":
    m, x = Mixed(), jnp.asarray(rng.normal(size=(b, 5)), jnp.float32)
    p = jax.jit(m.init)(KEY, x)
    return (lambda p, x, y: ce(m.apply(p, x), y)), p, (x, y)
  raise ValueError(name)


def tree_rel(a, b):
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a),
                                                         jax.tree.leaves(b)))
  den = sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(a))
  return math.sqrt(num / max(den, 1e-30))


_JITTED = {}  # one jitted clipped_grad per (loss_fn, method, max_norm, options)


def jitted(loss_fn, method, max_norm, **kw):
  """jax.jit(clipped_grad(..., return_norms=True)), built once per configuration, so
  tests that share a model (_setup is cached) share its compiled programs."""
  key = (loss_fn, method, max_norm, tuple(sorted(kw.items())))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(dp.clipped_grad(loss_fn, max_norm=max_norm, method=method,
                                           return_norms=True, **kw))
  return _JITTED[key]


def both(loss_fn, params, batch, max_norm=1.0, methods=("vmap", "ghost"), **kw):
  return {m: jitted(loss_fn, m, max_norm, **kw)(params, *batch) for m in methods}


# ---------------------------------------------------------------- clipped_grad


def test_vmap_matches_per_example_clip():
  loss_fn, p, batch = _setup("mlp")
  g, norms = jitted(loss_fn, "vmap", 0.5)(p, *batch)
  pe = jax.jit(jax.vmap(jax.grad(lambda p, x, y: loss_fn(p, x[None], y[None])[0]),
                        in_axes=(None, 0, 0)))(p, *batch)
  ref, ref_norms = np_clip_sum(pe, 0.5)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
  for a, r in zip(jax.tree.leaves(g), ref):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


def test_vmap_microbatch_normalize_aux():
  loss_fn, p, batch = _setup("mlp")
  aux_fn = lambda p, x, y: (loss_fn(p, x, y), {"n": jnp.sum(y)})
  full = jitted(loss_fn, "vmap", 0.5)(p, *batch)[0]
  g, norms, aux = jax.jit(dp.clipped_grad(aux_fn, max_norm=0.5, method="vmap",
                                          microbatch_size=2, normalize_by=6.0,
                                          has_aux=True, return_norms=True))(p, *batch)
  assert norms.shape == (6,)
  assert aux["n"].shape == (3,)  # one aux per microbatch
  assert tree_rel(jax.tree.map(lambda x: x / 6, full), g) < 1e-6
  with pytest.raises(ValueError, match="multiple"):
    dp.clipped_grad(loss_fn, max_norm=1.0, microbatch_size=4)(p, *batch)
  with pytest.raises(ValueError, match="per-example"):
    dp.clipped_grad(lambda p, x, y: loss_fn(p, x, y).mean(), max_norm=1.0,
                    method="ghost")(p, *batch)
  with pytest.raises(ValueError, match="method"):
    dp.clipped_grad(loss_fn, max_norm=1.0, method="nope")


# Convolutions (2-D and 1-D, strided, dilated, grouped) are checked in
# test_ghost_models.py (exact against a vmap reference, and their coverage).
@pytest.mark.parametrize("name", ["mlp", "rnn_cls", "lm", "mixed"])
def test_ghost_matches_vmap(name):
  loss_fn, p, batch = _setup(name)
  out = both(loss_fn, p, batch, max_norm=0.3)
  nv, ng = out["vmap"][1], out["ghost"][1]
  np.testing.assert_allclose(ng, nv, rtol=1e-5)
  assert np.all(nv > 0.3)  # every example is actually clipped
  assert tree_rel(out["vmap"][0], out["ghost"][0]) < 1e-5


def _fallbacks(cov):
  return sorted(k for k, v in cov.items() if v.startswith("fallback"))


def test_coverage_report():
  # Rule families by primitive; nothing here needs the per-operation fallback.
  cov = dp.ghost_coverage(*_setup("mixed")[:2], *_setup("mixed")[2])
  assert cov["params/w"].startswith("dot_general")  # a raw parameter, x @ w
  assert cov["params/CheckpointDense_0/kernel"].startswith("dot_general")  # remat
  assert cov["params/Dense_0/kernel"].startswith("dot_general")  # shared, called twice
  assert cov["params/Dense_0/bias"].startswith("elementwise")
  assert not _fallbacks(cov), cov
  cov = dp.ghost_coverage(*_setup("rnn_cls")[:2], *_setup("rnn_cls")[2])
  assert cov["params/Embed_0/embedding"].startswith("gather")
  assert cov["params/LSTMCell_0/hi/kernel"].startswith("dot_general")
  assert cov["params/LSTMCell_0/ii/kernel"].startswith("dot_general")
  assert cov["params/Dense_0/kernel"].startswith("dot_general")
  assert not _fallbacks(cov), cov
  cov = dp.ghost_coverage(*_setup("mlp")[:2], *_setup("mlp")[2])
  assert cov["params/LayerNorm_0/scale"].startswith("elementwise")
  assert not _fallbacks(cov), cov


def test_padding_steps_do_not_count():
  loss_fn, p, (tok, lengths, y) = _setup("rnn_cls")
  f = jitted(loss_fn, "ghost", 0.3)
  g1, n1 = f(p, tok, lengths, y)
  pad = jnp.arange(tok.shape[1])[None] >= lengths[:, None]
  tok2 = jnp.where(pad, 7, tok)  # garbage in the padded positions
  g2, n2 = f(p, tok2, lengths, y)
  np.testing.assert_allclose(n1, n2, rtol=1e-6)
  assert tree_rel(g1, g2) < 1e-6


def test_ghost_microbatch_and_auto():
  loss_fn, p, batch = _setup("rnn_cls")
  g, n = jax.jit(dp.clipped_grad(loss_fn, max_norm=0.3, method="auto",
                                 microbatch_size=3, return_norms=True))(p, *batch)
  ref = both(loss_fn, p, batch, max_norm=0.3, methods=("vmap",))["vmap"]
  np.testing.assert_allclose(n, ref[1], rtol=1e-5)
  assert tree_rel(ref[0], g) < 1e-5
  # A plain function of a bare array: auto handles it too.
  plain = lambda w, x: jnp.sum((x @ w) ** 2, axis=1)
  w = jnp.ones((3, 2))
  x = jnp.arange(12.0).reshape(4, 3) / 10
  g = dp.clipped_grad(plain, max_norm=1.0)(w, x)
  pe = np.stack([np.outer(xi, 2 * (xi @ np.ones((3, 2)))) for xi in np.asarray(x)])
  ref, _ = np_clip_sum([pe], 1.0)
  np.testing.assert_allclose(g, ref[0], rtol=1e-5)


def test_project_lstm_classifier():
  from gradclip_jax.training.classify.models import LSTMClassifier  # pylint: disable=import-outside-toplevel
  m = LSTMClassifier(vocab_size=40, embed_dim=8, hidden_size=6, dropout=0.0)
  tok, lengths, y = _data(4, 9)
  tok = tok % 40
  mask = jnp.arange(9)[None] < lengths[:, None]
  p = jax.jit(m.init)(KEY, tok, mask)
  lf = lambda p, t, mk, y: ce(m.apply(p, t, mk), y)
  cov = dp.ghost_coverage(lf, p, tok, mask, y)
  assert cov["params/embed/embedding"].startswith("gather")
  assert cov["params/lstm_0/recurrent_kernel"].startswith("dot_general")
  assert not _fallbacks(cov), cov
  out = both(lf, p, (tok, mask, y), max_norm=0.1)
  np.testing.assert_allclose(out["ghost"][1], out["vmap"][1], rtol=1e-5)
  assert tree_rel(out["vmap"][0], out["ghost"][0]) < 1e-5


@pytest.mark.parametrize("method,microbatch", [("ghost", None), ("ghost", 4),
                                               ("vmap", None)])
def test_mask_padded_batch_equals_unpadded(method, microbatch):
  # A batch padded to a fixed capacity (rows of NaN garbage, mask False) gives the
  # clipped sum of the real rows (NumPy reference from per-example grads), norms 0.
  loss_fn, p, (x, y) = _setup("mlp")
  pe = jax.jit(jax.vmap(jax.grad(lambda p, x, y: loss_fn(p, x[None], y[None])[0]),
                        in_axes=(None, 0, 0)))(p, x, y)
  ref, ref_norms = np_clip_sum(pe, 0.5)
  xp = jnp.concatenate([x[:3], jnp.full((2, 5), jnp.nan), x[3:]])
  yp = jnp.concatenate([y[:3], jnp.zeros(2, y.dtype), y[3:]])
  mask = np.array([True] * 3 + [False] * 2 + [True] * 3)
  f = jax.jit(dp.clipped_grad(loss_fn, max_norm=0.5, method=method, return_norms=True,
                              microbatch_size=microbatch))
  g, norms = f(p, xp, yp, mask=jnp.asarray(mask))
  np.testing.assert_array_equal(norms[~mask], 0.0)
  np.testing.assert_allclose(norms[mask], ref_norms, rtol=1e-5)
  for a, r in zip(jax.tree.leaves(g), ref):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
  # A 0/1 float mask is the same mask; a mask of the wrong shape is refused.
  g2, _ = f(p, xp, yp, mask=jnp.asarray(mask, jnp.float32))
  assert tree_rel(g, g2) < 1e-6
  with pytest.raises(ValueError, match=r"mask must have shape \(8,\)"):
    f(p, xp, yp, mask=jnp.ones(7, bool))


# ------------------------------------------------------------------ edge cases


def test_edge_zero_example_inf_threshold_batch_one():
  loss_fn, p, (x, y) = _setup("mlp")
  wt = jnp.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # example 1 has a zero gradient
  lf = lambda p, x, y, w: loss_fn(p, x, y) * w
  out = both(lf, p, (x, y, wt), max_norm=0.5)
  assert float(out["ghost"][1][1]) == 0.0
  np.testing.assert_allclose(out["ghost"][1], out["vmap"][1], rtol=1e-5)
  assert tree_rel(out["vmap"][0], out["ghost"][0]) < 1e-5
  # max_norm = inf: the plain gradient of the summed loss.
  g, _ = jitted(loss_fn, "ghost", math.inf)(p, x, y)
  ref = jax.jit(jax.grad(lambda p: loss_fn(p, x, y).sum()))(p)
  assert tree_rel(ref, g) < 1e-5
  # batch size 1
  out = both(loss_fn, p, (x[:1], y[:1]), max_norm=0.5)
  np.testing.assert_allclose(out["ghost"][1], out["vmap"][1], rtol=1e-5)
  assert tree_rel(out["vmap"][0], out["ghost"][0]) < 1e-5


# A NaN loss in a recurrent model (lax.scan): test_ghost_models.py's
# test_nan_loss_contributes_zero[plain_jax].
@pytest.mark.parametrize("name", ["mlp"])
def test_edge_nan_example(name):
  loss_fn, p, batch = _setup(name)
  if name == "mlp":
    batch = (batch[0].at[2, 0].set(jnp.nan),) + batch[1:]
  bad = lambda p, *b: b[-1] * loss_fn(p, *b[:-1])
  w = jnp.where(jnp.arange(6) == 4, jnp.nan, 1.0)
  out = both(bad, p, batch + (w,), max_norm=0.3)
  keep = np.array([i not in (2, 4) for i in range(6)]) if name == "mlp" else \
      np.array([i != 4 for i in range(6)])
  for m in ("vmap", "ghost"):
    g, n = out[m]
    assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(g)), m
    assert not np.isfinite(n[4])
  sub = tuple(x[keep] for x in batch)
  ref = both(loss_fn, p, sub, max_norm=0.3, methods=("vmap",))["vmap"][0]
  assert tree_rel(ref, out["ghost"][0]) < 1e-5
  assert tree_rel(ref, out["vmap"][0]) < 1e-5


# ----------------------------------------------------------------- refusals


def test_refuses_batchnorm():

  class BN(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=False, name="bn")(nn.Dense(4)(x))

  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)
  m = BN()
  v = jax.jit(m.init)(KEY, x)
  lf = lambda p, x: m.apply({**v, "params": p}, x, mutable=["batch_stats"])[0].sum(-1)
  with pytest.raises(ValueError):
    dp.clipped_grad(lf, max_norm=1.0, method="ghost")(v["params"], x)
  # vmap computes it (each example normalised on its own: a different function).
  g = jax.jit(dp.clipped_grad(lf, max_norm=1.0, method="vmap"))(v["params"], x)
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(g))


def test_tied_embedding_exact():

  class Tied(nn.Module):

    @nn.compact
    def __call__(self, t):
      emb = nn.Embed(10, 4, name="tok_embed")
      return emb.attend(nn.tanh(nn.Dense(4)(emb(t))))

  t = jnp.asarray(np.random.default_rng(2).integers(0, 10, size=(3, 5)))
  m2 = Tied()
  p2 = jax.jit(m2.init)(KEY, t)
  lf2 = lambda p, t: ce(m2.apply(p, t)[:, :-1], t[:, 1:]).mean(-1)
  out = both(lf2, p2, (t,), max_norm=0.2)
  np.testing.assert_allclose(out["ghost"][1], out["vmap"][1], rtol=1e-5)
  assert tree_rel(out["vmap"][0], out["ghost"][0]) < 1e-5


# ------------------------------------------------------------------ accounting


def test_accounting_roundtrip():
  pytest.importorskip("dp_accounting")
  q, steps, delta = 256 / 25000, 500, 1e-5
  s = accounting.noise_multiplier_for_epsilon(3.0, delta, q, steps)
  eps = accounting.epsilon_spent(s, q, steps, delta)
  assert eps <= 3.0 + 1e-6 and eps > 2.9
  assert accounting.epsilon_spent(s * 1.5, q, steps, delta) < eps
  assert accounting.epsilon_spent(s, q, 0, delta) == 0.0
  assert accounting.epsilon_spent(0.0, q, 1, delta) == math.inf
  with pytest.raises(ValueError, match="sample_rate"):
    accounting.epsilon_spent(1.0, 0.0, 10, delta)
  assert accounting.epsilon_spent(math.inf, q, steps, delta) == 0.0
  assert accounting.noise_multiplier_for_epsilon(math.inf, delta, q, steps) == 0.0
  assert accounting.epsilon_spent(np.float32(s), jnp.asarray(q), np.int64(steps),
                                  delta) == pytest.approx(eps, rel=1e-6)
  for bad, match in [((math.nan, q, steps, delta), "NaN"), ((1.0, q, 2.5, delta), "steps"),
                     ((1.0, q, -1, delta), "steps"), ((-1.0, q, steps, delta), ">= 0"),
                     ((1.0, q, steps, 1.0), "delta"), ((1.0, 1.5, steps, delta), "sample")]:
    with pytest.raises(ValueError, match=match):
      accounting.epsilon_spent(*bad)
  for bad in [("1.0", q, steps, delta), (1.0, q, steps, None), (True, q, steps, delta)]:
    with pytest.raises(TypeError):
      accounting.epsilon_spent(*bad)
  with pytest.raises(ValueError, match="target_eps"):
    accounting.noise_multiplier_for_epsilon(0.0, delta, q, steps)


def test_train_step_snippet():
  """The trainer integration: clipped_grad -> add_noise -> scale(1/B) -> optimizer."""
  loss_fn, p, batch = _setup("mlp")
  b = batch[0].shape[0]
  tx = optax.chain(gradclip_jax.add_noise(1.0, 0.5, seed=0), optax.scale(1.0 / b),
                   optax.sgd(0.1))
  grad_fn = gradclip_jax.clipped_grad(loss_fn, max_norm=0.5, return_norms=True)

  @jax.jit
  def step(params, opt_state, *batch):
    grads, norms = grad_fn(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, norms

  s = tx.init(p)
  p1, s1, norms = step(p, s, *batch)
  p1b, _, _ = step(p, tx.init(p), *batch)
  chex.assert_trees_all_close(p1, p1b)  # same seed, same noise
  assert norms.shape == (b,)
  p2, _, _ = step(p1, s1, *batch)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(p2))


# num_steps == batch size is the case that can go wrong (a T != B control would pass
# with a shape-guessing bug, and adds nothing that this case does not check).
@pytest.mark.parametrize("num_steps", [4])
def test_project_ptb_model_time_major_with_steps_equal_to_batch(num_steps):
  # The PTB model runs its LSTM time-major: with num_steps == batch size (4) the
  # time axis has the batch's size, and must not be taken for the batch axis.
  from gradclip_jax.training.ptb import configs, train  # pylint: disable=import-outside-toplevel
  import dataclasses  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(configs.get_config("test"), hidden_size=6, num_layers=2,
                            vocab_size=30, num_steps=num_steps, batch_size=4)
  model = train.build_model(cfg)
  params = train.init_state(model, optax.sgd(1.0), cfg, seed=0).params
  x = jax.random.randint(jax.random.key(1), (4, num_steps), 0, 30)
  y = jax.random.randint(jax.random.key(2), (4, num_steps), 0, 30)
  lf = train.per_window_loss_fn(model, jax.random.key(3))
  w = jnp.ones(4)  # every window real (weight 0 marks padding)
  out = {m: jax.jit(dp.clipped_grad(lf, max_norm=0.5, method=m, has_aux=True,
                                    return_norms=True))(params, x, y, w)
         for m in ("vmap", "ghost")}
  np.testing.assert_allclose(out["ghost"][1], out["vmap"][1], rtol=1e-5)
  assert tree_rel(out["vmap"][0], out["ghost"][0]) < 1e-5
