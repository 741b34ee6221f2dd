"""The backend-tuning switch (gradclip_jax.config) changes programs, never values.

Every rule, in every dtype (float32, bfloat16, float16, float64 under x64), jitted,
over three steps (normal gradients, gradients whose sum of squares overflows, normal
again, so that both the plain and the rescue paths run and the adaptive states move),
must give bit-identical updates and states with the tuning on and off. And the
switch must really switch: the tuned CPU program has the conditional and the
barriers that the plain one lacks.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax as gc
from gradclip_jax import config
from gradclip_jax import functional as F


def _functional(max_norm):
  """The functional API as a stateless 'rule' (same call signature as the others)."""

  def update(g, state, params=None):
    del params
    out = {"value": F.clip_by_value(g, -0.5, 0.5),
           "norm": F.clip_by_norm(g, max_norm),
           "norm_axes": F.clip_by_norm(g, max_norm, axes=-1),
           "average": F.clip_by_average_norm(g, 0.1 * max_norm),
           "global": F.clip_by_global_norm(g, max_norm),
           "global_p1": F.global_norm(g, 1.0)}
    return out, state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


RULES = {
    "clip_by_global_norm": lambda: gc.clip_by_global_norm(1.0),
    "clip_by_global_norm_p1": lambda: gc.clip_by_global_norm(1.0, norm_type=1.0),
    "clip_by_global_norm_p3": lambda: gc.clip_by_global_norm(1.0, norm_type=3.0),
    "clip_by_global_norm_inf": lambda: gc.clip_by_global_norm(1.0, norm_type=jnp.inf),
    "clip_by_global_norm_zero": lambda: gc.clip_by_global_norm(1.0, nonfinite="zero"),
    "clip_by_norm": lambda: gc.clip_by_norm(0.5),
    "clip_by_norm_axes": lambda: gc.clip_by_norm(0.5, axes=0),
    "clip_by_norm_per_leaf": lambda: gc.clip_by_norm({"w": 0.5, "b": 2.0,
                                                      "small": [0.1, 0.2]}),
    "clip_by_average_norm": lambda: gc.clip_by_average_norm(0.05),
    "clip_by_value": lambda: gc.clip_by_value(-0.5, 0.5),
    "adaptive_grad_clip": lambda: gc.adaptive_grad_clip(0.05),
    "autoclip": lambda: gc.autoclip(50.0, 4),
    "zclip": lambda: gc.zclip(warmup_steps=1),
    "adagc": lambda: gc.adagc(warmup_steps=1),
    "skip_spikes": lambda: gc.skip_spikes(optax.adam(1e-2), threshold=1.0, min_count=1),
    "functional": lambda: _functional(1.0),
}

# Leaves above the packing limit (65,536 entries) take the large-leaf paths (the
# ordered select of skip_spikes, the unpacked reductions); the rest are batched.
SHAPES = {"w": (300, 256), "b": (256,), "small": [(8, 4), (8, 4)]}
HUGE = {jnp.float16: 3e4, jnp.bfloat16: 1e25, jnp.float32: 1e25, jnp.float64: 1e200}


def _tree(dtype, scale, seed):
  rng = np.random.default_rng(seed)
  mk = lambda shape: jnp.asarray(scale * rng.normal(size=shape), dtype)
  return {"w": mk(SHAPES["w"]), "b": mk(SHAPES["b"]),
          "small": [mk(s) for s in SHAPES["small"]]}


def _three_steps_all(dtype):
  """{rule: flat (updates, states) of its three steps}, every rule in one program.

  One jitted function updates all the rules side by side (each with its own state),
  so a dtype and a setting compile once, not once per rule; it is called three
  times, like one rule's jitted update would be.
  """
  names = list(RULES)
  txs = [RULES[n]() for n in names]
  params = _tree(dtype, 1.0, 0)
  grads = [_tree(dtype, 1.0, 1), _tree(dtype, HUGE[dtype], 2), _tree(dtype, 2.0, 3)]

  def update_all(g, states, p):
    return tuple(tx.update(g, s, p) for tx, s in zip(txs, states))

  update = jax.jit(update_all)  # a fresh function: traced under the current setting
  states = tuple(tx.init(params) for tx in txs)
  out = {n: [] for n in names}
  for g in grads:
    results = update(g, states, params)
    states = tuple(s for _, s in results)
    for n, r in zip(names, results):
      out[n].append(r)
  return {n: [np.asarray(x) for x in jax.tree.leaves(o)] for n, o in out.items()}


@functools.lru_cache(maxsize=None)
def _tuned_and_plain(dtype_name):
  """Every rule's leaves with the tuning on and off (computed once per dtype)."""
  dtype = {jnp.dtype(d).name: d for d in HUGE}[dtype_name]
  with config.backend_tuning_set(True):
    tuned = _three_steps_all(dtype)
  with config.backend_tuning_set(False):
    plain = _three_steps_all(dtype)
  return tuned, plain


def _bits(x):
  x = np.asarray(x)
  return np.atleast_1d(x).view(np.uint8)


def _assert_bit_identical(name, dtype):
  all_tuned, all_plain = _tuned_and_plain(jnp.dtype(dtype).name)
  tuned, plain = all_tuned[name], all_plain[name]
  assert len(tuned) == len(plain)
  for i, (a, b) in enumerate(zip(tuned, plain)):
    assert a.dtype == b.dtype and a.shape == b.shape, (name, i)
    if not np.array_equal(_bits(a), _bits(b)):
      raise AssertionError(f"{name} {jnp.dtype(dtype).name}: output {i} differs "
                           f"with the tuning off:\n{np.asarray(a)}\n{np.asarray(b)}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", list(RULES))
def test_tuning_off_gives_bit_identical_results(name, dtype):
  _assert_bit_identical(name, dtype)


@pytest.mark.parametrize("name", list(RULES))
def test_tuning_off_gives_bit_identical_results_float64(name):
  with jax.enable_x64(True):
    _assert_bit_identical(name, jnp.float64)


def _step_programs(tx, params):
  """(lowered StableHLO text, compiled HLO text) of a donated training step."""
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  jax.clear_caches()  # jit caches traces per function: the switch is read at trace
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
  return lowered.as_text(), lowered.compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU workarounds")
def test_the_switch_changes_the_cpu_program():
  """The tuned program has the conditional (overflow_cond) and the barrier
  (scale_barrier, which targets trees with bfloat16/float16 leaves); the plain one
  has neither. Without this the test above could pass because the switch did
  nothing."""
  params = {"w": jnp.ones((64, 32), jnp.bfloat16), "b": jnp.ones(32)}
  tx = optax.chain(gc.clip_by_global_norm(1.0), optax.adam(1e-3))

  def barrier(lowered):
    """A barrier around the gradients (the norms' rescue factors pass a barrier of
    two scalars in every form, so that XLA cannot fold them)."""
    return any("stablehlo.optimization_barrier" in line and "64x32xbf16" in line
               for line in lowered.splitlines())

  with config.backend_tuning_set(True):
    lowered, compiled = _step_programs(tx, params)
  assert " conditional(" in compiled and barrier(lowered)
  with config.backend_tuning_set(False):
    lowered, compiled = _step_programs(tx, params)
  assert " conditional(" not in compiled and not barrier(lowered)
  # One workaround off: only its part of the program goes.
  with config.backend_tuning_set(True, disabled=["overflow_cond"]):
    lowered, compiled = _step_programs(tx, params)
  assert " conditional(" not in compiled and barrier(lowered)


def test_gpu_column_pairs_changes_only_the_gpu_program():
  """gpu_column_pairs lowers AGC's per-unit sums as a complex sum for CUDA only.

  (Lowering for CUDA needs no GPU and no plugin; the CPU and TPU programs keep the
  plain sums.)
  """
  params = {"w": jnp.ones((64, 32)), "b": jnp.ones(32)}
  tx = gc.adaptive_grad_clip(0.01)

  def lowered(platform):
    jax.clear_caches()
    f = lambda g, s, p: tx.update(g, s, p)[0]
    return jax.jit(f).trace(params, tx.init(params), params).lower(
        lowering_platforms=(platform,)).as_text()

  with config.backend_tuning_set(True):
    assert "stablehlo.complex" in lowered("cuda")
    assert "stablehlo.complex" not in lowered("cpu")
    assert "stablehlo.complex" not in lowered("tpu")
  with config.backend_tuning_set(True, disabled=["gpu_column_pairs"]):
    assert "stablehlo.complex" not in lowered("cuda")


def test_switch_api_and_errors():
  assert config.backend_tuning() and all(config.backend_tuning(n)
                                         for n in config.WORKAROUNDS)
  with config.backend_tuning_set(True, disabled="scale_barrier,overflow_cond"):
    assert config.backend_tuning()
    assert not config.backend_tuning("scale_barrier")
    assert not config.backend_tuning("overflow_cond")
    assert config.backend_tuning("value_clip_tested")
  assert config.backend_tuning("scale_barrier")
  with pytest.raises(ValueError, match="unknown backend workaround"):
    config.set_backend_tuning(True, disabled=["no_such_thing"])
  with pytest.raises(ValueError, match="unknown backend workaround"):
    config.backend_tuning("no_such_thing")
  with pytest.raises(TypeError):
    config.set_backend_tuning("0")
  assert config.backend_tuning()  # a failed call leaves the setting alone
  assert config._parse("0") == (False, frozenset())  # pylint: disable=protected-access
  assert config._parse("") == (True, frozenset())  # pylint: disable=protected-access
  assert config._parse(" value_clip_tested , skip_norm_apart") == (  # pylint: disable=protected-access
      True, frozenset({"value_clip_tested", "skip_norm_apart"}))


def test_environment_variable_is_read_at_import():
  code = ("import gradclip_jax as gc; "
          "print(gc.config.backend_tuning(), gc.config.backend_tuning('scale_barrier'),"
          " gc.config.backend_tuning('overflow_cond'))")
  out = {}
  for value in ("0", "scale_barrier"):
    env = dict(os.environ, GRADCLIP_JAX_BACKEND_TUNING=value, JAX_PLATFORMS="cpu")
    out[value] = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                capture_output=True, text=True).stdout.split()
  assert out["0"] == ["False", "False", "False"]
  assert out["scale_barrier"] == ["True", "False", "True"]


def test_eager_calls_do_not_recompile():
  """Outside jit the workarounds stand aside: a second eager call compiles nothing.

  Each workaround's ``lax.cond`` / ``platform_dependent`` over fresh branch functions
  would otherwise be compiled anew on every eager call (0.4 s for a 2-leaf norm).
  """
  import logging
  tree = {"a": jnp.ones(3), "b": jnp.full((2, 2), 2.0)}
  gc.functional.global_norm(tree)  # warm: the plain form's ops compile once
  gc.functional.clip_by_norm(tree["b"], 1.0)
  records = []

  class _Catch(logging.Handler):
    def emit(self, record):
      records.append(record.getMessage())

  handler = _Catch()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      n = gc.functional.global_norm(tree)
      gc.functional.clip_by_norm(tree["b"], 1.0)
  finally:
    logger.removeHandler(handler)
  np.testing.assert_allclose(float(n), np.sqrt(3 + 16), rtol=1e-6)
  assert not [m for m in records if "Compiling" in m], records
