"""The numerics claims: float32 accumulation, overflow, zeros, derivatives, NaN/Inf."""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax as gc
from gradclip_jax import _norms
from gradclip_jax import _tuning
from gradclip_jax import functional as F

from _support import TuningOff


class Float32AccumulationTest(chex.TestCase):

  def test_fp16_magnitude_300_has_a_finite_norm(self):
    g = {"a": jnp.full((1000,), 300.0, jnp.float16)}
    expected = 300.0 * math.sqrt(1000)
    # The peer fails: the fp16 sum of squares overflows to inf ...
    self.assertTrue(np.isinf(float(optax.global_norm(g))))
    opt_tx = optax.clip_by_global_norm(1.0)
    opt_out, _ = opt_tx.update(g, opt_tx.init(g))
    self.assertEqual(float(jnp.abs(opt_out["a"]).max()), 0.0)  # silently zeroed
    # ... ours is finite and correct, and the clipped leaf keeps float16.
    tx = gc.clip_by_global_norm(1.0)
    out, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(float(state.global_norm), expected, rtol=1e-6)
    self.assertEqual(out["a"].dtype, jnp.float16)
    np.testing.assert_allclose(float(F.global_norm(out)), 1.0, rtol=1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fp16_max(self):
    g = [jnp.full((4096,), 65504.0, jnp.float16)]
    n = self.variant(F.global_norm)(g)
    np.testing.assert_allclose(float(n), 65504.0 * 64, rtol=1e-6)
    n1 = self.variant(lambda t: F.global_norm(t, 1.0))(g)
    np.testing.assert_allclose(float(n1), 65504.0 * 4096, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_float32_overflow_is_rescued(self):
    for dtype in (jnp.float32, jnp.bfloat16):
      g = {"a": jnp.full((16,), 1e30, dtype), "b": jnp.full((9,), -1e30, dtype)}
      big = float(jnp.asarray(1e30, dtype))
      for p, expected in ((2.0, big * 5), (1.0, big * 25), (4.0, big * 25 ** 0.25),
                          (math.inf, big)):
        n = self.variant(lambda t, p=p: F.global_norm(t, p))(g)
        np.testing.assert_allclose(float(n), expected, rtol=1e-5)
      out, _ = self.variant(lambda t: F.clip_by_norm(t, 1.0))(g)["a"], None
      np.testing.assert_allclose(float(jnp.linalg.norm(out.astype(jnp.float32))), 1.0,
                                 rtol=1e-2)

  def test_large_p_does_not_overflow(self):
    g = [jnp.array([1e4, 2e4], jnp.float32)]
    np.testing.assert_allclose(float(F.global_norm(g, 12.0)),
                               (1e4 ** 12 + 2e4 ** 12) ** (1 / 12), rtol=1e-5)

  def test_complex_leaves_use_abs_squared(self):
    g = {"z": jnp.array([3 + 4j, 0 + 0j], jnp.complex64), "x": jnp.array([12.0])}
    np.testing.assert_allclose(float(F.global_norm(g)), 13.0, rtol=1e-6)
    out, _ = F.clip_by_global_norm(g, 6.5)
    self.assertEqual(out["z"].dtype, jnp.complex64)
    np.testing.assert_allclose(np.asarray(out["z"]), [1.5 + 2j, 0], rtol=1e-6)


class EdgeCaseTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_gradients_zero_threshold_inf_threshold(self):
    z = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2), jnp.bfloat16)}
    for c in (0.0, 1.0, math.inf):
      for tx in (gc.clip_by_global_norm(c), gc.clip_by_norm(c),
                 gc.clip_by_average_norm(c)):
        out, _ = self.variant(tx.update)(z, tx.init(z))
        chex.assert_trees_all_equal(out, z)
    # Optax returns NaN here.
    otx = optax.clip_by_global_norm(0.0)
    self.assertTrue(np.isnan(np.asarray(otx.update(z, otx.init(z))[0]["a"])).all())

  @chex.variants(with_jit=True, without_jit=True)
  def test_threshold_zero_and_inf_with_nonzero_gradients(self):
    g = {"a": jnp.array([3.0, 4.0])}
    tx = gc.clip_by_global_norm(0.0)
    out, state = self.variant(tx.update)(g, tx.init(g))
    chex.assert_trees_all_equal(out, {"a": jnp.zeros(2)})
    self.assertEqual(int(state.num_clipped), 1)
    tx = gc.clip_by_global_norm(math.inf)
    out, state = self.variant(tx.update)(g, tx.init(g))
    chex.assert_trees_all_equal(out, g)
    self.assertEqual(float(state.global_norm), 5.0)

  def test_inf_gradient_with_inf_threshold_propagates(self):
    g = {"a": jnp.array([jnp.inf, 1.0])}
    out, state = gc.clip_by_global_norm(math.inf).update(g, gc.clip_by_global_norm(
        math.inf).init(g))
    self.assertTrue(np.isnan(np.asarray(out["a"])).all())
    self.assertEqual(int(state.num_nonfinite), 1)


class DerivativeTest(chex.TestCase):
  """Meta-gradients through the clip: NaN-free at zero, correct elsewhere."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_free_at_zero_gradients(self):
    def loss(g, c, rule):
      if rule == "global":
        out, _ = F.clip_by_global_norm(g, c)
      elif rule == "norm":
        out = F.clip_by_norm(g, c)
      elif rule == "global_l3":
        out, _ = F.clip_by_global_norm(g, c, norm_type=3.0)
      else:
        out = F.clip_by_average_norm(g, c)
      return sum(jnp.sum(x * jnp.arange(1.0, x.size + 1).reshape(x.shape))
                 for x in jax.tree.leaves(out))

    rules = ("global", "norm", "avg", "global_l3")

    def grads_of_every_rule(g, c):  # under jit: one program for every rule and c
      return {rule: jax.grad(loss, argnums=(0, 1))(g, c, rule) for rule in rules}

    z = {"a": jnp.zeros(3), "b": jnp.zeros((2,))}
    grads = self.variant(grads_of_every_rule)
    for c in (0.0, 1.0):
      for rule, (dg, dc) in grads(z, c).items():
        for leaf in jax.tree.leaves(dg):
          self.assertTrue(np.isfinite(np.asarray(leaf)).all(), (rule, c, dg))
        self.assertTrue(np.isfinite(float(dc)), (rule, c))
    # Also the norm itself.
    self.assertTrue(np.isfinite(np.asarray(jax.grad(F.global_norm)(z)["a"])).all())

  def test_derivative_matches_finite_differences(self):
    g = {"a": jnp.array([3.0, 4.0, 1.0], jnp.float32)}

    def loss(g, c):
      out, _ = F.clip_by_global_norm(g, c)
      return jnp.sum(out["a"] * jnp.array([1.0, -2.0, 0.5]))

    dg, dc = jax.grad(loss, argnums=(0, 1))(g, 2.0)
    eps = 1e-3
    num_dc = (loss(g, 2.0 + eps) - loss(g, 2.0 - eps)) / (2 * eps)
    np.testing.assert_allclose(float(dc), float(num_dc), rtol=1e-3)
    for i in range(3):
      e = jnp.zeros(3).at[i].set(eps)
      num = (loss({"a": g["a"] + e}, 2.0) - loss({"a": g["a"] - e}, 2.0)) / (2 * eps)
      np.testing.assert_allclose(float(dg["a"][i]), float(num), rtol=2e-3, atol=1e-4)


class NonFinitePolicyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_propagate_and_zero(self):
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
      g = {"a": jnp.array([bad, 1.0]), "b": jnp.ones(2, jnp.bfloat16)}
      tx = gc.clip_by_global_norm(1.0)
      out, state = self.variant(tx.update)(g, tx.init(g))
      for leaf in jax.tree.leaves(out):
        self.assertTrue(np.isnan(np.asarray(leaf, np.float32)).all())
      self.assertEqual(int(state.num_nonfinite), 1)

      tx = gc.clip_by_global_norm(1.0, nonfinite="zero")
      state = tx.init(g)
      out, state = self.variant(tx.update)(g, state)
      chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, g))
      self.assertEqual(int(state.num_nonfinite), 1)
      self.assertEqual(int(state.num_clipped), 0)
      good = {"a": jnp.array([3.0, 4.0]), "b": jnp.zeros(2, jnp.bfloat16)}
      out, state = self.variant(tx.update)(good, state)
      np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-6)
      self.assertEqual(int(state.num_nonfinite), 1)

  def test_error_policy_eager_and_jit(self):
    g = {"a": jnp.array([jnp.nan, 1.0])}
    tx = gc.clip_by_global_norm(1.0, nonfinite="error")
    with pytest.raises(FloatingPointError, match="non-finite"):
      out, _ = tx.update(g, tx.init(g))
      jax.block_until_ready(out)
    with pytest.raises(Exception, match="non-finite"):
      out, _ = jax.jit(tx.update)(g, tx.init(g))
      jax.block_until_ready(out)
    jax.effects_barrier()
    ok, _ = jax.jit(tx.update)({"a": jnp.array([3.0, 4.0])}, tx.init(g))
    np.testing.assert_allclose(ok["a"], [0.6, 0.8], rtol=1e-6)

  def test_apply_if_finite_freezes_the_optimizer_state(self):
    tx = optax.apply_if_finite(
        optax.chain(gc.clip_by_global_norm(1.0), optax.adam(0.1)), 3)
    params = {"a": jnp.ones(2)}
    state = tx.init(params)
    _, state = tx.update({"a": jnp.array([1.0, 1.0])}, state, params)
    mu_before = optax.tree_utils.tree_get(state, "mu")
    updates, state = tx.update({"a": jnp.array([jnp.nan, 1.0])}, state, params)
    chex.assert_trees_all_equal(updates, {"a": jnp.zeros(2)})
    chex.assert_trees_all_equal(optax.tree_utils.tree_get(state, "mu"), mu_before)
    self.assertEqual(int(state.notfinite_count), 1)


class PlainFormTest(TuningOff, chex.TestCase):
  """The numerics with the backend tuning off (the form GPU/TPU compile), on CPU.

  Without the ``overflow_cond`` workaround the norms always compute the rescued sum
  and select it, instead of a ``lax.cond``; that form must meet the same numerics
  claims as the tuned one.
  """

  @chex.variants(with_jit=True, without_jit=True)
  def test_overflow_is_rescued(self):
    for dtype in (jnp.float32, jnp.bfloat16):
      g = {"a": jnp.full((16,), 1e30, dtype), "b": jnp.full((9,), -1e30, dtype)}
      big = float(jnp.asarray(1e30, dtype))
      for p, expected in ((2.0, big * 5), (1.0, big * 25)):
        n = self.variant(lambda t, p=p: F.global_norm(t, p))(g)
        np.testing.assert_allclose(float(n), expected, rtol=1e-5)
      out = self.variant(lambda t: F.clip_by_norm(t, 1.0))(g)["a"]
      np.testing.assert_allclose(float(jnp.linalg.norm(out.astype(jnp.float32))), 1.0,
                                 rtol=1e-2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_without_overflow(self):
    rng = np.random.default_rng(0)
    g = {"a": rng.normal(size=(7, 5)).astype(np.float32),
         "b": rng.normal(size=(300,)).astype(np.float32) * 1e-3,
         "c": np.float16(rng.normal(size=(4, 4)) * 300)}
    flat = np.concatenate([np.ravel(x).astype(np.float64) for x in g.values()])
    n = self.variant(lambda t: F.global_norm(t))(g)
    np.testing.assert_allclose(float(n), np.linalg.norm(flat), rtol=1e-6)
    n1 = self.variant(lambda t: F.global_norm(t, 1.0))(g)
    np.testing.assert_allclose(float(n1), np.abs(flat).sum(), rtol=1e-6)
    norms = self.variant(lambda t: _norms.leaf_norms(t, [None, None, (1,)]))(
        list(g.values()))
    np.testing.assert_allclose(float(norms[0].squeeze()), np.linalg.norm(g["a"]),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(norms[2]).ravel(),
                               np.linalg.norm(g["c"].astype(np.float64), axis=1),
                               rtol=1e-6)

  def test_nonfinite_entries_come_through(self):
    for bad, want in ((jnp.nan, math.nan), (jnp.inf, math.inf)):
      g = [jnp.array([1.0, bad, 2.0])]
      n = float(F.global_norm(g))
      self.assertTrue(math.isnan(n) if math.isnan(want) else n == want, (bad, n))
      m = float(_norms.leaf_norms(g, [None])[0].squeeze())
      self.assertTrue(math.isnan(m) if math.isnan(want) else m == want, (bad, m))

  def test_derivatives_are_nan_free_at_zero_and_at_overflow(self):
    def loss(g, c):
      out, _ = F.clip_by_global_norm(g, c)
      return sum(jnp.sum(x * jnp.arange(1.0, x.size + 1)) for x in jax.tree.leaves(out))

    for g in ({"a": jnp.zeros(3)}, {"a": jnp.full((3,), 1e30)}):
      for c in (0.0, 1.0):
        dg, dc = jax.grad(loss, argnums=(0, 1))(g, c)
        self.assertTrue(np.isfinite(np.asarray(dg["a"])).all(), (g, c, dg))
        self.assertTrue(np.isfinite(float(dc)), (g, c))
    dn = jax.grad(lambda t: _norms.leaf_norms(t, [None])[0].sum())([jnp.zeros(3)])
    self.assertTrue(np.isfinite(np.asarray(dn[0])).all())

  def test_unit_norms_rescue_overflow_and_match_the_tuned_form(self):
    # The per-unit norms (AGC, clip_by_norm with axes) must give the tuned form's
    # values and derivatives.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    big = x * np.float32(1e30)
    for leaf, axes in ((x, (0,)), (x, (1,)), (big, (0,)), (x, None)):
      want = np.linalg.norm(leaf.astype(np.float64), axis=axes, keepdims=True)
      got = _norms.leaf_norms([jnp.asarray(leaf)], [axes])[0]
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    f = lambda t: jnp.sum(_norms.leaf_norms([t], [(0,)])[0] * jnp.arange(1.0, 6.0))
    plain_grad = jax.grad(f)(jnp.asarray(x))
    with gc.config.backend_tuning_set(True):
      jax.clear_caches()
      tuned_grad = jax.grad(f)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(plain_grad), np.asarray(tuned_grad))

  def test_no_cond_in_the_lowered_step(self):
    tx = gc.clip_by_global_norm(1.0)
    g = {"a": jnp.ones((4, 4)), "b": jnp.ones(3)}
    text = jax.jit(tx.update).lower(g, tx.init(g)).as_text()
    self.assertNotIn("stablehlo.if", text)
    self.assertNotIn("stablehlo.case", text)


def test_unit_scales_once_passes_values_through_jit_grad_and_vmap():
  """``_tuning.unit_scales_once`` only changes where XLA computes the scale vectors."""
  vals = [jnp.array([0.5, 1.0, jnp.nan]), jnp.float32(0.25), jnp.ones((1, 1)),
          jnp.array([[2.0, 3.0]])]
  once = _tuning.unit_scales_once
  for out in (once(vals), jax.jit(once)(vals)):
    for a, b in zip(out, vals):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Differentiable (the never-taken branch contributes nothing) and batchable.
  f = lambda v: jnp.sum(once([v * v])[0])
  np.testing.assert_allclose(jax.grad(f)(jnp.array([1.0, -2.0])), [2.0, -4.0])
  batched = jax.vmap(lambda v: once([v])[0])(jnp.arange(6.0).reshape(3, 2))
  np.testing.assert_array_equal(batched, jnp.arange(6.0).reshape(3, 2))


def test_unit_scales_are_read_not_recomputed_in_the_adam_kernels():
  """AGC's per-unit scale reaches Adam's moment kernels as a buffer (CPU).

  Guards the ``unit_scales_once`` workaround (``gradclip_jax._tuning``): the
  compiled structure is what it exists for.

  The compare-and-select chain of ``clip_scale`` compares the unit norm with itself
  (its NaN test); if XLA fused the chain into the kernels that write the moments, that
  compare would appear inside them, once per entry of the leaf.
  """
  shape = (256, 64)
  params = {"w": jnp.ones(shape)}
  tx = optax.chain(gc.adaptive_grad_clip(0.01), optax.adam(1e-3))

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, tx.init(params), params).compile().as_text()
  big = [c for c in hlo.split("\n\n") if c.startswith("%fused")
         and f"-> f32[{shape[0]},{shape[1]}]" in c.split("\n")[0]]
  assert big, "no fused kernel writes the leaf"
  self_compare = re.compile(r"compare\((%[\w.\-]+), \1\), direction=NE")
  for comp in big:
    assert not self_compare.search(comp), comp


@pytest.mark.parametrize("scale", [1e-30, 1e-21, 1e25])
def test_float32_sums_that_under_or_overflow_are_rescued(scale):
  """Squares of 1e-30 vanish in float32 (and 1e25's overflow): the norms, global
  and per unit, still match NumPy's float64 ones."""
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(40, 3)) * scale).astype(np.float32)
  ref = np.linalg.norm(x.astype(np.float64))
  np.testing.assert_allclose(float(F.global_norm([jnp.asarray(x)])), ref, rtol=1e-6)
  got = F.clip_by_norm(jnp.asarray(x), 0.5 * scale, axes=0)
  rows = np.linalg.norm(x.astype(np.float64), axis=0, keepdims=True)
  want = x.astype(np.float64) * np.minimum(1.0, 0.5 * scale / rows)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5)


def test_float64_keeps_float64_at_1e_minus_200_and_1e200():
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    for scale in (1e-200, 1e200):
      x = rng.normal(size=(30, 4)) * scale
      m = np.abs(x).max()
      ref = m * np.linalg.norm(x / m)  # NumPy's own norm under/overflows here
      n = F.global_norm({"w": jnp.asarray(x)})
      assert n.dtype == jnp.float64
      np.testing.assert_allclose(float(n), ref, rtol=1e-14)
      out = F.clip_by_norm(jnp.asarray(x), 0.1 * scale, axes=1)
      cols = m * np.linalg.norm(x / m, axis=1, keepdims=True)
      assert out.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(out), x * np.minimum(1.0, 0.1 * scale / cols),
                                 rtol=1e-13)


@pytest.mark.parametrize("tuned", [True, False], ids=["tuned", "plain"])
def test_rescued_sums_under_jit_survive_xla_simplification(tuned):
  """Jitted, the rescue factors meet XLA's algebraic simplifier, which would rewrite
  ``(x r) * (x r)`` as ``(x * x) * r**2`` with ``r**2`` = 0 or inf (eager calls
  compile one primitive at a time and never see it). float32 at 1e-30 and 1e25,
  float64 at 1e-200 and 1e200, global and per-unit norms, with the tuning on and
  off (the plain form is what GPU and TPU compile), against NumPy."""
  from gradclip_jax import config  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(5)
  cases = [(np.float32, s) for s in (1e-30, 1e25)] + [(np.float64, s)
                                                      for s in (1e-200, 1e200)]
  for dtype, scale in cases:
    with jax.enable_x64(dtype == np.float64), config.backend_tuning_set(tuned):
      x = rng.normal(size=(40, 3)) * scale
      m = np.abs(x).max()
      x = x.astype(dtype)
      f = jax.jit(lambda t: (F.global_norm([t]), F.global_norm([t[:2, 0]]),
                             _norms.leaf_norms([t, t[0], t[0, 0]], [(0,), None, None])))
      norm, pair, (cols, first, one) = f(jnp.asarray(x))
      xs = x.astype(np.float64) / m
      np.testing.assert_allclose(float(norm), m * np.linalg.norm(xs), rtol=1e-6)
      np.testing.assert_allclose(float(pair), m * np.linalg.norm(xs[:2, 0]), rtol=1e-6)
      np.testing.assert_allclose(np.asarray(cols, np.float64).ravel(),
                                 m * np.linalg.norm(xs, axis=0), rtol=1e-6)
      np.testing.assert_allclose(float(first.squeeze()), m * np.linalg.norm(xs[0]),
                                 rtol=1e-6)
      np.testing.assert_allclose(float(one), m * abs(xs[0, 0]), rtol=1e-6)
