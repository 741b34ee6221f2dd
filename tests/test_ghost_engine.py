"""The ghost engine's mechanisms: forms per use, mixed precision, cond, chunks, the
rule protocol.

References as in ``test_ghost_models.py``: ``jax.vmap(jax.grad(...))`` of the
single-example loss, clipped in NumPy (float64). float32 models: relative error
<= 1e-5; bfloat16/float16 compute: <= 2e-2 against per-example gradients computed in
the same precision.
"""
import math
from typing import NamedTuple

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax
import pytest

from gradclip_jax import dp
from gradclip_jax.dp import _clipped_grad as cg
from gradclip_jax.dp import _rules
from test_ghost_models import fallbacks
from test_ghost_models import np_clip_sum
from test_ghost_models import per_example_grads
from test_ghost_models import setup
from test_ghost_models import tree_rel_err

ce = optax.softmax_cross_entropy_with_integer_labels
B = 4


def _jit_ghost(loss_fn, max_norm, **kw):
  """A fresh jit: traced under the current rules, forms and budget."""
  return jax.jit(dp.clipped_grad(loss_fn, max_norm=max_norm, method="ghost",
                                 return_norms=True, **kw))


def check_exact(loss_fn, params, batch, tol=1e-5):
  """Ghost == the NumPy reference (norms, clipped sum), the median norm as max_norm."""
  pe = per_example_grads(loss_fn, params, batch)
  _, n0 = np_clip_sum(pe, math.inf)
  c = float(np.median(n0))
  ref, ref_norms = np_clip_sum(pe, c)
  got, norms = _jit_ghost(loss_fn, c)(params, *batch)
  for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    assert g.dtype == p.dtype and g.shape == p.shape
  np.testing.assert_allclose(norms, ref_norms, rtol=tol)
  assert tree_rel_err(ref, got) <= tol


# ------------------------------------------------------------- mixed precision


class Mixed(nn.Module):
  """Embedding, LSTM (``rnn``), LayerNorm and Dense layers computing in ``dtype``."""
  dtype: object
  rnn: bool = True

  @nn.compact
  def __call__(self, tok):
    kw = {"dtype": self.dtype}
    h = nn.Embed(30, 8, **kw)(tok)
    if self.rnn:
      h = nn.RNN(nn.LSTMCell(12, **kw))(h)
    h = nn.LayerNorm(**kw)(h)
    h = nn.relu(nn.Dense(16, **kw)(h.mean(1)))
    return nn.Dense(3, **kw)(h).astype(jnp.float32)


class NnxMixed(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(5, 16, dtype=jnp.bfloat16, rngs=rngs)
    self.l2 = nnx.Linear(16, 3, dtype=jnp.bfloat16, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.gelu(self.l1(x))).astype(jnp.float32)


def _mixed_setup(name):
  rng = np.random.default_rng(3)
  y = jnp.asarray(rng.integers(0, 3, size=B))
  if name.startswith("linen"):
    _, compute, store = name.split("-")
    rnn = compute == "bfloat16" and store == "float32"  # the LSTM once: compile time
    m = Mixed(jnp.dtype(compute), rnn)
    tok = jnp.asarray(rng.integers(0, 30, size=(B, 5)))
    p = jax.jit(Mixed(jnp.float32, rnn).init)(jax.random.key(1), tok)
    p = jax.tree.map(lambda a: a.astype(store), p)
    return (lambda p, t, y: ce(m.apply(p, t), y)), p, (tok, y)
  if name == "nnx-bfloat16":
    gd, p, rest = nnx.split(NnxMixed(nnx.Rngs(0)), nnx.Param, ...)
    x = jnp.asarray(rng.normal(size=(B, 5)), jnp.float32)
    return (lambda p, x, y: ce(nnx.merge(gd, p, rest)(x), y)), p, (x, y)
  if name == "preferred-element-type":
    def lf(p, x, y):
      h = jnp.dot(x.astype(jnp.bfloat16), p["w"].astype(jnp.bfloat16),
                  preferred_element_type=jnp.float32)
      return ce(h, y)
    p = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    return lf, p, (jnp.asarray(rng.normal(size=(B, 5)), jnp.float32), y)
  raise ValueError(name)


@pytest.mark.parametrize("name", ["linen-bfloat16-float32", "linen-float16-float32",
                                  "linen-bfloat16-bfloat16", "nnx-bfloat16",
                                  "preferred-element-type"])
def test_mixed_precision_exact(name):
  loss_fn, params, batch = _mixed_setup(name)
  cov = dp.ghost_coverage(loss_fn, params, *batch)
  assert not fallbacks(cov), cov
  check_exact(loss_fn, params, batch, tol=2e-2)


def test_clipped_sum_of_a_low_precision_use_keeps_float32():
  """A float32 parameter read in bfloat16: the clipped sum reaches it unrounded.

  Per example the gradient is ``x_b^T g_b`` with ``x_b`` and ``g_b`` bfloat16 values;
  their sum over 64 examples, computed exactly in NumPy, is matched to float32
  precision (rounding it to bfloat16 on the way, as a cast of the cotangent to the
  use's dtype would, gives errors near 4e-3).
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  w = {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}

  def loss_fn(p, x, c):
    h = x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16)
    return jnp.sum(h.astype(jnp.float32) * c, axis=1)

  got = jax.jit(dp.clipped_grad(loss_fn, max_norm=math.inf, method="ghost"))(w, x, c)
  xb = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  cb = np.asarray(c.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  ref = xb.T @ cb
  err = np.max(np.abs(np.asarray(got["w"], np.float64) - ref)) / np.max(np.abs(ref))
  assert err < 1e-5, err


# ----------------------------------------------------------------- forms per use


def _force(monkeypatch, form):
  def choose(forms, budget):
    del budget
    return form if form in forms else next(iter(forms))
  monkeypatch.setattr(cg, "choose_form", choose)


@pytest.mark.parametrize("form", [_rules.NORM, _rules.PER_EXAMPLE])
@pytest.mark.parametrize("name", ["lstm", "tied_lm"])
def test_both_forms_are_exact(monkeypatch, name, form):
  loss_fn, params, batch = setup(name)
  _force(monkeypatch, form)
  cov = dp.ghost_coverage(loss_fn, params, *batch)
  label = {"norm": "dot_general: gram", "per-example": "dot_general: per-example"}[form]
  dots = [v for k, v in cov.items() if v.startswith("dot_general")]
  assert dots and (all(v.startswith(label) for v in dots) or name == "tied_lm"), cov
  check_exact(loss_fn, params, batch)  # traced anew: the forced form


def _dense_chain(t, k, n):
  """x [B, t, k] @ w [k, n], summed: one dot_general use with T = t positions."""
  def loss_fn(p, x):
    return jnp.sum(jnp.tanh(x @ p["w"]), axis=(1, 2))
  x = jnp.ones((B, t, k)) / k
  return loss_fn, {"w": jnp.ones((k, n)) / n}, x


@pytest.mark.parametrize("t,k,n,form", [
    (1, 64, 64, "gram"),                   # T = 1: |a|^2 |g|^2
    (4, 16, 32, "gram"),                   # T^2 (K + N) = 768 < 2 K N = 1024
    (8, 16, 32, "per-example, reused"),    # T^2 (K + N) = 3072 > 1024
    (256, 256, 512, "per-example, reused"),  # linen LSTMCell's fused block
    (4, 4096, 4096, "gram"),               # K N floats per example: too many
])
def test_the_form_of_a_use_is_the_documented_one(t, k, n, form):
  # FLOPs: gram H (T^2 (K + N) + T K N), per-example H (T K N + 2 K N); the
  # per-example form only if MIN_CHUNK examples of K N floats fit the budget.
  loss_fn, params, x = _dense_chain(t, k, n)
  x = jax.ShapeDtypeStruct(x.shape, x.dtype)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  cov = dp.ghost_coverage(loss_fn, params, x)
  assert cov["w"] == f"dot_general: {form}", cov


def _plan_of(t, k, n):
  loss_fn, params, x = _dense_chain(t, k, n)
  return cg._plan(loss_fn, False, params, (x,))[0]


def test_costs_follow_the_shapes():
  plan = _plan_of(4, 16, 32)
  (unit,) = cg._structure(plan, budget=2 ** 30).units
  forms = unit.forms(B)
  assert forms[_rules.NORM] == _rules.Cost(flops=16 * 48 + 4 * 16 * 32, bytes=4 * 2 * 16)
  assert forms[_rules.PER_EXAMPLE] == _rules.Cost(flops=4 * 16 * 32 + 2 * 16 * 32,
                                                  bytes=4 * 16 * 32)
  assert cg.choose_form(forms, budget=2 ** 30) == _rules.NORM  # 2816 < 3072 FLOPs
  plan = _plan_of(8, 16, 32)
  forms = cg._structure(plan, budget=2 ** 30).units[0].forms(B)
  assert cg.choose_form(forms, budget=2 ** 30) == _rules.PER_EXAMPLE  # 5120 < 7168
  # A budget that does not hold MIN_CHUNK per-example gradients: the Gram form.
  assert cg.choose_form(forms, budget=cg.MIN_CHUNK * 4 * 16 * 32 - 1) == _rules.NORM


# --------------------------------------------------------------------- lax.cond


def _cond_models():
  rng = np.random.default_rng(5)
  p = {"w": jnp.asarray(rng.normal(size=(6, 6)) / 3, jnp.float32),
       "b": jnp.asarray(rng.normal(size=6) / 3, jnp.float32),
       "w_in": jnp.asarray(rng.normal(size=(3, 6)), jnp.float32),
       "v": jnp.asarray(rng.normal(size=6), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(B, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=B), jnp.float32)

  def loop(p, x, y):  # the branch follows the step, the same for every example
    def body(i, h):
      return lax.cond(i % 2 == 0, lambda h: jnp.tanh(h @ p["w"] + p["b"]),
                      lambda h: jnp.tanh(h) @ p["w"], h)
    h = lax.fori_loop(0, 4, body, x @ p["w_in"])
    return (h @ p["v"] - y) ** 2

  def switch(p, x, y):  # the branch follows a parameter
    h = lax.cond(jnp.sum(p["b"]) > 0, lambda x: jnp.sin(x @ p["w_in"]),
                 lambda x: x @ p["w_in"] * p["b"], x)
    return (h @ p["v"] - y) ** 2

  return {"loop": loop, "switch": switch}, p, (x, y)


@pytest.mark.parametrize("name", ["loop", "switch"])
def test_cond_is_looked_through(name):
  models, p, batch = _cond_models()
  loss_fn = models[name]
  cov = dp.ghost_coverage(loss_fn, p, *batch)
  assert not fallbacks(cov), cov
  if name == "loop":  # one parameter in both branches: one group of positions
    assert cov["w"].startswith("dot_general") and cov["w"].endswith("x2 uses"), cov
  check_exact(loss_fn, p, batch)
  p2 = dict(p, b=-p["b"])  # the other branch of the switch
  check_exact(loss_fn, p2, batch)


def test_cond_on_the_example_stays_on_the_fallback():
  # A branch chosen per example (vmapped into a select by JAX) or an operand that
  # depends on the example: here the index is a function of the batch (B = 1).
  def loss_fn(p, x):
    return lax.cond(x[0, 0] > 0, lambda x: jnp.sum(x @ p["w"], axis=1),
                    lambda x: jnp.sum(jnp.sin(x @ p["w"]), axis=1), x)
  p = {"w": jnp.ones((3, 2))}
  x = jnp.asarray([[1.0, 2.0, -1.0]])
  with pytest.raises(ValueError, match="combines different examples"):
    dp.ghost_coverage(loss_fn, p, jnp.concatenate([x, x]))


# ------------------------------------------------ one probe for split-then-add sums


def _split_add_model(pair, reuse=False):
  """Two products split in four and added piece by piece (``pair[j]``: the piece of
  the second product added to piece ``j`` of the first; ``reuse``: a piece of the
  second is also read elsewhere)."""
  rng = np.random.default_rng(11)
  p = {"wx": jnp.asarray(rng.normal(size=(3, 8)) / 2, jnp.float32),
       "wh": jnp.asarray(rng.normal(size=(5, 8)) / 2, jnp.float32),
       "v": jnp.asarray(rng.normal(size=2), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(B, 3)), jnp.float32)
  h = jnp.asarray(rng.normal(size=(B, 5)), jnp.float32)
  y = jnp.asarray(rng.normal(size=B), jnp.float32)

  def loss_fn(p, x, h, y):
    a = jnp.split(x @ p["wx"], 4, axis=-1)
    b = jnp.split(h @ p["wh"], 4, axis=-1)
    s = [a[j] + b[pair[j]] for j in range(4)]
    z = jnp.tanh(s[0]) * jax.nn.sigmoid(s[1]) + s[2] * s[3]
    if reuse:
      z = z + jnp.sin(b[0])
    return (z @ p["v"] - y) ** 2

  return loss_fn, p, (x, h, y)


def test_split_then_add_shares_one_probe():
  loss_fn, p, batch = _split_add_model((0, 1, 2, 3))
  cov = dp.ghost_coverage(loss_fn, p, *batch)
  assert "fused: 2" in cov["wx"] and "fused: 2" in cov["wh"], cov
  check_exact(loss_fn, p, batch)
  plan, _ = cg._plan(loss_fn, False, p, batch)
  crossed_fn, _, _ = _split_add_model((1, 0, 2, 3))
  crossed, _ = cg._plan(crossed_fn, False, p, batch)
  # One probe of 8 floats per example instead of two.
  assert cg.probe_bytes_per_example(crossed) - cg.probe_bytes_per_example(plan) == 4 * 8


@pytest.mark.parametrize("pair,reuse", [((1, 0, 2, 3), False), ((0, 1, 2, 3), True)])
def test_split_pieces_not_only_added_in_order_keep_their_own_probes(pair, reuse):
  loss_fn, p, batch = _split_add_model(pair, reuse)
  cov = dp.ghost_coverage(loss_fn, p, *batch)
  assert "fused" not in cov["wx"] and "fused" not in cov["wh"], cov
  check_exact(loss_fn, p, batch)


def test_optimized_lstm_cell_is_one_product_per_step():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(nn.RNN(nn.OptimizedLSTMCell(6))(x).mean(1))

  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(B, 5, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 2, size=B))
  net = Net()
  p = net.init(jax.random.PRNGKey(0), x)
  loss_fn = lambda p, x, y: ce(net.apply(p, x), y)
  cov = dp.ghost_coverage(loss_fn, p, x, y)
  kernels = {k: v for k, v in cov.items() if k.endswith("kernel") and "Cell" in k}
  assert len(kernels) == 8 and all("fused: 8" in v for v in kernels.values()), cov
  check_exact(loss_fn, p, (x, y))


# ------------------------------------------------------- chunks and microbatches


def test_memory_policy_splits_the_model_and_the_chunks(monkeypatch):
  loss_fn, params, batch = setup("lstm")
  plan, _ = cg._plan(loss_fn, False, params, batch)
  st = cg._structure(plan)
  probe = cg.probe_bytes_per_example(plan)
  chunk = cg.chunk_bytes_per_example(plan, st)
  assert dp.GHOST_MEMORY_BUDGET is None
  assert cg.memory_budget() == cg.DEFAULT_BUDGETS.get(jax.default_backend(),
                                                      cg.DEFAULT_BUDGETS["other"])
  # A budget that holds two examples' probe gradients: microbatches of 2.
  assert cg.auto_microbatch(plan, st, budget=2 * probe) == 2
  assert cg.chunk_size(plan, st, budget=2 * chunk) == 2
  assert cg.auto_microbatch(plan, st, budget=1) == 1
  assert cg.auto_microbatch(plan, st, budget=2 ** 40) == B
  # One example per model pass and per chunk, chosen by the policy: still exact;
  # and two passes with two chunks each.
  monkeypatch.setattr(dp, "GHOST_MEMORY_BUDGET", 1)
  check_exact(*setup("plain_jax"))
  loss_fn, params, batch = setup("plain_jax")
  plan, _ = cg._plan(loss_fn, False, params, batch)
  st = cg._structure(plan, budget=2 ** 30)
  monkeypatch.setattr(dp, "GHOST_MEMORY_BUDGET", 2 * cg.probe_bytes_per_example(plan))
  assert cg.auto_microbatch(plan, st) == 2
  check_exact(loss_fn, params, batch)


# ---------------------------------------------------------------- the protocol


class ToyDivData(NamedTuple):
  needs: tuple


class ToyDiv(_rules.Rule):
  """``y = x / w`` with ``w`` broadcast over the example axis (axis 0)."""
  family = "toy_div"

  def match(self, use):
    ws, xs = use.in_shapes[1], use.in_shapes[0]
    if use.p_pos != (1,) or use.pre or len(ws) != len(xs) or ws[0] != 1:
      return None
    if use.in_info[0].spec != use.out_info[0].spec or use.out_info[0].spec.axis != 0:
      return None
    return ToyDivData(needs=(0,))

  def canon(self, use, recs, gs, views, b):
    w = views[(use.uid, 1)]
    dw = -gs[0] * recs[0] / (w * w)
    axes = tuple(d for d in range(1, dw.ndim) if w.shape[d] == 1)
    return _rules.Canon(jnp.sum(dw, axis=axes, keepdims=True).reshape((b,) + w.shape))

  def unit(self, group):
    return ToyDivUnit(self, [group])


class ToyDivUnit(_rules.Unit):

  def forms(self, b):
    return {_rules.PER_EXAMPLE: _rules.Cost(0, 0)}

  def per_example(self, c):
    return c.ex

  def split(self, raw):
    u0 = self.groups[0].uses[0]
    return {(u0.uid, 1): raw}


def test_a_rule_registered_from_outside_covers_its_primitive(monkeypatch):
  def loss_fn(p, x, y):
    return (jnp.tanh(x / p["s"]) @ p["w"] - y) ** 2
  rng = np.random.default_rng(2)
  p = {"s": jnp.asarray(rng.uniform(1, 2, size=(1, 5)), jnp.float32),
       "w": jnp.asarray(rng.normal(size=5), jnp.float32)}
  batch = (jnp.asarray(rng.normal(size=(B, 5)), jnp.float32),
           jnp.asarray(rng.normal(size=B), jnp.float32))
  assert dp.ghost_coverage(loss_fn, p, *batch)["s"] == "fallback: div"
  monkeypatch.setitem(_rules.REGISTRY.by_primitive, "div", ToyDiv())
  assert dp.ghost_coverage(loss_fn, p, *batch)["s"] == "toy_div"
  check_exact(loss_fn, p, batch)
