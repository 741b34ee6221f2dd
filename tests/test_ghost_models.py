"""Ghost clipping on models of every kind, exact against per-example gradients.

Each model is checked three ways:

* ``clipped_grad(method="ghost", return_norms=True)`` against an independent
  reference written here: ``jax.vmap(jax.grad(...))`` of the single-example loss
  with the clipping done in NumPy (float64). float32, relative error <= 1e-5 on the
  per-example norms and on the clipped sum; ``max_norm`` is the median norm, so
  clipped and unclipped examples both occur.
* ``dp.ghost_coverage``: the rule family of the emblematic parameters
  (``dot_general``, ``gather``, ``elementwise``, ``conv_general_dilated``), and the
  exact set of parameters on the per-operation fallback (empty unless the model has
  a layer no rule can know), so a covered layer that slips to the fallback fails.
* Edge cases: an all-zero example, ``max_norm=inf``, a NaN loss, ``B = 1``, a
  BatchNorm refusal, and an import of ``gradclip_jax`` that loads no Flax.

Shapes are tiny: the module is about compile time, not arithmetic.
"""
import functools
import math
import subprocess
import sys

import equinox as eqx
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax
import pytest

from gradclip_jax import dp

KEY = jax.random.key(0)
B = 4
ce = optax.softmax_cross_entropy_with_integer_labels


# ------------------------------------------------------------------ reference


_JITTED = {}  # (kind, loss_fn) -> jitted function: one compile per model and shape


def per_example_grads(loss_fn, params, batch):
  """vmap(grad) of the single-example loss: leaves ``[B, ...]`` as float64 NumPy."""
  key = ("ref", loss_fn)
  if key not in _JITTED:

    def one(p, *ex):
      return loss_fn(p, *[x[None] for x in ex])[0]

    _JITTED[key] = jax.jit(lambda p, *b: jax.vmap(
        jax.grad(one), in_axes=(None,) + (0,) * len(b))(p, *b))
  pe = _JITTED[key](params, *batch)
  return jax.tree.map(lambda l: np.asarray(l, np.float64), pe)


def np_clip_sum(pe, max_norm):
  """NumPy: per-example norms and sum_b min(1, C / n_b) g_b (non-finite dropped)."""
  leaves, treedef = jax.tree.flatten(pe)
  b = leaves[0].shape[0]
  with np.errstate(all="ignore"):
    norms = np.sqrt(sum((l.reshape(b, -1) ** 2).sum(1) for l in leaves))
    fin = np.isfinite(norms)
    scale = np.where(norms > max_norm, max_norm / np.where(norms > 0, norms, 1), 1.0)
    scale = np.where(fin, scale, 0.0)
    out = []
    for l in leaves:
      shp = (-1,) + (1,) * (l.ndim - 1)
      out.append(np.where(fin.reshape(shp), l * scale.reshape(shp), 0.0).sum(0))
  return jax.tree.unflatten(treedef, out), norms


def ref_clipped(loss_fn, params, batch, max_norm):
  """The reference clipped sum and norms (independent of gradclip_jax)."""
  return np_clip_sum(per_example_grads(loss_fn, params, batch), max_norm)


def ghost(loss_fn, params, batch, max_norm):
  """clipped_grad(method="ghost", return_norms=True), jitted once per loss_fn.

  ``max_norm`` is passed traced, so one compiled program serves every threshold.
  """
  key = ("ghost", loss_fn)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda p, c, *b: dp.clipped_grad(
        loss_fn, max_norm=c, method="ghost", return_norms=True)(p, *b))
  return _JITTED[key](params, jnp.float32(max_norm), *batch)


def tree_rel_err(ref, got):
  r = [np.asarray(x, np.float64) for x in jax.tree.leaves(ref)]
  g = [np.asarray(x, np.float64) for x in jax.tree.leaves(got)]
  assert len(r) == len(g)
  num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(r, g))
  den = sum(float(np.sum(a ** 2)) for a in r)
  return math.sqrt(num / max(den, 1e-300))


def check_exact(loss_fn, params, batch, max_norm=None):
  """Ghost == reference (norms and clipped sum); returns (reference, ghost) norms."""
  pe = per_example_grads(loss_fn, params, batch)
  if max_norm is None:
    _, n0 = np_clip_sum(pe, math.inf)
    max_norm = float(np.median(n0[np.isfinite(n0)]))
  ref, ref_norms = np_clip_sum(pe, max_norm)
  got, norms = ghost(loss_fn, params, batch, max_norm)
  assert jax.tree.structure(got) == jax.tree.structure(params)
  for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    assert g.shape == p.shape and g.dtype == p.dtype
  fin = np.isfinite(ref_norms)
  np.testing.assert_array_equal(np.isfinite(norms), fin)
  np.testing.assert_allclose(np.asarray(norms)[fin], ref_norms[fin], rtol=1e-5, atol=0)
  err = tree_rel_err(ref, got)
  assert err <= 1e-5, f"clipped sum relative error {err:.2e}"
  return ref_norms, np.asarray(norms)


def fallbacks(cov):
  return {k for k, v in cov.items() if v.startswith("fallback")}


def matches(key, fragments):
  """Whether every fragment is a component of the ``a/b/c`` coverage key."""
  parts = key.split("/")
  return all(f in parts for f in fragments)


def rule_of(cov, *fragments):
  """The rule of the one coverage key that has every fragment as a component."""
  keys = [k for k in cov if matches(k, fragments)]
  assert len(keys) == 1, (fragments, sorted(cov))
  return cov[keys[0]]


def assert_family(cov, family, *fragments):
  rule = rule_of(cov, *fragments)
  assert rule.startswith(family), (fragments, rule)


def tokens(b=B, t=6, vocab=20, seed=0, min_len=2):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(min_len, t + 1, size=b)
  lengths[0] = t  # one full-length example
  tok = rng.integers(1, vocab, size=(b, t))
  tok = np.where(np.arange(t)[None] < lengths[:, None], tok, 0)
  y = rng.integers(0, 2, size=b)
  return jnp.asarray(tok), jnp.asarray(lengths), jnp.asarray(y)


# --------------------------------------------------------------------- models


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(5, 8, rngs=rngs)
    self.fc2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


class NnxBlock(nnx.Module):
  """Token + learned position embeddings, one pre-LN transformer block, a head."""

  def __init__(self, vocab, t, d, rngs):
    self.tok = nnx.Embed(vocab, d, rngs=rngs)
    self.pos = nnx.Embed(t, d, rngs=rngs)
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=d, decode=False,
                                       rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
    self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)
    self.head = nnx.Linear(d, 2, rngs=rngs)

  def __call__(self, tok, lengths):
    valid = jnp.arange(tok.shape[1])[None] < lengths[:, None]
    x = self.tok(tok) + self.pos(jnp.arange(tok.shape[1]))[None]
    x = x + self.attn(self.ln1(x), mask=nnx.make_attention_mask(valid, valid))
    x = x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))
    pooled = jnp.sum(x * valid[..., None], 1) / lengths[:, None]
    return self.head(pooled)


def nnx_loss(module):
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss_fn(p, *batch):
    *inputs, y = batch
    return ce(nnx.merge(graphdef, p, rest)(*inputs), y)

  return loss_fn, params


class LinenRNN(nn.Module):
  cell: str

  @nn.compact
  def __call__(self, tok, lengths):
    x = nn.Embed(20, 6)(tok)
    cell = {"olstm": nn.OptimizedLSTMCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}[
        self.cell](7)
    h = nn.RNN(cell)(x, seq_lengths=lengths)
    mask = (jnp.arange(tok.shape[1])[None] < lengths[:, None])[..., None]
    return nn.Dense(2)(jnp.sum(h * mask, 1) / lengths[:, None])


def plain_jax_model():
  rng = np.random.default_rng(3)
  f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)
  params = {"emb": f(20, 6), "w_in": f(6, 7), "w_rec": f(7, 7), "b": f(7),
            "w_out": f(7, 2)}

  def loss_fn(p, tok, lengths, y):
    x = jnp.take(p["emb"], tok, axis=0)  # [B, T, d]
    mask = (jnp.arange(tok.shape[1])[None] < lengths[:, None]).astype(x.dtype)

    def step(h, inp):
      x_t, m_t = inp
      h_new = jnp.tanh(jnp.einsum("bd,dh->bh", x_t, p["w_in"]) + h @ p["w_rec"] + p["b"])
      return m_t[:, None] * h_new + (1 - m_t[:, None]) * h, None

    h0 = jnp.zeros((tok.shape[0], 7), x.dtype)
    h, _ = lax.scan(step, h0, (jnp.swapaxes(x, 0, 1), mask.T))
    return ce(jnp.einsum("bh,hc->bc", h, p["w_out"]), y)

  return loss_fn, params


class EqxNet(eqx.Module):
  emb: eqx.nn.Embedding
  conv: eqx.nn.Conv1d
  ln: eqx.nn.LayerNorm
  out: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.emb = eqx.nn.Embedding(20, 6, key=k1)
    self.conv = eqx.nn.Conv1d(6, 5, kernel_size=3, key=k2)
    self.ln = eqx.nn.LayerNorm(5)
    self.out = eqx.nn.Linear(5, 2, key=k3)

  def __call__(self, tok):  # one example: tok [T]
    x = jax.vmap(self.emb)(tok).T  # [d, T]
    h = jnp.tanh(self.conv(x)).mean(-1)  # [5]
    return self.out(self.ln(h))


def eqx_model():
  model = EqxNet(jax.random.key(2))
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def loss_fn(p, tok, y):
    m = eqx.combine(p, static)
    return jax.vmap(lambda t, y: ce(m(t), y))(tok, y)

  return loss_fn, params


class ConvNet(nn.Module):

  @nn.compact
  def __call__(self, img, seq):
    a = nn.relu(nn.Conv(3, (3, 3), name="c2d")(img))  # stride 1, SAME, no groups
    a = nn.relu(nn.Conv(4, (3, 3), strides=2, name="c2d_strided")(a))
    a = nn.relu(nn.Conv(4, (3, 3), feature_group_count=2, kernel_dilation=2,
                        padding="SAME", name="c2d_grouped_dilated")(a))
    s = nn.relu(nn.Conv(6, (3,), strides=2, kernel_dilation=2, name="c1d")(seq))
    s = nn.Conv(6, (3,), feature_group_count=3, use_bias=False, name="c1d_grouped")(s)
    z = jnp.concatenate([a.reshape(a.shape[0], -1), s.reshape(s.shape[0], -1)], -1)
    return nn.Dense(3, name="head")(z)


def tied_lm():
  rng = np.random.default_rng(4)
  params = {"emb": jnp.asarray(rng.normal(size=(20, 6)), jnp.float32),
            "w": jnp.asarray(rng.normal(size=(6, 6)) * 0.4, jnp.float32),
            "b": jnp.zeros((6,), jnp.float32)}

  def loss_fn(p, tok):
    x = p["emb"][tok]  # lookup
    h = jnp.tanh(x @ p["w"] + p["b"])
    logits = h @ p["emb"].T  # the same table scores the next token
    return ce(logits[:, :-1], tok[:, 1:]).mean(-1)

  return loss_fn, params


@jax.custom_vjp
def scaled_matmul(x, w):
  return x @ w


def _sm_fwd(x, w):
  return x @ w, (x, w)


def _sm_bwd(res, g):
  x, w = res
  return g @ w.T, x.T @ g


scaled_matmul.defvjp(_sm_fwd, _sm_bwd)


def custom_vjp_model():
  rng = np.random.default_rng(5)
  params = {"dense": {"w": jnp.asarray(rng.normal(size=(5, 6)), jnp.float32),
                      "b": jnp.asarray(rng.normal(size=(6,)), jnp.float32)},
            "custom": {"w": jnp.asarray(rng.normal(size=(6, 4)) * 0.5, jnp.float32)},
            "head": {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}}

  def loss_fn(p, x, y):
    h = jnp.tanh(x @ p["dense"]["w"] + p["dense"]["b"])
    h = jnp.tanh(scaled_matmul(h, p["custom"]["w"]))
    return ce(h @ p["head"]["w"], y)

  return loss_fn, params


def shared_input_model():
  """Four kernels read the same ``x``: two alone, one also on ``u``, one in a penalty.

  ``w1`` and ``w4`` share only ``x`` (one fused product; ``T = 2`` is small enough for
  the Gram form); ``w3`` is also applied to ``u`` and ``w2`` also enters a weight
  penalty, so those two keep their own rules.
  """
  rng = np.random.default_rng(5)
  f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.4, jnp.float32)
  params = {"w1": f(8, 6), "w2": f(8, 3), "w3": f(8, 5), "w4": f(8, 6), "v": f(20, 3)}

  def loss_fn(p, x, u, y):
    h1 = jnp.tanh(x @ p["w1"])
    h2 = jnp.tanh(x @ p["w2"])
    h3 = jnp.tanh(x @ p["w3"] + u @ p["w3"])
    h4 = jnp.sin(x @ p["w4"])
    feats = jnp.concatenate([h1, h2, h3, h4], -1).sum(1)  # [B, 20]
    return ce(feats @ p["v"], y) + 0.05 * jnp.sum(p["w2"] ** 2)

  return loss_fn, params


# ----------------------------------------------------------------------- setup


@functools.lru_cache(maxsize=None)
def setup(name):
  """(loss_fn, params, batch) for each model under test (built once per name)."""
  rng = np.random.default_rng(7)
  y3 = jnp.asarray(rng.integers(0, 3, size=B))
  if name == "nnx_mlp":
    lf, p = nnx_loss(NnxMLP(nnx.Rngs(0)))
    return lf, p, (jnp.asarray(rng.normal(size=(B, 5)), jnp.float32), y3)
  if name == "nnx_block":
    tok, lengths, y = tokens(t=5)
    lf, p = nnx_loss(NnxBlock(20, 5, 8, nnx.Rngs(1)))
    return lf, p, (tok, lengths, y)
  if name in ("olstm", "lstm", "gru"):
    tok, lengths, y = tokens()
    m = LinenRNN(name)
    p = jax.jit(m.init)(KEY, tok, lengths)  # one compile, not op-by-op
    return (lambda p, t, l, y: ce(m.apply(p, t, l), y)), p, (tok, lengths, y)
  if name == "plain_jax":
    lf, p = plain_jax_model()
    return (lf, p, tokens())
  if name == "equinox":
    lf, p = eqx_model()
    tok, _, y = tokens(t=7)
    return lf, p, (tok, y)
  if name == "conv":
    m = ConvNet()
    img = jnp.asarray(rng.normal(size=(B, 9, 9, 2)), jnp.float32)
    seq = jnp.asarray(rng.normal(size=(B, 13, 3)), jnp.float32)
    p = jax.jit(m.init)(KEY, img, seq)
    return (lambda p, a, s, y: ce(m.apply(p, a, s), y)), p, (img, seq, y3)
  if name == "tied_lm":
    lf, p = tied_lm()
    return lf, p, (tokens(t=6)[0],)
  if name == "custom_vjp":
    lf, p = custom_vjp_model()
    return lf, p, (jnp.asarray(rng.normal(size=(B, 5)), jnp.float32), y3)
  if name == "shared_input":
    lf, p = shared_input_model()
    x = jnp.asarray(rng.normal(size=(B, 2, 8)), jnp.float32)
    u = jnp.asarray(rng.normal(size=(B, 2, 8)), jnp.float32)
    return lf, p, (x, u, y3)
  raise ValueError(name)


# Per model: (family, key fragments) for emblematic parameters, and the exact set of
# coverage keys (by fragments) expected on the fallback: empty, except for the
# custom_vjp layer no rule can see into.
EXPECT = {
    "nnx_mlp": ([("dot_general", ("fc1", "kernel")), ("dot_general", ("fc2", "kernel")),
                 ("elementwise", ("fc1", "bias"))], []),
    "nnx_block": ([("gather", ("tok", "embedding")),
                   ("dot_general", ("attn", "query", "kernel")),
                   ("dot_general", ("attn", "out", "kernel")),
                   ("elementwise", ("ln1", "scale")), ("elementwise", ("ln2", "bias")),
                   ("dot_general", ("fc1", "kernel")), ("elementwise", ("fc2", "bias"))],
                  []),
    "olstm": ([("gather", ("Embed_0", "embedding")), ("dot_general", ("Dense_0", "kernel")),
               ("dot_general", ("OptimizedLSTMCell_0", "hi", "kernel")),
               ("dot_general", ("OptimizedLSTMCell_0", "ii", "kernel")),
               ("elementwise", ("OptimizedLSTMCell_0", "hf", "bias"))], []),
    "gru": ([("gather", ("Embed_0", "embedding")), ("dot_general", ("Dense_0", "kernel")),
             ("dot_general", ("GRUCell_0", "hn", "kernel")),
             ("dot_general", ("GRUCell_0", "iz", "kernel")),
             ("elementwise", ("GRUCell_0", "in", "bias"))], []),
    "plain_jax": ([("gather", ("emb",)), ("dot_general", ("w_out",)),
                   ("dot_general", ("w_in",)), ("dot_general", ("w_rec",)),
                   ("elementwise", ("b",))], []),
    "equinox": ([("gather", ("emb", "weight")), ("conv_general_dilated", ("conv", "weight")),
                 ("dot_general", ("out", "weight")), ("elementwise", ("ln", "weight")),
                 ("elementwise", ("ln", "bias"))], []),
    "conv": ([("conv_general_dilated", ("c2d", "kernel")),
              ("conv_general_dilated", ("c2d_strided", "kernel")),
              ("conv_general_dilated", ("c2d_grouped_dilated", "kernel")),
              ("conv_general_dilated", ("c1d", "kernel")),
              ("conv_general_dilated", ("c1d_grouped", "kernel")),
              ("elementwise", ("c2d_strided", "bias")), ("dot_general", ("head", "kernel"))],
             []),
    # the table read by a gather and by h @ emb.T: exact cross terms, no fallback
    "tied_lm": ([("gather", ("emb",)), ("dot_general", ("w",)), ("elementwise", ("b",))],
                []),
    "custom_vjp": ([("dot_general", ("dense", "w")), ("elementwise", ("dense", "b")),
                    ("dot_general", ("head", "w"))], [("custom", "w")]),
    # linen.LSTMCell: eight separate Dense kernels, fused into one product
    "lstm": ([("gather", ("Embed_0", "embedding")), ("dot_general", ("Dense_0", "kernel")),
              ("dot_general", ("LSTMCell_0", "hi", "kernel")),
              ("dot_general", ("LSTMCell_0", "ii", "kernel")),
              ("elementwise", ("LSTMCell_0", "hf", "bias"))], []),
    "shared_input": ([("dot_general", ("w1",)), ("dot_general", ("w3",)),
                      ("dot_general", ("w4",))], []),
}
MODELS = list(EXPECT)


@pytest.mark.parametrize("name", MODELS)
def test_exact_against_vmap(name):
  loss_fn, params, batch = setup(name)
  norms, _ = check_exact(loss_fn, params, batch)
  assert np.all(norms > 0)


@pytest.mark.parametrize("name", MODELS)
def test_coverage(name):
  loss_fn, params, batch = setup(name)
  cov = dp.ghost_coverage(loss_fn, params, *batch)
  assert len(cov) == len(jax.tree.leaves(params)), sorted(cov)
  assert all(isinstance(v, str) and v for v in cov.values()), cov
  emblematic, fb = EXPECT[name]
  for family, fragments in emblematic:
    assert_family(cov, family, *fragments)
  expected = {k for k in cov for frags in fb if matches(k, frags)}
  assert fallbacks(cov) == expected, cov


def test_rnn_kernels_exact_rules():
  """The recurrent cells' kernels (inside the scan) get exact rules too."""
  for name in ("olstm", "gru"):
    loss_fn, params, batch = setup(name)
    cov = dp.ghost_coverage(loss_fn, params, *batch)
    cell = [k for k in cov if "Cell" in k and "kernel" in k]
    assert cell, sorted(cov)
    assert not fallbacks(cov), cov


FUSED = "[fused: "


def test_shared_operands_are_fused():
  """Kernels of different parameters on one data operand share one product."""
  loss_fn, params, batch = setup("lstm")
  cov = dp.ghost_coverage(loss_fn, params, *batch)
  kernels = {k: v for k, v in cov.items() if "LSTMCell_0" in k and "kernel" in k}
  assert len(kernels) == 8, sorted(cov)
  # x_t and h_{t-1} times four gates: one [K_x + K_h, 4 N] product per example
  assert all(v.startswith("dot_general: per-example, reused (scan)")
             and FUSED + "8 parameters" in v for v in kernels.values()), kernels
  assert not any(FUSED in v for k, v in cov.items() if k not in kernels), cov
  # GRUCell: n = tanh(x W_in + r * (h W_hn)) has other output gradients than the
  # other gates: x's three kernels and h's three kernels, two products of three
  loss_fn, params, batch = setup("gru")
  cov = dp.ghost_coverage(loss_fn, params, *batch)
  kernels = {k: v for k, v in cov.items() if "GRUCell_0" in k and "kernel" in k}
  assert len(kernels) == 6 and all(FUSED + "3 parameters" in v
                                   for v in kernels.values()), kernels
  # w1 and w4 share x only; w3 is also read on u, w2 also by a penalty: not fused
  loss_fn, params, batch = setup("shared_input")
  cov = dp.ghost_coverage(loss_fn, params, *batch)
  assert FUSED + "2 parameters" in cov["w1"] and FUSED + "2 parameters" in cov["w4"], cov
  assert FUSED not in cov["w2"] and FUSED not in cov["w3"], cov
  assert cov["w3"].endswith("x2 uses"), cov


def test_seq_lengths_padding_is_ignored():
  loss_fn, params, (tok, lengths, y) = setup("olstm")
  pad = jnp.arange(tok.shape[1])[None] >= lengths[:, None]
  g1, n1 = ghost(loss_fn, params, (tok, lengths, y), 0.3)
  g2, n2 = ghost(loss_fn, params, (jnp.where(pad, 11, tok), lengths, y), 0.3)
  np.testing.assert_allclose(n1, n2, rtol=1e-6)
  assert tree_rel_err(g1, g2) < 1e-6


# ----------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", ["plain_jax", "nnx_mlp"])
def test_all_zero_example(name):
  loss_fn, params, batch = setup(name)
  w = jnp.array([1.0, 0.0, 1.0, 1.0])  # example 1 has a zero loss and gradient
  lf = lambda p, *b: loss_fn(p, *b[:-1]) * b[-1]
  ref_norms, norms = check_exact(lf, params, batch + (w,))
  assert ref_norms[1] == 0.0 and norms[1] == 0.0
  assert np.all(np.delete(norms, 1) > 0)


@pytest.mark.parametrize("name", ["nnx_block", "olstm"])
def test_inf_threshold_is_the_plain_gradient(name):
  loss_fn, params, batch = setup(name)
  g, norms = ghost(loss_fn, params, batch, math.inf)  # compiled by the exact test
  ref = jax.jit(jax.grad(lambda p, *b: loss_fn(p, *b).sum()))(params, *batch)
  assert tree_rel_err(ref, g) <= 1e-5
  assert np.all(np.isfinite(norms))


@pytest.mark.parametrize("name", ["nnx_mlp", "plain_jax"])
def test_nan_loss_contributes_zero(name):
  loss_fn, params, batch = setup(name)
  w = jnp.where(jnp.arange(B) == 2, jnp.nan, 1.0)
  lf = lambda p, *b: loss_fn(p, *b[:-1]) * b[-1]
  got, norms = ghost(lf, params, batch + (w,), 0.5)
  assert not np.isfinite(norms[2])
  assert np.all(np.isfinite(np.delete(np.asarray(norms), 2)))
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(got))
  keep = np.arange(B) != 2
  ref, _ = ref_clipped(loss_fn, params, tuple(x[keep] for x in batch), 0.5)
  assert tree_rel_err(ref, got) <= 1e-5


@pytest.mark.parametrize("name", ["plain_jax", "equinox"])
def test_batch_of_one(name):
  loss_fn, params, batch = setup(name)
  check_exact(loss_fn, params, tuple(x[:1] for x in batch), max_norm=0.1)


def test_batchnorm_with_batch_statistics_is_refused():

  class BN(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(nn.BatchNorm(use_running_average=False, name="bn")(
          nn.Dense(4)(x)))

  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 3)), jnp.float32)
  m = BN()
  v = m.init(KEY, x)
  lf = lambda p, x: m.apply({**v, "params": p}, x, mutable=["batch_stats"])[0].sum(-1)
  with pytest.raises(ValueError) as info:
    jax.jit(dp.clipped_grad(lf, max_norm=1.0, method="ghost"))(v["params"], x)
  assert "example" in str(info.value).lower(), str(info.value)


def test_import_loads_no_flax():
  code = ("import gradclip_jax, sys; "
          "bad = sorted(m for m in sys.modules if m == 'flax' or m.startswith('flax.')); "
          "assert not bad, bad")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=False, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
