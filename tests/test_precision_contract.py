"""The numerics contract, checked from the outside: norms accumulate in at least float32.

* float16 / bfloat16 gradients are reduced in float32: their norm is a float32 scalar,
  finite even where the norm (or its sum of squares) is beyond their own range, and the
  clipped update is finite and keeps the gradient's dtype;
* float32 stays float32 (also with ``jax_enable_x64`` on: nothing is promoted);
* float64 stays float64 (``jax_enable_x64``): the norm, the scale, the clipped output and
  every statistic a rule keeps in its state are float64, with float64's precision (a
  relative error near 1e-15, where a float32 reduction is off by ~1e-8) and float64's
  range (gradients of scale 1e-200 and 1e200 give the right finite norm and the right
  nonzero, non-NaN clip).

Expected values come from NumPy: norms are summed in ``np.longdouble`` (x87 extended
precision on x86-64: 64-bit mantissa and an exponent range up to ~1e4932, so
``(1e200)**3`` neither overflows nor loses digits), and the formulas of the rules'
docstrings are re-computed by hand below. Nothing here compares gradclip_jax with
itself.

x64 mode is a global JAX flag. The module-scoped fixture turns it on with the public
``jax.enable_x64`` context manager for this module's tests only and restores the
previous value afterwards; every float64 input goes through :func:`f64`, which fails if
the array did not really become float64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import gradclip_jax as gc
from gradclip_jax import functional as F

from _support import ref_skip_spikes

LD = np.longdouble
# Relative tolerance on float64 norms and clipped entries: ~45 ulp. A float32 reduction
# or multiply is off by ~1e-8, six orders of magnitude more.
RTOL64 = 1e-14
# Running statistics (EMA mean/variance, z-scores) subtract nearby numbers, which
# amplifies the ulp-level differences of the norms; still 1e5 below float32's error.
RTOL_STATS = 1e-12
# Scale 1 is checked once, in test_clip_by_global_norm_float64; the far scales check
# float64's precision (a relative tolerance) as well as its range.
SCALES = (1e-200, 1e200)
# The rules that keep an EMA *variance* of the norm hold its square: float64's range
# bounds squares of norms to ~1e154, so they are checked at 1e-150 and 1e150.
SCALES_VAR = (1e-150, 1e150)


@pytest.fixture(scope="module", autouse=True)
def _x64():
  previous = jax.config.jax_enable_x64
  with jax.enable_x64(True):
    assert jnp.asarray(1.0, jnp.float64).dtype == jnp.float64
    yield
  assert jax.config.jax_enable_x64 == previous, "x64 mode leaked out of this module"


def f64(x):
  out = jnp.asarray(x, jnp.float64)
  assert out.dtype == jnp.float64, "x64 is off: this test would check float32"
  return out


def f64_tree(tree):
  return jax.tree.map(f64, tree)


def _ld(x):
  return np.asarray(x, dtype=LD)


def ref_norm(leaves, p=2.0):
  """The Lp norm of all entries of ``leaves`` together, in long double."""
  a = np.concatenate([np.abs(_ld(x)).ravel() for x in leaves])
  if p == math.inf:
    return a.max()
  if p == 1:
    return a.sum()
  return (a ** LD(p)).sum() ** (LD(1) / LD(p))


def ref_leaf_norm(x, axes=None):
  return np.sqrt((_ld(x) ** 2).sum(axis=axes, keepdims=axes is not None))


def assert_f64_close(got, want, rtol=RTOL64, what="value"):
  got_arr = np.asarray(got)
  assert got_arr.dtype == np.float64, (
      f"{what}: float64 gradients must give float64 here, got {got_arr.dtype}")
  want = np.asarray(want, dtype=LD).astype(np.float64)
  assert np.all(np.isfinite(got_arr) == np.isfinite(want)), (
      f"{what}: got {got_arr}, NumPy float64 gives {want} (finite where NumPy is)")
  np.testing.assert_allclose(got_arr, want, rtol=rtol, atol=0,
                             err_msg=f"{what} differs from NumPy's float64 value")


def assert_tree_f64_close(got, want, rtol=RTOL64, what="update"):
  g_leaves, g_def = jax.tree.flatten(got)
  w_leaves, w_def = jax.tree.flatten(want)
  assert g_def == w_def
  for path, (g, w) in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                          zip(g_leaves, w_leaves)):
    assert_f64_close(g, w, rtol, f"{what}{jax.tree_util.keystr(path[0])}")


def _tree(seed=0):
  """A small float64 tree of NumPy values (a matrix, a vector, a scalar)."""
  rng = np.random.default_rng(seed)
  return {"w": rng.normal(size=(4, 5)), "b": rng.normal(size=(5,)),
          "s": np.asarray(rng.normal())}


def _scaled(tree, scale):
  return jax.tree.map(lambda x: np.asarray(x, np.float64) * scale, tree)


# ------------------------------------------------------------------ clip_by_value


@pytest.mark.parametrize("scale", SCALES)
def test_clip_by_value_float64_bounds_and_entries(scale):
  g = _scaled(_tree(1), scale)
  # 0.3 * scale is not a float32 number (and 3e-201 / 3e199 are out of its range): a
  # float32 bound would be visible in the result.
  lo, hi = -0.3 * scale, 0.3 * scale
  tx = gc.clip_by_value(lo, hi)
  out, state = tx.update(f64_tree(g), tx.init(f64_tree(g)))
  for k in g:
    assert out[k].dtype == jnp.float64, "clip_by_value must keep float64 leaves"
    np.testing.assert_array_equal(np.asarray(out[k]), np.clip(g[k], lo, hi),
                                  err_msg=f"clip_by_value[{k}] at scale {scale}")
  assert int(state.num_clipped) == 1
  out_f = F.clip_by_value(f64_tree(g), lo, hi)
  for k in g:
    assert out_f[k].dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(out_f[k]), np.clip(g[k], lo, hi))


# ---------------------------------------------------- clip_by_norm / average_norm


@pytest.mark.parametrize("scale", SCALES)
def test_clip_by_norm_float64(scale):
  g = _scaled(_tree(2), scale)
  norms = {k: ref_leaf_norm(v) for k, v in g.items()}
  c = float(norms["b"])  # "w" is larger and is clipped, "s" is smaller and is not
  assert norms["w"] > c > norms["s"]
  want = {k: _ld(v) * min(LD(1), LD(c) / norms[k]) for k, v in g.items()}
  tx = gc.clip_by_norm(c)
  out, state = jax.jit(tx.update)(f64_tree(g), tx.init(f64_tree(g)))
  assert_tree_f64_close(out, want, what=f"clip_by_norm at scale {scale}")
  assert_f64_close(state.global_norm, ref_norm(g.values()), what="state.global_norm")
  assert int(state.num_clipped) == 1
  assert_tree_f64_close(F.clip_by_norm(f64_tree(g), c), want,
                        what="functional.clip_by_norm")
  # Per-leaf thresholds (a pytree of float64 numbers) keep float64 too.
  per_leaf = {"w": 0.5 * float(norms["w"]), "b": 2.0 * float(norms["b"]),
              "s": 0.25 * float(norms["s"])}
  tx = gc.clip_by_norm(per_leaf)
  out, _ = jax.jit(tx.update)(f64_tree(g), tx.init(f64_tree(g)))
  want = {k: _ld(v) * min(LD(1), LD(per_leaf[k]) / norms[k]) for k, v in g.items()}
  assert_tree_f64_close(out, want, what="clip_by_norm with per-leaf thresholds")


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("axes", [1, (0,)])
def test_clip_by_norm_axes_float64(scale, axes):
  x = _tree(3)["w"] * scale  # (4, 5)
  ax = (axes,) if isinstance(axes, int) else axes
  n = ref_leaf_norm(x, ax)  # keepdims
  c = float(np.median(n.astype(np.float64)))  # about half the slices are clipped
  want = _ld(x) * np.minimum(LD(1), LD(c) / n)
  tx = gc.clip_by_norm(c, axes=axes)
  out, state = jax.jit(tx.update)(f64(x), tx.init(f64(x)))
  assert_f64_close(out, want, what=f"clip_by_norm(axes={axes}) at scale {scale}")
  assert_f64_close(state.global_norm, ref_norm([x]), what="state.global_norm")
  assert_f64_close(F.clip_by_norm(f64(x), c, axes), want,
                   what=f"functional.clip_by_norm(axes={axes})")


@pytest.mark.parametrize("scale", SCALES)
def test_clip_by_average_norm_float64(scale):
  g = _scaled(_tree(4), scale)
  norms = {k: ref_leaf_norm(v) for k, v in g.items()}
  # Average norm ||t|| / t.size: "w" (20 entries) is clipped to half its average norm;
  # each leaf's budget is c * t.size, so the others are clipped or not on their own.
  c = float(norms["w"] / 20) * 0.5
  want = {k: _ld(v) * min(LD(1), LD(c) * np.size(v) / norms[k]) for k, v in g.items()}
  tx = gc.clip_by_average_norm(c)
  out, state = jax.jit(tx.update)(f64_tree(g), tx.init(f64_tree(g)))
  assert_tree_f64_close(out, want, what=f"clip_by_average_norm at scale {scale}")
  assert_f64_close(state.global_norm, ref_norm(g.values()), what="state.global_norm")
  assert_tree_f64_close(F.clip_by_average_norm(f64_tree(g), c), want,
                        what="functional.clip_by_average_norm")


# ----------------------------------------------------------- clip_by_global_norm


@pytest.mark.parametrize("scale", (1.0,) + SCALES)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_clip_by_global_norm_float64(p, scale):
  g = _scaled(_tree(5), scale)
  n = ref_norm(g.values(), p)
  c = float(n) * 0.375  # clipped: the scale is 0.375 up to rounding
  want = {k: _ld(v) * (LD(c) / n) for k, v in g.items()}
  tx = gc.clip_by_global_norm(c, norm_type=p)
  out, state = tx.update(f64_tree(g), tx.init(f64_tree(g)))
  what = f"clip_by_global_norm(norm_type={p}) at scale {scale}"
  assert_f64_close(state.global_norm, n, what=f"{what}: state.global_norm")
  assert_f64_close(state.scale, LD(c) / n, what=f"{what}: state.scale")
  assert_tree_f64_close(out, want, what=what)
  assert int(state.num_clipped) == 1 and int(state.num_nonfinite) == 0
  # The functional API and the norm alone.
  assert_f64_close(F.global_norm(f64_tree(g), p), n, what=f"functional.global_norm p={p}")
  out_f, norm_f = F.clip_by_global_norm(f64_tree(g), c, norm_type=p)
  assert_f64_close(norm_f, n, what="functional.clip_by_global_norm's norm")
  assert_tree_f64_close(out_f, want, what="functional.clip_by_global_norm")


@pytest.mark.parametrize("scale", SCALES)
def test_functional_use_norm_float64(scale):
  g = _scaled(_tree(6), scale)
  n = ref_norm(g.values())
  use = float(n) * 3.0  # e.g. the norm of a larger tree this one is part of
  c = float(n)
  want = {k: _ld(v) * (LD(c) / LD(use)) for k, v in g.items()}
  out, norm = F.clip_by_global_norm(f64_tree(g), c, use_norm=f64(use))
  assert_f64_close(norm, use, what="use_norm as given")
  assert_tree_f64_close(out, want, what=f"clip_by_global_norm(use_norm=) at {scale}")


def test_clip_by_global_norm_float64_digits_inside_jit_and_chain():
  g = _tree(7)
  n = ref_norm(g.values())
  tx = optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(0.5))
  params = f64_tree(jax.tree.map(np.zeros_like, g))
  out, state = jax.jit(tx.update)(f64_tree(g), tx.init(params), params)
  assert_f64_close(optax.tree_utils.tree_get(state, "global_norm"), n,
                   what="global_norm under jit in a chain")
  assert_tree_f64_close(out, {k: -0.5 * _ld(v) / n for k, v in g.items()},
                        what="clip + sgd under jit")


@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "error"])
def test_float64_range_is_not_a_nonfinite_step(nonfinite):
  """1e200 is a finite float64 gradient: no policy may treat it as inf."""
  g = _scaled(_tree(8), 1e200)
  n = ref_norm(g.values())
  tx = gc.clip_by_global_norm(1e200, nonfinite=nonfinite)
  out, state = tx.update(f64_tree(g), tx.init(f64_tree(g)))
  jax.block_until_ready(out)
  assert int(state.num_nonfinite) == 0, f"nonfinite={nonfinite!r} took 1e200 for inf"
  assert_f64_close(state.global_norm, n, what="state.global_norm")
  assert_tree_f64_close(out, {k: _ld(v) * (LD(1e200) / n) for k, v in g.items()},
                        what=f"nonfinite={nonfinite!r} clip at 1e200")


def test_float64_nonfinite_policies_keep_float64():
  g = {"a": np.array([1e200, np.inf, 3.0]), "b": np.array([2e-200, -1.0])}
  tx = gc.clip_by_global_norm(1.0, nonfinite="zero")
  out, state = tx.update(f64_tree(g), tx.init(f64_tree(g)))
  for k in g:
    assert out[k].dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(out[k]), np.zeros_like(g[k]),
                                  err_msg="nonfinite='zero' gives exact zeros")
  assert int(state.num_nonfinite) == 1
  tx = gc.clip_by_global_norm(1.0, nonfinite="propagate")
  out, state = tx.update(f64_tree(g), tx.init(f64_tree(g)))
  assert np.isposinf(np.asarray(state.global_norm))
  for k in g:
    assert out[k].dtype == jnp.float64
    assert np.all(np.isnan(np.asarray(out[k]))), "propagate: every entry NaN"
  tx = gc.clip_by_global_norm(1.0, nonfinite="error")
  with pytest.raises(FloatingPointError, match="non-finite"):
    out, _ = tx.update(f64_tree(g), tx.init(f64_tree(g)))
    jax.block_until_ready(out)
  jax.effects_barrier()


def test_mixed_float32_float64_tree():
  """The norm of a mixed tree is float64; each leaf keeps its own dtype."""
  rng = np.random.default_rng(9)
  a32 = rng.normal(size=6).astype(np.float32)
  b64 = rng.normal(size=4) * 1e100  # beyond float32's range
  n = ref_norm([a32, b64])
  c = float(n) / 4
  tx = gc.clip_by_global_norm(c)
  g = {"a": jnp.asarray(a32), "b": f64(b64)}
  out, state = tx.update(g, tx.init(g))
  assert_f64_close(state.global_norm, n, what="norm of a float32 + float64 tree")
  assert out["a"].dtype == jnp.float32, "a float32 leaf stays float32"
  np.testing.assert_allclose(np.asarray(out["a"]), a32 * 0.25, rtol=1e-6)
  assert_f64_close(out["b"], _ld(b64) * (LD(c) / n), what="the float64 leaf")


# -------------------------------------------------------------- adaptive_grad_clip


def _agc_ref(g, w, clipping, eps):
  """Brock et al. (2021) Eq. 3 per unit: rank <= 1 one unit, else all axes but last."""
  out, ratios = {}, []
  for k in g:
    axes = None if np.ndim(g[k]) <= 1 else tuple(range(np.ndim(g[k]) - 1))
    gn = np.sqrt((_ld(g[k]) ** 2).sum(axis=axes, keepdims=True))
    wn = np.maximum(np.sqrt((_ld(w[k]) ** 2).sum(axis=axes, keepdims=True)), LD(eps))
    ratios.append((gn / wn).max())
    out[k] = _ld(g[k]) * np.minimum(LD(1), LD(clipping) * wn / gn)
  return out, max(ratios)


@pytest.mark.parametrize("scale", SCALES)
def test_adaptive_grad_clip_float64(scale):
  rng = np.random.default_rng(10)
  w = {"k": rng.normal(size=(6, 3)) * scale, "b": rng.normal(size=(3,)) * scale}
  g = {"k": rng.normal(size=(6, 3)) * scale * np.array([0.05, 0.3, 2.0]),
       "b": rng.normal(size=(3,)) * scale * 0.1}
  eps = 1e-3 * scale
  want, ratio = _agc_ref(g, w, 0.2, eps)
  tx = gc.adaptive_grad_clip(0.2, eps=eps)
  out, state = jax.jit(tx.update)(f64_tree(g), tx.init(f64_tree(w)), f64_tree(w))
  assert_tree_f64_close(out, want, what=f"adaptive_grad_clip at scale {scale}")
  assert_f64_close(state.max_ratio, ratio, what="state.max_ratio")
  assert_f64_close(state.global_norm, ref_norm(g.values()), what="state.global_norm")
  assert int(state.num_clipped) == 1


# ====================================================================== autoclip


@pytest.mark.parametrize("scale", SCALES)
def test_autoclip_float64(scale):
  rng = np.random.default_rng(11)
  size, q = 4, 30.0
  tx = gc.autoclip(percentile=q, history_size=size)
  seq = [{"w": rng.normal(size=(3, 2)) * scale * m} for m in (1.0, 3.0, 0.5, 2.0, 6.0,
                                                              1.5)]
  state = tx.init(f64_tree(seq[0]))
  update = jax.jit(tx.update)
  history = []
  for t, g in enumerate(seq):
    out, state = update(f64_tree(g), state)
    n = ref_norm([g["w"]])
    history = (history + [float(n)])[-size:]
    c = np.percentile(np.array(history, np.float64), q)  # linear, as the docstring says
    what = f"autoclip step {t} at scale {scale}"
    assert_f64_close(state.global_norm, n, what=f"{what}: state.global_norm")
    assert_f64_close(state.max_norm, c, rtol=RTOL_STATS, what=f"{what}: state.max_norm")
    assert state.norm_history.dtype == jnp.float64, "the norm history keeps float64"
    assert_f64_close(out["w"], _ld(g["w"]) * min(LD(1), LD(c) / n),
                     rtol=RTOL_STATS, what=what)


# ========================================================================= zclip


def _zclip_ref(norms, alpha, z_thr, warmup, eps):
  """ZClip (Kumar et al. 2025) as zclip's docstring states it, in float64."""
  mean = var = 0.0
  count = 0
  rows = []
  for n in norms:
    if count < max(warmup, 1):
      count += 1
      delta = n - mean
      mean += delta / count
      var = (var * (count - 1) + delta * (n - mean)) / count
      rows.append((1.0, mean, var, math.inf))
      continue
    sigma = math.sqrt(var)
    z = (n - mean) / (sigma + eps)
    if z > z_thr:
      c = mean + z_thr * sigma / (z / z_thr)
      scale, bound, g_tilde = min(1.0, c / n), c, c
    else:
      scale, bound, g_tilde = 1.0, mean + z_thr * (sigma + eps), n
    mean = alpha * mean + (1 - alpha) * g_tilde
    var = alpha * var + (1 - alpha) * (g_tilde - mean) ** 2
    count += 1
    rows.append((scale, mean, var, bound))
  return rows


@pytest.mark.parametrize("scale", SCALES_VAR)
def test_zclip_float64(scale):
  rng = np.random.default_rng(12)
  sizes = (1.0, 1.1, 0.9, 1.05, 5.0, 1.0)  # warm-up 3, then a normal step, a spike
  seq = []
  for m in sizes:
    v = rng.normal(size=5)
    seq.append({"w": v / np.linalg.norm(v) * m * scale})
  norms = [float(ref_norm([g["w"]])) for g in seq]
  alpha, z_thr, eps = 0.9, 2.5, 1e-6 * scale
  rows = _zclip_ref(norms, alpha, z_thr, 3, eps)
  assert rows[4][0] < 1 and rows[3][0] == 1.0  # the reference sees one spike
  tx = gc.zclip(alpha=alpha, z_threshold=z_thr, warmup_steps=3, eps=eps)
  state = tx.init(f64_tree(seq[0]))
  update = jax.jit(tx.update)
  for t, (g, n, (s, mean, var, bound)) in enumerate(zip(seq, norms, rows)):
    out, state = update(f64_tree(g), state)
    what = f"zclip step {t} at scale {scale}"
    assert_f64_close(state.global_norm, n, what=f"{what}: state.global_norm")
    assert_f64_close(state.mean, mean, rtol=RTOL_STATS, what=f"{what}: state.mean")
    assert_f64_close(state.var, var, rtol=RTOL_STATS * 100, what=f"{what}: state.var")
    assert_f64_close(state.max_norm, bound, rtol=RTOL_STATS,
                     what=f"{what}: state.max_norm")
    assert_f64_close(out["w"], _ld(g["w"]) * LD(s), rtol=RTOL_STATS, what=what)
  assert int(state.num_clipped) == 1


# ========================================================================= adagc


def _adagc_ref(seq, lambda_abs, lambda_rel, beta, warmup):
  """AdaGC (Wang et al. 2025, Algorithm 1) as adagc's docstring states it."""
  keys = sorted(seq[0])
  gamma = {k: math.inf for k in keys}
  rows = []
  for t, g in enumerate(seq):
    n_i = {k: float(ref_leaf_norm(g[k])) for k in keys}
    n = float(ref_norm([g[k] for k in keys]))
    warm = t < warmup
    if warm:
      s = {k: min(1.0, lambda_abs / n) for k in keys}
      bound = lambda_abs
    else:
      s = {k: min(1.0, lambda_rel * gamma[k] / n_i[k]) for k in keys}
      bound = float(ref_norm([np.array([lambda_rel * gamma[k]]) for k in keys]))
    new = {}
    for k in keys:
      clipped = n_i[k] * s[k]
      if warm:
        new[k] = min(gamma[k], clipped) if clipped > 0 else gamma[k]
      elif math.isinf(gamma[k]):
        new[k] = clipped if clipped > 0 else gamma[k]
      else:
        new[k] = beta * gamma[k] + (1 - beta) * clipped
    gamma = new
    rows.append(({k: _ld(g[k]) * LD(s[k]) for k in keys}, dict(gamma), n, bound,
                 any(v < 1 for v in s.values())))
  return rows


@pytest.mark.parametrize("scale", SCALES)
def test_adagc_float64(scale):
  rng = np.random.default_rng(13)
  seq = [{"a": rng.normal(size=(3, 2)) * scale * m, "b": rng.normal(size=(4,)) * scale}
         for m in (1.0, 0.8, 3.0, 1.2)]
  args = dict(lambda_abs=2.0 * scale, lambda_rel=1.05, beta=0.9, warmup_steps=2)
  rows = _adagc_ref(seq, args["lambda_abs"], args["lambda_rel"], args["beta"], 2)
  tx = gc.adagc(**args)
  state = tx.init(f64_tree(seq[0]))
  update = jax.jit(tx.update)
  for t, (g, (want, gamma, n, bound, _)) in enumerate(zip(seq, rows)):
    out, state = update(f64_tree(g), state)
    what = f"adagc step {t} at scale {scale}"
    assert_f64_close(state.global_norm, n, what=f"{what}: state.global_norm")
    assert_f64_close(state.max_norm, bound, rtol=RTOL_STATS, what=f"{what}: max_norm")
    for k in g:
      assert_f64_close(state.gamma[k], gamma[k], rtol=RTOL_STATS,
                       what=f"{what}: gamma[{k}]")
    assert_tree_f64_close(out, want, rtol=RTOL_STATS, what=what)
  assert int(state.num_clipped) == sum(row[-1] for row in rows) > 0


# =================================================================== skip_spikes


@pytest.mark.parametrize("scale", SCALES_VAR)
def test_skip_spikes_float64(scale):
  rng = np.random.default_rng(14)
  sizes = (1.0, 1.2, 0.9, 1.1, 8.0, 1.0)
  seq = []
  for m in sizes:
    v = rng.normal(size=(2, 3))
    seq.append({"w": v / np.linalg.norm(v) * m * scale})
  thr, decay, min_count = 3.0, 0.9, 3
  tx = gc.skip_spikes(optax.sgd(1.0), threshold=thr, ema_decay=decay,
                      min_count=min_count)
  params = f64_tree({"w": np.zeros((2, 3))})
  state = tx.init(params)
  update = jax.jit(tx.update)
  norms = [float(ref_norm([g["w"]])) for g in seq]
  rows = ref_skip_spikes(norms, thr, decay, min_count)
  for t, (g, (skip, n, bound, mean, var)) in enumerate(zip(seq, rows)):
    out, state = update(f64_tree(g), state, params)
    what = f"skip_spikes step {t} at scale {scale}"
    assert_f64_close(state.global_norm, n, what=f"{what}: state.global_norm")
    assert_f64_close(state.max_norm, bound, rtol=RTOL_STATS, what=f"{what}: max_norm")
    assert_f64_close(state.mean, mean, rtol=RTOL_STATS, what=f"{what}: state.mean")
    assert_f64_close(state.var, var, rtol=RTOL_STATS * 100, what=f"{what}: state.var")
    want = np.zeros_like(g["w"]) if skip else -g["w"]
    assert out["w"].dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(out["w"]), want, err_msg=what)
  assert int(state.num_skipped) == 1  # only the 8x spike


# ============================================================== per_example_clip


@pytest.mark.parametrize("scale", SCALES)
def test_per_example_clip_float64(scale):
  rng = np.random.default_rng(15)
  b = 4
  m = np.array([0.2, 1.0, 3.0, 0.7]) * scale  # per-example magnitudes
  g = {"w": rng.normal(size=(b, 3, 2)) * m[:, None, None],
       "v": rng.normal(size=(b, 5)) * m[:, None]}
  ex = np.sqrt((_ld(g["w"]) ** 2).sum(axis=(1, 2)) + (_ld(g["v"]) ** 2).sum(axis=1))
  c = float(np.median(ex.astype(np.float64)))
  s = np.minimum(LD(1), LD(c) / ex)
  want = {"w": (_ld(g["w"]) * s[:, None, None]).sum(axis=0),
          "v": (_ld(g["v"]) * s[:, None]).sum(axis=0)}
  tx = gc.dp.per_example_clip(c)
  out, state = jax.jit(tx.update)(f64_tree(g), tx.init(f64_tree(g)))
  assert_tree_f64_close(out, want, what=f"per_example_clip at scale {scale}")
  assert_f64_close(state.max_example_norm, ex.max(), what="state.max_example_norm")
  assert_f64_close(state.mean_example_norm, ex.mean(), what="state.mean_example_norm")
  np.testing.assert_allclose(float(state.fraction_clipped), 0.5)


# ============================================== every rule: dtypes, scan, low precision


def _rules():
  """name -> (build, needs params); one step of each is checked below."""
  return {
      "clip_by_value": (lambda: gc.clip_by_value(-0.5, 0.5), False),
      "clip_by_norm": (lambda: gc.clip_by_norm(0.5), False),
      "clip_by_norm_axes": (lambda: gc.clip_by_norm(0.5, axes=-1), False),
      "clip_by_average_norm": (lambda: gc.clip_by_average_norm(0.05), False),
      "clip_by_global_norm": (lambda: gc.clip_by_global_norm(0.5), False),
      "clip_by_global_norm_p3": (lambda: gc.clip_by_global_norm(0.5, norm_type=3),
                                 False),
      "adaptive_grad_clip": (lambda: gc.adaptive_grad_clip(0.01), True),
      "autoclip": (lambda: gc.autoclip(10.0, 4), False),
      "zclip": (lambda: gc.zclip(warmup_steps=1), False),
      "adagc": (lambda: gc.adagc(lambda_abs=0.5, warmup_steps=1), False),
      "skip_spikes": (lambda: gc.skip_spikes(optax.sgd(1.0), min_count=1), True),
      "per_example_clip": (lambda: gc.dp.per_example_clip(0.5), False),
  }


RULES = sorted(_rules())


def _inputs(name, dtype, entry=None, seed=16):
  """(grads, params) of one dtype: per-example grads carry a batch axis of 2."""
  rng = np.random.default_rng(seed)
  shapes = {"k": (3, 4), "b": (4,)}
  if name == "per_example_clip":
    shapes = {k: (2,) + s for k, s in shapes.items()}
  make = ((lambda s: rng.normal(size=s)) if entry is None
          else (lambda s: np.full(s, entry)))
  g = {k: jnp.asarray(make(s), dtype) for k, s in shapes.items()}
  batched = name == "per_example_clip"
  p = {k: jnp.asarray(np.ones(s[1:] if batched else s), dtype) for k, s in shapes.items()}
  return g, p


def _float_dtypes(tree):
  return {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)}


def _state_norm(state):
  for field in ("global_norm", "max_example_norm"):
    value = optax.tree_utils.tree_get(state, field)
    if value is not None:
      return value
  return None


def _avals(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.dtype(x.dtype)), tree)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_state_dtypes_are_stable(name, dtype):
  """init's state has the shapes and dtypes update returns (so the rule runs in lax.scan).

  float64 gradients give float64 updates and a float64 norm in the state; float32 stays
  float32 with x64 on (nothing is promoted). Checked on the traced shapes
  (``jax.eval_shape``), which is what ``lax.scan`` and ``jit`` see.
  """
  build, needs_params = _rules()[name]
  tx = build()
  g, p = _inputs(name, jnp.dtype(dtype))
  state = tx.init(p if needs_params or name != "per_example_clip" else g)
  us, new_state = jax.eval_shape(
      lambda g_, s_: tx.update(g_, s_, p if needs_params else None), g, state)
  assert _float_dtypes(us) == {jnp.dtype(dtype)}, f"{name}: updates must be {dtype}"
  norm = _state_norm(new_state)
  if norm is not None:
    assert norm.dtype == jnp.dtype(dtype), f"{name}: state norm must be {dtype}"
  assert _avals(new_state) == _avals(state), (
      f"{name}: update changes the state's shapes/dtypes ({dtype} gradients): "
      f"init gives {_avals(state)}, update {_avals(new_state)}")
  wrong = _float_dtypes(new_state) - {jnp.dtype(dtype)}
  if dtype == "float32":
    assert not wrong, f"{name}: float32 gradients gave {wrong} state under x64"


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_norm_beyond_range_is_finite_float32(name, dtype):
  """A float16 norm above 65504, a bfloat16 sum of squares above float32's range."""
  if name == "clip_by_value":
    pytest.skip("clip_by_value takes no norm")
  entry = 6e4 if dtype == "float16" else 1e20
  build, needs_params = _rules()[name]
  tx = build()
  g, p = _inputs(name, jnp.dtype(dtype), entry=entry)
  state = tx.init(p if needs_params or name != "per_example_clip" else g)
  out, state = jax.jit(tx.update)(g, state, p if needs_params else None)
  exact = [np.asarray(x.astype(jnp.float32), np.float64) for x in jax.tree.leaves(g)]
  norm = _state_norm(state)
  assert norm.dtype == jnp.float32, f"{name}: a {dtype} norm accumulates in float32"
  if name == "per_example_clip":
    want = ref_norm([x[0] for x in exact])
  else:
    want = ref_norm(exact, 3.0 if name.endswith("_p3") else 2.0)
  assert np.isfinite(float(norm)), f"{name}: the {dtype} norm must be finite"
  np.testing.assert_allclose(float(norm), float(want), rtol=1e-6)
  for leaf in jax.tree.leaves(out):
    assert leaf.dtype == jnp.dtype(dtype), f"{name}: the update keeps {dtype}"
    assert np.all(np.isfinite(np.asarray(leaf.astype(jnp.float32)))), (
        f"{name}: a finite {dtype} gradient must give a finite update")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_clip_values(dtype):
  """The clipped low-precision update is the right one (to the dtype's precision)."""
  entry = 6e4 if dtype == "float16" else 1e20
  g = {"a": jnp.full((4,), entry, dtype), "b": jnp.full((3, 4), entry, dtype)}
  v = float(jnp.asarray(entry, dtype).astype(jnp.float32))  # the stored entry
  tx = gc.clip_by_global_norm(1.0)
  out, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(float(state.global_norm), v * 4.0, rtol=1e-6)  # sqrt(16)
  for leaf in out.values():
    np.testing.assert_allclose(np.asarray(leaf.astype(jnp.float32)), 0.25, rtol=1e-2)
  out = F.clip_by_norm(g, 1.0)
  np.testing.assert_allclose(np.asarray(out["a"].astype(jnp.float32)), 0.5, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(out["b"].astype(jnp.float32)), 1 / math.sqrt(12),
                             rtol=1e-2)


@pytest.mark.parametrize("name", RULES)
def test_float32_stays_float32_and_matches_numpy(name):
  build, needs_params = _rules()[name]
  tx = build()
  g, p = _inputs(name, jnp.float32)
  state = tx.init(p if needs_params or name != "per_example_clip" else g)
  out, state = jax.jit(tx.update)(g, state, p if needs_params else None)
  assert _float_dtypes(out) == {jnp.dtype(jnp.float32)}
  norm = _state_norm(state)
  if norm is not None:
    assert norm.dtype == jnp.float32
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]
    if name == "per_example_clip":
      per = [math.sqrt(sum(float((x[i] ** 2).sum()) for x in leaves)) for i in range(2)]
      want = max(per)
    else:
      want = float(ref_norm(leaves, 3.0 if name.endswith("_p3") else 2.0))
    np.testing.assert_allclose(float(norm), want, rtol=1e-6)


# ------------------------------------------------------------------- properties

_SHAPES = [(3,), (2, 3), (5,)]


@settings(max_examples=15, deadline=None)
@given(shapes=st.lists(st.sampled_from(_SHAPES), min_size=1, max_size=3),
       exponent=st.integers(-250, 250), spread=st.integers(0, 20),
       p=st.sampled_from([1.0, 2.0, 3.0, math.inf]),
       fraction=st.floats(0.05, 2.0), seed=st.integers(0, 2 ** 16))
def test_global_norm_float64_property(shapes, exponent, spread, p, fraction, seed):
  """Random trees at random float64 scales (leaves up to 1e20 apart) against NumPy."""
  rng = np.random.default_rng(seed)
  leaves = [rng.normal(size=s) * 10.0 ** (exponent - rng.integers(0, spread + 1))
            for s in shapes]
  n = ref_norm(leaves, p)
  c = float(n) * fraction
  assert_f64_close(F.global_norm([f64(x) for x in leaves], p), n,
                   what=f"global_norm p={p} at 1e{exponent}")
  out, norm = F.clip_by_global_norm([f64(x) for x in leaves], c, norm_type=p)
  assert_f64_close(norm, n, what="clip_by_global_norm's norm")
  s = min(LD(1), LD(c) / n)
  for x, y in zip(leaves, out):
    assert_f64_close(y, _ld(x) * s, what=f"clip at 1e{exponent}, p={p}")
