"""Backend tuning: the parts of gradclip_jax that exist only to steer XLA.

Nothing here changes a value. Each function below takes the plain computation of a
rule (or is the identity) and, when its workaround is switched on
(:func:`gradclip_jax.config.backend_tuning`), returns the same values through a
program that XLA compiles better on the backend it targets. With
``GRADCLIP_JAX_BACKEND_TUNING=0`` (or ``gradclip_jax.config.set_backend_tuning(False)``)
every rule runs its plain form and gives bit-identical results on CPU
(``tests/test_tuning.py``; the one GPU workaround, ``gpu_column_pairs``, sums the same
terms, in an order of XLA's choosing). Each workaround is named
(``config.WORKAROUNDS``) so that ``benchmarks/tuning_ab.py`` can time the fused CPU
step with it on and off in one run; the GPU one is compared in
``benchmarks/gpu_traffic.py``'s compiled H100 program.

Their benefit rests on XLA heuristics (a conditional that XLA cannot fold, the
order a barrier imposes): if XLA changes, results stay right and only speed can
move. A workaround is lowered only on the backend it targets
(``lax.platform_dependent``): TPU programs are the plain ones, GPU programs plain but
for ``gpu_column_pairs``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp

from gradclip_jax import config


def _on(name: str, *operands: Any) -> bool:
  """Whether workaround ``name`` applies: switched on, and ``operands`` are traced.

  The workarounds shape compiled programs. Called eagerly (concrete arrays, outside
  ``jit``) they would only add work: each ``lax.cond`` / ``platform_dependent`` over
  fresh branch functions is compiled anew on every call. Eager calls therefore run
  the plain form, which gives the same values (``tests/test_tuning.py``).
  """
  if not config.backend_tuning(name):
    return False
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(operands))


def _cpu_barrier(x: Any) -> Any:
  """``x`` through a ``lax.optimization_barrier`` on CPU, unchanged elsewhere."""
  return lax.platform_dependent(x, cpu=lax.optimization_barrier, default=lambda v: v)


# ------------------------------------------------------------------ overflow_cond


def overflow_cond(plain_sums: Callable, needs: Callable, plain_root: Callable,
                  rescue: Callable, one_pass: Callable, operands: Any) -> Any:
  """``one_pass(operands)``; on CPU the plain sums, and the rescue under a ``lax.cond``.

  Workaround ``overflow_cond`` (XLA:CPU). The plain form of a norm
  (:func:`gradclip_jax._norms.rescue_sums`) reduces every entry into the plain sum of
  squares and the two rescued sums at once and picks one: one pass over the data on
  GPU and TPU, but three sums' arithmetic (and, on XLA:CPU, three loops) on CPU. There
  only ``sums = plain_sums(operands)`` run on every step; ``rescue(operands, sums)``
  (a second pass with the one factor each sum needs) runs under a ``lax.cond`` taken
  only when ``needs(sums)``, and the norms are ``plain_root(sums)`` otherwise. Both
  forms must give the same bits. Off CPU a conditional would hand its predicate back
  to the host (an H100 ran the f32 clip + adam step at 1.39x adam alone with the
  conditional, 1.28-1.32x without).
  """
  if not _on("overflow_cond", operands):
    return one_pass(operands)

  def cpu(ops):
    sums = plain_sums(ops)
    return lax.cond(needs(sums), rescue, lambda ops, sums: plain_root(sums), ops, sums)

  return lax.platform_dependent(operands, cpu=cpu, default=one_pass)


# -------------------------------------------------------------- gpu_column_pairs


def gpu_column_pairs(terms: list, axes: tuple, plain: Callable) -> list:
  """``plain(terms)``: a sum of each term; on GPU the first two as one complex sum.

  Workaround ``gpu_column_pairs`` (XLA:GPU), for the norms' sums over axes that keep
  a leaf's minor (last) axis: AGC's units, ``clip_by_norm(axes=0)``. The plain form
  sums the plain and the two rescued terms of :func:`gradclip_jax._norms.rescue_sums`
  separately; XLA:TPU fuses the three sibling reductions into one pass, XLA:GPU does
  not for a column reduction (nor for one variadic ``reduce``, which it wrote to
  memory term by term). A complex64 column sum is one kernel, so on GPU the plain
  and the overflow sum are the real and imaginary parts of one complex sum
  (``benchmarks/gpu_traffic.py``, same run: the f32 AGC + adam step moves 1.74x adam
  alone's bytes with it, 1.90x without). Off GPU the plain form runs. The sums are of
  the same terms; only XLA's order of summation can differ.
  """
  if not _on("gpu_column_pairs", terms):
    return plain(terms)

  def gpu(terms):
    s, over = terms[0], terms[1]
    z = jnp.sum(lax.complex(s.astype(over.dtype), over), axis=axes)
    return [jnp.real(z).astype(s.dtype), jnp.imag(z)] + [
        jnp.sum(t, axis=axes) for t in terms[2:]]

  return lax.platform_dependent(terms, cuda=gpu, rocm=gpu, default=plain)


# ------------------------------------------------------------------ scale_barrier


def _low_precision(x) -> bool:
  """Whether ``x`` is accumulated in a wider dtype than its own (float16, bfloat16)."""
  dtype = jnp.dtype(x.dtype)
  return jnp.promote_types(dtype, jnp.float32) != dtype


def scale_barrier(scales: list, leaves: list) -> tuple:
  """``(scales, leaves)``, through one ``lax.optimization_barrier`` when tuned.

  Workaround ``scale_barrier`` (XLA:CPU), for trees with float16/bfloat16 leaves.
  Without it XLA:CPU fused the final multiply with the reductions that produced the
  scales and materialised a float32 copy of every low-precision leaf for the norm
  (``benchmarks/tuning_ab.py``: the bfloat16 25M clip_by_global_norm + adam step 23%
  slower without it). A tree of float32/float64 leaves only gets slower behind the
  barrier (-5% in the same run), so it passes as is. The barrier only orders the
  computation; the values pass unchanged.
  """
  if not _on("scale_barrier", scales, leaves) or not any(_low_precision(x) for x in leaves):
    return scales, leaves
  return tuple(_cpu_barrier((scales, leaves)))


# --------------------------------------------------------------- unit_scales_once


def never(leaf: jax.Array) -> jax.Array:
  """A run-time False that XLA cannot fold: one entry's bit count exceeds its width."""
  x = jnp.real(leaf.reshape(-1)[0])
  bits = x.dtype.itemsize * 8
  word = lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))
  return lax.population_count(word) > bits


def unit_scales_once(values: Sequence[jax.Array]) -> list:
  """``values`` unchanged; on CPU the non-scalar ones are computed into buffers first.

  Workaround ``unit_scales_once`` (XLA:CPU). XLA fuses the elementwise chain that
  turns norms into scales (the compares and selects of ``clip_scale``) into every
  consumer. A scalar chain is hoisted out of the consumer's loop, but a per-unit scale
  vector (AGC, ``clip_by_norm`` with ``axes``) was recomputed for every entry of its
  leaf, in each of Adam's moment kernels. The outputs of a conditional are buffers,
  so the non-scalar values go through one ``lax.cond`` whose predicate is
  :func:`never` (False at run time, and XLA cannot fold it); its other branch, never
  taken, would return NaN. One conditional serves every leaf.
  """
  values = list(values)
  picked = [i for i, v in enumerate(values) if jnp.size(v) > 1]
  if not picked or not _on("unit_scales_once", values):
    return values

  def cpu(vs):
    return lax.cond(never(vs[0]), lambda v: [jnp.full_like(x, jnp.nan) for x in v],
                    lambda v: list(v), vs)

  done = lax.platform_dependent([values[i] for i in picked], cpu=cpu,
                                default=lambda vs: list(vs))
  for i, v in zip(picked, done):
    values[i] = v
  return values


# -------------------------------------------------------------- value_clip_tested


def value_clip(leaves: list, bounds: list, plain: Callable) -> tuple:
  """``plain(leaves, bounds)``; on CPU the in-range test form (same values).

  Workaround ``value_clip_tested`` (XLA:CPU). The plain form of ``clip_by_value`` is
  ``jnp.clip`` and, as the hit flag, ``any`` of the elementwise range test. On CPU
  each leaf is instead tested for an entry outside ``[a, b]`` from its max and min,
  and the output selected on that test: the in-place write then depends on the
  reductions, so XLA:CPU needs no defensive copy of a donated gradient. A NaN entry
  makes the max and min NaN, so the test fails, the leaf goes through ``jnp.clip``
  and the step counts as a hit, as in the plain form.
  """
  if not _on("value_clip_tested", leaves, bounds):
    return plain(leaves, bounds)

  def cpu(leaves, bounds):
    out, hits = [], []
    for g, (a, b) in zip(leaves, bounds):
      in_range = ((jnp.max(g, initial=-jnp.inf) <= b)
                  & (jnp.min(g, initial=jnp.inf) >= a))
      out.append(jnp.where(in_range, g, jnp.clip(g, a, b)))
      hits.append(~in_range)
    return out, hits

  return lax.platform_dependent(leaves, bounds, cpu=cpu, default=plain)


# -------------------------------------------------- agc_weights_apart / skip_norm


def weights_apart(w_leaves: list) -> list:
  """AGC's weights for their norms, through an optimization barrier when tuned.

  Workaround ``agc_weights_apart`` (XLA:CPU). In a training step the weights are
  also read by the parameter update; XLA:CPU's common-subexpression elimination gave
  the norm's reduction and a bfloat16 update one shared ``convert`` of every weight,
  which it wrote to memory as a float32 copy. Behind the barrier the norm fuses its
  own conversion into the reduction.
  """
  w_leaves = [jnp.asarray(w) for w in w_leaves]
  if not _on("agc_weights_apart", w_leaves):
    return w_leaves
  return list(_cpu_barrier(w_leaves))


def norm_apart(leaves: list) -> list:
  """skip_spikes' gradients for their norm, through a barrier when tuned.

  Workaround ``skip_norm_apart`` (XLA:CPU), for trees with float16/bfloat16 leaves.
  The wrapped optimizer reads the same gradients; XLA:CPU merged the norm's
  conversions with Adam's identical ones and wrote a float32 copy of every
  low-precision gradient to memory between the two. Behind the barrier the norm's
  reduction converts on its own (``benchmarks/tuning_ab.py``: 14% and 22% of the
  bfloat16 25M skip_spikes(adam) step in two runs; for float32 trees 6% and 1%, so
  they pass as is).
  """
  leaves = list(leaves)
  if not _on("skip_norm_apart", leaves) or not any(_low_precision(x) for x in leaves):
    return leaves
  return list(_cpu_barrier(leaves))


# ------------------------------------------------------------ skip_ordered_select

# State leaves of more than this many entries are ordered after the update.
ORDER_MIN_SIZE = 1 << 16


def ordered_select(skip: jax.Array, old: Any, new: Any, updates: Any) -> Any:
  """``where(skip, old, new)`` leafwise; on CPU large selects wait for the updates.

  Workaround ``skip_ordered_select`` (XLA:CPU). Selecting an optimizer's donated
  state between old and new on a run-time flag made XLA:CPU copy every state buffer
  at entry: the fusion that writes the selected state in place and the fusion that
  computes the updates both read the old state, and nothing orders them. On CPU, in
  a state subtree with the structure of ``updates`` (Adam's ``mu`` and ``nu``), each
  leaf of more than :data:`ORDER_MIN_SIZE` entries with its update's shape is
  selected on ``skip | never(update)``: the write waits for the update and overwrites
  the old buffer in place. Other state leaves (counts, small leaves) use ``skip``, and
  so do the leaves of float16/bfloat16 updates: in the same ``benchmarks/tuning_ab.py``
  run the ordering saved 40% of the float32 25M skip_spikes(adam) step but cost 24%
  of the bfloat16 one.
  """
  if not _on("skip_ordered_select", skip, old, new, updates):
    return jax.tree.map(lambda o, n: jnp.where(skip, o, n), old, new)
  treedef = jax.tree.structure(updates)
  leaves = jax.tree.leaves(updates)
  big = [u.size > ORDER_MIN_SIZE and not _low_precision(u) for u in leaves]
  nevers = iter(lax.platform_dependent(
      [u for u, b in zip(leaves, big) if b],
      cpu=lambda ls: [never(u) for u in ls],
      default=lambda ls: [jnp.zeros((), jnp.bool_) for _ in ls]))
  flags = jax.tree.unflatten(treedef, [skip | next(nevers) if b else skip for b in big])

  def select_like_updates(o, n, flag, u):
    return jnp.where(flag if o.shape == u.shape else skip, o, n)

  def select(o, n):
    if treedef.num_leaves and jax.tree.structure(o) == treedef:
      return jax.tree.map(select_like_updates, o, n, flags, updates)
    return jax.tree.map(lambda o_, n_: jnp.where(skip, o_, n_), o, n)

  return jax.tree.map(select, old, new,
                      is_leaf=lambda x: jax.tree.structure(x) == treedef)
