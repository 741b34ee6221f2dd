"""Every public rule compiles for a TPU, and the TPU programs keep their shape.

libtpu (``pip install "jax[tpu]==<jax's version>"``, or ``.ci/tpu_setup.sh``) compiles
ahead of time for a TPU topology on a machine without a TPU. The tests compile, for
one chip of a ``v5e:2x2`` slice:

* every public transform of gradclip_jax (and ``dp.clipped_grad`` on a small model,
  both its methods) in one program, float32 and bfloat16 leaves, so a change that
  breaks the TPU path fails here;
* ``clip_by_value + adam`` and ``adam``: the same HBM traffic (the hit flag fuses into
  Adam's pass);

and, sharded over the 4-chip slice, ``clip_by_global_norm + adam``: one all-reduce
and no all-gather. Skipped when libtpu is not installed, except under ``CI=true``,
where a missing libtpu fails.

The rest of the suite runs with ``JAX_PLATFORMS=cpu`` (``conftest.py``), so libtpu is
loaded only here, by the topology; the environment defaults below quiet its start-up
on a host without a TPU.
"""

import importlib.util
import math
import os
import sys

import pytest

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
if HAVE_LIBTPU:
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # libtpu takes a machine-wide lock file; a compile-only user needs none, and
  # another process (a benchmark, a second test run) may hold it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
import optax  # noqa: E402

import gradclip_jax as gc  # noqa: E402
from gradclip_jax import dp  # noqa: E402
from gradclip_jax import functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
cp = pytest.importorskip("compiled_programs")

pytestmark = pytest.mark.skipif(
    not HAVE_LIBTPU and os.environ.get("CI") != "true",
    reason="libtpu is not installed (pip install \"jax[tpu]==<jax version>\")")


@pytest.fixture(scope="module")
def chips():
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return list(topologies.get_topology_desc("v5e:2x2", platform="tpu").devices)


def _on(tree, sharding_of):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      jnp.shape(x), jnp.result_type(x), sharding=sharding_of(x)), tree)


def _compile(fn, args, donate=()):
  return jax.jit(fn, donate_argnums=donate).trace(*args).lower(
      lowering_platforms=("tpu",)).compile()


# Every public transform (keyed by its public name, then a variant), built with the
# arguments that pick its other paths.
TRANSFORMS = {
    ("clip_by_value", ""): lambda: gc.clip_by_value(-0.1, 0.1),
    ("clip_by_norm", ""): lambda: gc.clip_by_norm(1.0),
    ("clip_by_norm", "axes"): lambda: gc.clip_by_norm(1.0, axes=0),
    ("clip_by_average_norm", ""): lambda: gc.clip_by_average_norm(0.1),
    ("clip_by_global_norm", ""): lambda: gc.clip_by_global_norm(1.0),
    ("clip_by_global_norm", "p1"): lambda: gc.clip_by_global_norm(1.0, norm_type=1.0),
    ("clip_by_global_norm", "p3"): lambda: gc.clip_by_global_norm(1.0, norm_type=3.0),
    ("clip_by_global_norm", "inf"): lambda: gc.clip_by_global_norm(1.0,
                                                                   norm_type=jnp.inf),
    ("clip_by_global_norm", "zero"): lambda: gc.clip_by_global_norm(1.0,
                                                                    nonfinite="zero"),
    ("adaptive_grad_clip", ""): lambda: gc.adaptive_grad_clip(0.01),
    ("autoclip", ""): lambda: gc.autoclip(10.0, 16),
    ("zclip", ""): lambda: gc.zclip(),
    ("adagc", ""): lambda: gc.adagc(),
    ("skip_spikes", ""): lambda: gc.skip_spikes(optax.adam(1e-3)),
}
# The transforms of per-example gradients (a leading batch axis).
PER_EXAMPLE = {
    ("per_example_clip", ""): lambda: gc.per_example_clip(1.0),
    ("per_example_clip", "per_layer"): lambda: gc.per_example_clip(1.0, per_layer=True),
    ("add_noise", ""): lambda: gc.add_noise(1.0, 1.0, seed=0),
    ("dp_aggregate", ""): lambda: gc.dp_aggregate(1.0, 1.0, seed=0),
}
# Public functions that are not transforms: clipped_grad is compiled below.
NOT_TRANSFORMS = {"clipped_grad", "ghost_coverage"}


def test_the_lists_cover_every_public_transform():
  public = {n for n in gc.__all__ if n.islower() and callable(getattr(gc, n))}
  covered = {name for name, _ in list(TRANSFORMS) + list(PER_EXAMPLE)}
  assert public - NOT_TRANSFORMS == covered


def _tree(dtype):
  """Two large matrices, a vector and two small matrices (packed for the norm)."""
  return {"w": jnp.zeros((512, 256), dtype), "v": jnp.zeros((256, 384), dtype),
          "b": jnp.zeros((256,), dtype),
          "small": [jnp.zeros((8, 4), dtype), jnp.zeros((8, 4), dtype)]}


def _loss(w, x, y):
  h = jnp.tanh(x @ w["w1"] + w["b1"])
  return jnp.square(h @ w["w2"] - y).sum(-1)


def test_every_public_rule_compiles_for_one_tpu_chip(chips):
  """One program per gradient dtype (one compile each): float32 with everything,
  bfloat16 with the transforms of whole gradients."""
  one = jax.sharding.SingleDeviceSharding(chips[0])
  transforms = {"/".join(k): make() for k, make in TRANSFORMS.items()}
  per_example = {"/".join(k): make() for k, make in PER_EXAMPLE.items()}
  params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,)), "small": jnp.zeros((8, 4))}
  model = {"w1": jnp.zeros((16, 32)), "b1": jnp.zeros((32,)), "w2": jnp.zeros((32, 4))}
  batch = (jnp.zeros((8, 16)), jnp.zeros((8, 4)))

  def everything(params, grads, states, extra):
    out = {n: tx.update(grads, states[n], params) for n, tx in transforms.items()}
    out["functional"] = (F.global_norm(grads), F.clip_by_global_norm(grads, 1.0),
                         F.clip_by_norm(grads, 1.0, axes=-1),
                         F.clip_by_average_norm(grads, 0.1),
                         F.clip_by_value(grads, -0.1, 0.1))
    if extra is not None:
      examples, ex_states, model, batch = extra
      out.update({n: tx.update(examples, ex_states[n])
                  for n, tx in per_example.items()})
      for method in ("ghost",):
        out[method] = dp.clipped_grad(_loss, max_norm=1.0, method=method,
                                      return_norms=True)(model, *batch)
    return out

  for dtype in (jnp.float32, jnp.bfloat16):
    grads = jax.tree.map(lambda x: x.astype(dtype), params)
    states = {n: jax.eval_shape(tx.init, params) for n, tx in transforms.items()}
    extra = None
    if dtype == jnp.float32:
      examples = jax.tree.map(lambda x: jnp.zeros((4,) + x.shape, x.dtype), grads)
      extra = (examples, {n: jax.eval_shape(tx.init, params)
                          for n, tx in per_example.items()}, model, batch)
    compiled = _compile(everything, _on((params, grads, states, extra),
                                        lambda x: one))
    assert "ENTRY" in compiled.as_text()


def _step_summary(make_tx, sharding_of, dtype=jnp.float32):
  params = _tree(jnp.float32)
  grads = _tree(dtype)
  tx = make_tx()

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = jax.eval_shape(tx.init, params)
  args = (_on(params, sharding_of), _on(state, sharding_of), _on(grads, sharding_of))
  return cp.summary(_compile(step, args, donate=(0, 1)))


def test_clip_by_value_moves_the_bytes_of_adam_alone(chips):
  one = jax.sharding.SingleDeviceSharding(chips[0])
  for dtype in (jnp.float32, jnp.bfloat16):
    adam = _step_summary(lambda: optax.adam(1e-3), lambda x: one, dtype)
    clip = _step_summary(lambda: optax.chain(gc.clip_by_value(-0.1, 0.1),
                                             optax.adam(1e-3)), lambda x: one, dtype)
    assert clip["hbm_mb"] <= adam["hbm_mb"] * 1.001, (dtype, clip, adam)


def test_sharded_norms_are_one_all_reduce_and_no_all_gather(chips):
  """The large matrices split on their first axis over 4 chips, the rest replicated.

  (Leaves of at most 65,536 entries are packed into one array for a global norm:
  split ones would be gathered first, so here they are replicated.)
  """
  mesh = Mesh(chips, ("chips",))
  split = NamedSharding(mesh, PartitionSpec("chips", None))
  whole = NamedSharding(mesh, PartitionSpec())
  sharding_of = lambda x: split if math.prod(x.shape) > 65536 else whole
  for make in (lambda: gc.clip_by_global_norm(1.0), lambda: gc.clip_by_norm(1.0),
               lambda: gc.adaptive_grad_clip(0.01), lambda: gc.zclip()):
    s = _step_summary(lambda make=make: optax.chain(make(), optax.adam(1e-3)),
                      sharding_of)
    assert s["collectives"].get("all-reduce") == 1, s["collectives"]
    assert "all-gather" not in s["collectives"], s["collectives"]
