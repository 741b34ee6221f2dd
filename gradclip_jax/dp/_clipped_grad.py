"""``clipped_grad`` and ``ghost_coverage`` on top of the traced program and the rules."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from gradclip_jax import _norms
from gradclip_jax.dp import _per_example
from gradclip_jax.dp import _trace
from gradclip_jax.dp import _rules
from gradclip_jax.dp._rules import REGISTRY
from gradclip_jax.dp._rules import _common as cm

METHODS = ("auto", "vmap", "ghost")

#: Bytes of extra memory over a plain step (probe gradients, rule temporaries, see
#: ``extra_bytes_per_example``) that one microbatch of the ghost method may use when
#: ``microbatch_size=None``; the batch is split into the fewest equal microbatches
#: that fit (see :mod:`gradclip_jax.dp`). ``None``: ``DEFAULT_BUDGETS`` for the
#: default backend, else ``DEFAULT_BUDGETS["other"]``.
GHOST_MEMORY_BUDGET = None

#: The budget per backend when ``GHOST_MEMORY_BUDGET`` is ``None``. On CPU 32 MiB is
#: the lightest of the budgets timed, and in three runs of ``benchmarks/dp_cost.py
#: --ghost-budgets`` (32, 64, 128 MiB) none was faster on every model every time
#: (results/dp_cost-cpu-*.md, the docs' benchmarks page). The accelerator value is
#: not tuned by a measurement.
DEFAULT_BUDGETS = {"cpu": 32 * 2 ** 20, "other": 512 * 2 ** 20}


def memory_budget() -> int:
  """The ghost method's budget in bytes: ``GHOST_MEMORY_BUDGET`` as the user set it."""
  budget = getattr(sys.modules.get("gradclip_jax.dp"), "GHOST_MEMORY_BUDGET",
                   GHOST_MEMORY_BUDGET)
  if budget is None:
    budget = DEFAULT_BUDGETS.get(jax.default_backend(), DEFAULT_BUDGETS["other"])
  return budget


# ------------------------------------------------------------------------ helpers


def _batch_size(batch) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("clipped_grad needs at least one batch argument with a leading "
                     "batch axis")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(f"every leaf of the batch arguments must have the same leading "
                     f"batch axis; got leading sizes {sorted(map(str, sizes))}")
  return sizes.pop()


def _split_out(out, has_aux):
  if has_aux:
    if not (isinstance(out, tuple) and len(out) == 2):
      raise TypeError("with has_aux=True, loss_fn must return (losses, aux)")
    return out
  return out, None


def _check_losses(losses, b):
  if jnp.shape(losses) != (b,):
    raise ValueError(
        f"loss_fn must return a vector of per-example losses of shape ({b},), got "
        f"shape {jnp.shape(losses)}; do not average over the batch inside loss_fn "
        "(use normalize_by=B instead)")


def _kept(losses, mask):
  """Examples that may contribute: a finite loss, and ``mask`` where given."""
  ok = jnp.isfinite(losses)
  return ok if mask is None else ok & mask


def _masked_norms(norms, mask):
  """Padded examples (``mask`` False) report a norm of exactly 0."""
  return norms if mask is None else jnp.where(mask, norms, jnp.zeros((), norms.dtype))


def _check_mask(mask, b):
  """``mask`` as a bool ``[B]`` array (``None`` stays ``None``)."""
  if mask is None:
    return None
  shape = jnp.shape(mask)
  if shape != (b,):
    raise ValueError(f"mask must have shape ({b},) (one entry per example of the batch), "
                     f"got shape {shape}")
  dt = jnp.result_type(mask)
  if dt != jnp.bool_:
    if not (jnp.issubdtype(dt, jnp.integer) or jnp.issubdtype(dt, jnp.floating)):
      raise TypeError(f"mask must be a bool (or 0/1 numeric) array, got dtype {dt}")
    mask = jnp.asarray(mask) != 0
  return jnp.asarray(mask)


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _key_names(path) -> str:
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(str(k.name))
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(str(k.idx))
    else:
      out.append(str(k))
  return "/".join(out)


# ------------------------------------------------------------------- vmap method


def _vmap_core(loss_fn, has_aux, max_norm, params, batch, mask=None):
  """(f32 clipped sum, norms [B], finite [B]) by vmap(grad) over examples."""

  def per_ex(p, *ex):
    ex1 = jax.tree.map(lambda x: x[None], ex)
    losses, _ = _split_out(loss_fn(p, *ex1), has_aux)
    if jnp.shape(losses) != (1,):
      raise ValueError(f"loss_fn must return per-example losses of shape (B,), got "
                       f"{jnp.shape(losses)} for a batch of 1")
    return losses[0]

  in_axes = (None,) + (0,) * len(batch)
  losses, grads = jax.vmap(jax.value_and_grad(per_ex), in_axes=in_axes)(params, *batch)
  norms = _per_example.example_norms(grads)
  ok = _kept(losses, mask)
  scale, finite, _ = _per_example.clip_stats(jnp.where(ok, norms, jnp.nan), max_norm)
  summed = jax.tree.map(
      lambda g: cm.weighted_rows(g, finite, scale), grads)
  return summed, _masked_norms(norms, mask), finite


# ------------------------------------------------------------------ the structure


@dataclasses.dataclass
class Group:
  """Uses of one parameter operand W' with one rule and one merge key (positions
  concatenated)."""
  rule: Any
  uses: list
  origin: frozenset       # parameter leaves the W' depends on
  direct: bool            # W' an isometric view of distinct leaves

  @property
  def key(self):
    u0 = self.uses[0]
    return (u0.uid, u0.p_pos[0])


@dataclasses.dataclass
class Materialized:
  """Groups whose parameters' per-example gradients are formed (leaves ``leaves``).

  For parameters reached through uses of different forms that have no cross term,
  or through non-isometric parameter arithmetic: each group's per-example ``dW'``
  (its unit's ``PER_EXAMPLE`` form) is mapped to the leaves by the VJP of the
  parameter-only program, vmapped over the examples of a chunk.
  """
  units: list
  leaves: tuple


@dataclasses.dataclass
class Structure:
  units: list             # exact units, each with its chosen form
  crosses: list           # (unit_a, unit_b, fn): cross terms between exact units
  materialized: list      # Materialized
  names: dict             # leaf index -> ghost_coverage text
  all_fallback: bool      # every parameter is on the fallback rule


def choose_form(forms: dict, budget: int) -> str:
  """The form with the fewest FLOPs among those whose bytes per example let a chunk
  of ``MIN_CHUNK`` examples fit ``budget`` (else the one with the fewest bytes).

  ``forms`` maps each form a unit can take to its ``Cost`` (extra FLOPs and bytes
  per example, from the traced shapes; each rule's module documents them).
  """
  fits = {f: c for f, c in forms.items() if c.bytes * MIN_CHUNK <= budget}
  if not fits:
    return min(forms, key=lambda f: (forms[f].bytes, forms[f].flops))
  return min(fits, key=lambda f: (fits[f].flops, fits[f].bytes))


#: The fewest examples a chunk of the per-example phase should hold (see
#: :func:`choose_form`).
MIN_CHUNK = 8


def _groups(plan: _trace.Plan) -> list:
  groups = {}
  for u in plan.uses:
    key = u.rule.merge_key(u)
    key = ("use", u.uid) if key is None else (id(u.rule), key)
    if key not in groups:
      groups[key] = Group(u.rule, [], frozenset(), True)
    groups[key].uses.append(u)
  out = list(groups.values())
  for g in out:
    u = g.uses[0]
    origins = [_trace.origin_of(u, j) for j in u.p_pos]
    g.origin = frozenset().union(*origins) if origins else frozenset()
    g.direct = all(_trace.iso_of(u, j) for j in u.p_pos) and (
        sum(len(o) for o in origins) == len(g.origin))
  return out


def _components(groups) -> list:
  """Groups connected through shared parameter leaves."""
  parent = list(range(len(groups)))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  owner = {}
  for gi, g in enumerate(groups):
    for leaf in g.origin:
      if leaf in owner:
        parent[find(gi)] = find(owner[leaf])
      else:
        owner[leaf] = gi
  comps = {}
  for gi in range(len(groups)):
    comps.setdefault(find(gi), []).append(groups[gi])
  return [gs for gs in comps.values() if frozenset().union(*[g.origin for g in gs])]


def _suffix(groups, per_parameter=False) -> str:
  """`` (scan)`` and `` xN uses`` (the uses of one parameter when ``per_parameter``:
  a fused unit's groups are different parameters)."""
  uses = [u for g in groups for u in g.uses]
  out = " (scan)" if any(u.stack for u in uses) else ""
  n = max(len(g.uses) for g in groups) if per_parameter else len(uses)
  return out + (f" x{n} uses" if n > 1 else "")


def _structure(plan: _trace.Plan, budget: Optional[int] = None) -> Structure:
  """Groups, components, units and their forms (static: from the traced program)."""
  budget = memory_budget() if budget is None else budget
  b = plan.b
  free, crosses, materialized, units, names = [], [], [], [], {}
  for gs in _components(_groups(plan)):
    leaves = frozenset().union(*[g.origin for g in gs])
    if len(gs) == 1 and gs[0].direct:
      free.append(gs[0])
      continue
    exact = None
    if all(g.direct for g in gs) and len({g.origin for g in gs}) == 1:
      cu = [g.rule.unit(g) for g in gs]
      pairs = [(a, c, REGISTRY.cross(a, c)) for i, a in enumerate(cu) for c in cu[i + 1:]]
      if all(fn is not None for _, _, fn in pairs) and all(
          _rules.NORM in u.forms(b) for u in cu):
        exact = cu, pairs
    if exact is not None:
      cu, pairs = exact
      for u in cu:
        u.form = _rules.NORM
      units.extend(cu)
      crosses.extend(pairs)
      text = (" + ".join(u.describe(_rules.NORM) for u in cu) + _suffix(gs)
              + " [cross terms]")
    else:
      mu = [g.rule.unit(g) for g in gs]
      materialized.append(Materialized(mu, tuple(sorted(leaves))))
      first = next((g for g in gs if _rules.NORM not in g.rule.unit(g).forms(b)), gs[0])
      text = first.rule.name(first.uses[0]) + _suffix(gs)
    for leaf in leaves:
      names[leaf] = text
  by_rule = {}
  for g in free:
    by_rule.setdefault(id(g.rule), (g.rule, []))[1].append(g)
  for rule, gs in by_rule.values():
    for unit in rule.units(gs):
      unit.form = choose_form(unit.forms(b), budget)
      units.append(unit)
      text = unit.describe(unit.form) + _suffix(unit.groups, True) + unit.suffix()
      for g in unit.groups:
        for leaf in g.origin:
          names[leaf] = text
  all_fb = all(g.rule is REGISTRY.fallback for g in _groups(plan))
  return Structure(units, crosses, materialized, names, all_fb)


def _plan(loss_fn, has_aux, params, batch):
  b = _batch_size(batch)

  def fn(p, *bt):
    losses, aux = _split_out(loss_fn(p, *bt), has_aux)
    _check_losses(losses, _batch_size(bt))
    return losses, aux

  return _trace.analyse(fn, params, batch, b, REGISTRY), b


# ------------------------------------------------------------------ memory policy


def _nbytes(aval, steps=1) -> int:
  return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize * steps


def probe_bytes_per_example(plan) -> int:
  """Bytes per example of the probe gradients (stacked over the steps of scans)."""
  total = 0
  for p in plan.top.probe_avals.values():
    total += _nbytes(p.aval, int(np.prod(p.stack, dtype=np.int64)) if p.stack else 1)
  return total // plan.b


def chunk_bytes_per_example(plan, st: Structure) -> int:
  """Bytes per example held at once in a chunk of the norm phase: the per-example
  gradients kept for reuse, the largest norm-form temporary, and the per-example
  gradients of the materialized parameters."""
  b = plan.b
  keep = sum(u.forms(b)[_rules.PER_EXAMPLE].bytes for u in st.units
             if u.form == _rules.PER_EXAMPLE)
  temp = max([u.forms(b)[_rules.NORM].bytes for u in st.units if u.form == _rules.NORM]
             or [0])
  for m in st.materialized:
    keep += sum(u.forms(b)[_rules.PER_EXAMPLE].bytes for u in m.units)
    keep += 4 * sum(int(np.prod(plan.param_avals[i].shape, dtype=np.int64))
                    for i in m.leaves)
  return keep + temp


def extra_bytes_per_example(plan, st: Structure) -> int:
  """Estimated extra bytes per example of the ghost method over a plain step."""
  return probe_bytes_per_example(plan) + chunk_bytes_per_example(plan, st)


def _largest_divisor(n: int, per: int, budget: int) -> int:
  per = max(per, 1)
  for m in range(n, 0, -1):
    if n % m == 0 and m * per <= budget:
      return m
  return 1


def auto_microbatch(plan, st: Structure, budget=None) -> int:
  """Examples per pass of the model: the largest divisor ``m`` of ``B`` whose probe
  gradients fit the budget (``m * probe_bytes_per_example <= budget``)."""
  budget = memory_budget() if budget is None else budget
  return _largest_divisor(plan.b, probe_bytes_per_example(plan), budget)


def chunk_size(plan, st: Structure, budget=None) -> int:
  """Examples per chunk of the norm phase: the largest divisor of ``B`` whose
  per-example temporaries fit the budget."""
  budget = memory_budget() if budget is None else budget
  return _largest_divisor(plan.b, chunk_bytes_per_example(plan, st), budget)


# ------------------------------------------------------------------ ghost method


def _wide_vjp(vjp_fn, cts, dtypes):
  """``vjp_fn`` applied to float32-or-wider cotangents of values of ``dtypes``.

  A VJP takes cotangents in its outputs' dtypes; for a parameter stored in float32
  and read in bfloat16/float16 that would round the clipped sum to 16 bits before it
  reaches the parameter. The map is linear, so the cotangent is split into three
  parts exact in the narrow dtype (after a power-of-two scale that keeps float16 in
  range), each mapped, and the results added in the parameters' dtypes.
  """
  narrow = [jnp.finfo(d).bits < jnp.finfo(c.dtype).bits
            if jnp.issubdtype(d, jnp.floating) and jnp.issubdtype(c.dtype, jnp.floating)
            else False for c, d in zip(cts, dtypes)]
  if not any(narrow):
    return vjp_fn([c.astype(d) for c, d in zip(cts, dtypes)])
  wide = vjp_fn([jnp.zeros(c.shape, d) if n else c.astype(d)
                 for c, d, n in zip(cts, dtypes, narrow)])
  peak = jnp.max(jnp.stack([jnp.max(jnp.abs(c)) for c, n in zip(cts, narrow) if n]))
  scale = jnp.exp2(jnp.ceil(jnp.log2(jnp.where(peak > 0, peak, 1.0))))
  rest = [c / scale.astype(c.dtype) if n else None for c, n in zip(cts, narrow)]
  out = wide
  for _ in range(3):
    part = [r.astype(d) if n else jnp.zeros(c.shape, d)
            for r, c, d, n in zip(rest, cts, dtypes, narrow)]
    got = vjp_fn(part)
    out = jax.tree.map(lambda o, x: o + (x * scale.astype(x.dtype)).astype(o.dtype),
                       out, got)
    rest = [r - p.astype(r.dtype) if n else None for r, p, n in zip(rest, part, narrow)]
  return out


def _chunks(tree, n):
  """Every leaf ``[B, ...]`` -> ``[n, B / n, ...]``."""
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), tree)


def _ghost_core(loss_fn, has_aux, max_norm, params, batch, auto=False, plan=None,
                mask=None):
  """(clipped sum, norms [B], finite [B], aux) of one batch by ghost norms."""
  if plan is None:
    plan, _ = _plan(loss_fn, has_aux, params, batch)
  b = plan.b
  budget = memory_budget()
  st = _structure(plan, budget)
  if auto and st.all_fallback:
    raise _trace.Unsupported("no parameter gets an exact ghost rule")
  p_flat, p_tree = jax.tree.flatten(params)
  b_flat = jax.tree.leaves(batch)
  probes = {k: jnp.zeros(s.shape, s.dtype) for k, s in _trace.probe_shapes(plan).items()}

  def probe_fn(pr):
    outs, recs = _trace.run_probes(plan, p_flat, b_flat, pr)
    return outs[0], (recs, outs)

  # ONE backward pass, for the probes (output gradients) only: the parameters are
  # constants here, so no weight gradient is formed.
  losses, vjp_fn, (records, outs) = jax.vjp(probe_fn, probes, has_aux=True)
  (g_probe,) = vjp_fn(jnp.ones((b,), losses.dtype))
  aux = jax.tree.unflatten(plan.out_tree, outs)[1]
  views = _trace.run_views(plan, p_flat)

  def group_canon(g):
    parts = []
    for u in g.uses:
      recs = {j: records[u.rec_key[j]] for j in u.rec_pos if u.rec_key[j] in records}
      gs = {k: g_probe[u.probe_key[k]] for k in u.probe_pos}
      parts.append(u.rule.canon(u, recs, gs, views, b))
    return g.rule.concat(parts)

  def unit_canon(unit):
    return unit.canon([group_canon(g) for g in unit.groups])

  units = st.units
  canons = [unit_canon(u) for u in units]
  mats = [[unit_canon(u) for u in m.units] for m in st.materialized]
  cross_idx = [(units.index(a), units.index(c), fn) for a, c, fn in st.crosses]
  ok = _kept(losses, mask)

  # Per-example gradients of the materialized parameters: the VJP of the
  # parameter-only program from each group's dW' to the leaves.
  mat_vjps = []
  for m in st.materialized:
    keys = [k for u in m.units for k in _unit_keys(u)]
    leaves = list(m.leaves)

    def sub_views(sub, leaves=leaves, keys=keys):
      full = list(p_flat)
      for i, x in zip(leaves, sub):
        full[i] = x
      vw = _trace.run_views(plan, full)
      return [vw[k] for k in keys]

    _, cvjp = jax.vjp(sub_views, [p_flat[i] for i in leaves])
    mat_vjps.append((cvjp, keys, [jnp.result_type(views[k]) for k in keys]))

  def norm_phase(cs, ms, okc):
    """Norms, clip weights and the reused sums of one chunk of examples."""
    sq = jnp.zeros(okc.shape, jnp.float32)
    raws = {}
    for i, (u, c) in enumerate(zip(units, cs)):
      if u.form == _rules.NORM:
        sq = sq + u.sq(c)
      else:
        raws[i] = u.per_example(c)
        sq = sq + sum(cm.per_example_sq(x) for x in jax.tree.leaves(raws[i]))
    for ia, ic, fn in cross_idx:
      sq = sq + 2.0 * fn(cs[ia], cs[ic])
    per_leaf = []
    for m, mc, (cvjp, keys, dts) in zip(st.materialized, ms, mat_vjps):
      pe_w = {}
      for u, c in zip(m.units, mc):
        pe_w.update(jax.vmap(u.split)(u.per_example(c)))
      x = jax.vmap(lambda cts: _wide_vjp(lambda ct: cvjp(ct)[0], cts, dts))(
          [pe_w[k] for k in keys])
      per_leaf.append(x)
      sq = sq + sum(cm.per_example_sq(v) for v in x)
    norms = jnp.sqrt(sq)
    scale, finite, _ = _per_example.clip_stats(jnp.where(okc, norms, jnp.nan), max_norm)
    w = jnp.where(finite, scale, jnp.zeros((), scale.dtype))
    sums = {i: jax.tree.map(lambda x: cm.weighted_rows(x, finite, w), r)
            for i, r in raws.items()}
    leaf_sums = [[cm.weighted_rows(v, finite, w) for v in x] for x in per_leaf]
    return norms, w, finite, sums, leaf_sums

  n_chunks = b // chunk_size(plan, st, budget)
  ex = [c.ex for c in canons]
  mex = [[c.ex for c in mc] for mc in mats]

  def with_ex(cs, exs):
    return [c._replace(ex=e) for c, e in zip(cs, exs)]

  if n_chunks == 1:
    norms, w, finite, sums, leaf_sums = norm_phase(canons, mats, ok)
  else:
    def body(acc, xs):
      e, me, okc = xs
      nrm, wc, fin, s, ls = norm_phase(with_ex(canons, e),
                                       [with_ex(mc, x) for mc, x in zip(mats, me)], okc)
      acc = jax.tree.map(jnp.add, acc, (s, ls))
      return acc, (nrm, wc, fin)

    zeros = jax.eval_shape(lambda: norm_phase(
        with_ex(canons, _first(ex, n_chunks)),
        [with_ex(mc, _first(x, n_chunks)) for mc, x in zip(mats, mex)],
        ok[:b // n_chunks])[3:])
    acc0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    (sums, leaf_sums), (norms, w, finite) = lax.scan(
        body, acc0, (_chunks(ex, n_chunks), _chunks(mex, n_chunks),
                     ok.reshape(n_chunks, -1)))
    norms, w, finite = norms.reshape(b), w.reshape(b), finite.reshape(b)

  # The clipped sum: per unit sum_b w_b dW'_b in W' layout (the norm form from the
  # records, the per-example form from the sums above), mapped to the parameter
  # leaves by one VJP of the parameter-only part of the program.
  weighted = {}
  for i, (u, c) in enumerate(zip(units, canons)):
    if u.form == _rules.NORM:
      weighted.update(u.weighted(c, w, finite))
    else:
      weighted.update(u.split(sums[i]))
  total = [jnp.zeros(jnp.shape(x), cm.f32(x).dtype) if _is_float(x)
           else jnp.zeros(jnp.shape(x), jnp.float32) for x in p_flat]
  float_idx = [i for i, x in enumerate(p_flat) if _is_float(x)]
  if weighted:
    keys = list(weighted)

    def dviews(sub):
      full = list(p_flat)
      for i, x in zip(float_idx, sub):
        full[i] = x
      vw = _trace.run_views(plan, full)
      return [vw[k] for k in keys]

    _, dvjp = jax.vjp(dviews, [p_flat[i] for i in float_idx])
    grads = _wide_vjp(lambda ct: dvjp(ct)[0], [weighted[k] for k in keys],
                      [jnp.result_type(views[k]) for k in keys])
    for i, gr in zip(float_idx, grads):
      total[i] = total[i] + cm.f32(gr)
  for m, ls in zip(st.materialized, leaf_sums):
    for i, x in zip(m.leaves, ls):
      total[i] = total[i] + x.astype(total[i].dtype)
  return jax.tree.unflatten(p_tree, total), _masked_norms(norms, mask), finite, aux


def _first(tree, n):
  return jax.tree.map(lambda x: x[:x.shape[0] // n], tree)


def _unit_keys(unit) -> list:
  """The ``(uid, j)`` keys of the W' a unit's ``split`` returns, in a fixed order."""
  keys = []
  for g in unit.groups:
    u0 = g.uses[0]
    keys.extend((u0.uid, j) for j in u0.p_pos)
  return keys


def ghost_coverage(loss_fn: Callable[..., Any], params: Any, *batch: Any,
                   has_aux: bool = False) -> dict:
  """Which ghost rule each float parameter leaf gets (traced abstractly, no FLOPs).

  Returns ``{"path/of/leaf": rule}`` for every floating-point leaf of ``params``
  (path components joined by ``/``). ``rule`` is one of

  * ``"dot_general: gram"`` or ``"dot_general: per-example, reused"`` (the form the
    use takes, see :mod:`gradclip_jax.dp`), ``"gather"``, ``"elementwise"``,
    ``"conv_general_dilated"``: an exact rule;
  * ``"fallback: <primitive>"``: the per-example gradient of that one operation
    (e.g. ``"fallback: custom_vjp_call"``);
  * ``"unused"``: the losses do not depend on the leaf (its gradient is zero);

  followed by ``" (scan)"`` when a use sits inside a ``scan`` (its positions include
  the steps), ``" xN uses"`` when ``N > 1`` operations read the leaf (through the
  same operand, or sharing leaves with other operands), and ``" [fused: N parameters
  on shared operands]"`` when its ``dot_general`` shares one product with other
  parameters' (the same data operand, or the same output gradients). Leaves whose
  uses share parameters with a use of another form get exact per-example gradients
  of those leaves, named after the first use of a per-operation rule (else the first
  use) in program order; a table read by ``gather`` and by ``dot_general`` (tied
  embeddings) keeps both exact rules with their cross term (``"gather +
  dot_general: gram x2 uses [cross terms]"``).

  Raises the errors ``clipped_grad(method="ghost")`` raises (e.g. a ``ValueError``
  for an operation that combines examples, such as BatchNorm with batch statistics).

  Examples:
    >>> import jax.numpy as jnp
    >>> from gradclip_jax import dp
    >>> def loss_fn(p, x, y):
    ...   return (jnp.tanh(x @ p["w"] + p["b"]) @ p["v"] - y) ** 2
    >>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4), "v": jnp.ones(4)}
    >>> cov = dp.ghost_coverage(loss_fn, params, jnp.ones((8, 3)), jnp.zeros(8))
    >>> for k, v in sorted(cov.items()):
    ...   print(k, v)
    b elementwise
    v dot_general: gram
    w dot_general: gram
  """
  plan, _ = _plan(loss_fn, has_aux, params, batch)
  names = _structure(plan).names
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  out = {}
  for i, (path, leaf) in enumerate(flat):
    if _is_float(leaf):
      out[_key_names(path)] = names.get(i, "unused")
  return out


# ------------------------------------------------------------------ public entry


def clipped_grad(loss_fn: Callable[..., Any], *, max_norm: Any, method: str = "auto",
                 normalize_by: Optional[Any] = None,
                 microbatch_size: Optional[int] = None, has_aux: bool = False,
                 return_norms: bool = False) -> Callable[..., Any]:
  r"""Builds ``(params, *batch) -> sum_b min(1, C / n_b) grad(loss_b) [/ normalize_by]``.

  ``loss_fn(params, *batch)`` must return the vector of ``B`` per-example losses
  (``(losses, aux)`` with ``has_aux``); every leaf of every batch argument has the
  batch axis first. ``n_b = ||grad_params loss_b||_2`` is example ``b``'s gradient
  norm over all parameters and ``C = max_norm`` (Abadi et al. 2016). See
  :mod:`gradclip_jax.dp` for the loss convention, the methods and the ghost rules.

  Returns a function giving ``grads`` (each leaf in its parameter's dtype,
  accumulated in float32), then ``norms`` (``[B]`` float32 per-example norms before
  clipping; NaN/inf for a non-finite example, which contributes zero) if
  ``return_norms``, then ``aux`` if ``has_aux`` (stacked along a new leading axis,
  one per microbatch, when ``microbatch_size`` splits the batch; when the ghost
  method's memory policy splits it, per-example aux leaves ``[m, ...]`` come back as
  ``[B, ...]`` and only the others are stacked). A single value is
  returned bare, several as a tuple: ``grads``, ``(grads, norms)``, ``(grads, aux)``
  or ``(grads, norms, aux)``.

  The function also takes ``mask=`` (keyword), a bool ``[B]`` marking the real
  examples of a padded batch (e.g. a Poisson-sampled batch padded to a fixed
  capacity): an example with ``mask[b] = False`` contributes exactly zero to the sum
  and its norm comes back as ``0``, whatever its loss (NaN included), so the result
  equals that of the batch without the padded rows. ``aux`` is returned for every
  row, padded ones included.

  Args:
    loss_fn: per-example loss function ``(params, *batch) -> [B]``.
    max_norm: clip threshold ``C >= 0``; ``inf`` disables clipping.
    method: ``"vmap"`` (reference: per-example gradients), ``"ghost"`` (ghost norms
      on the traced program), or ``"auto"`` (ghost when the program can be traced and
      at least one parameter gets an exact rule, else vmap).
    normalize_by: divide the clipped sum by this (e.g. the expected batch size).
    microbatch_size: process the batch in microbatches of this size (``B`` must be
      a multiple), accumulating in float32 (``lax.scan``); bounds peak memory.
    has_aux: ``loss_fn`` returns ``(losses, aux)``.
    return_norms: also return the per-example norms.

  Returns:
    The function described above.

  Raises:
    ValueError: for a negative or NaN ``max_norm``, an unknown ``method``, a bad
      ``microbatch_size``, losses that are not ``[B]``, a ``mask`` that is not
      ``[B]``, or (ghost) an operation that combines examples. TypeError: ``has_aux`` without a ``(losses, aux)`` pair.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from gradclip_jax import dp
    >>> def loss_fn(w, x, y):
    ...   return (x @ w - y) ** 2
    >>> w = jnp.array([1.0, -1.0])
    >>> x = jnp.array([[3.0, 0.0], [0.0, 0.1]])
    >>> y = jnp.zeros(2)
    >>> g, norms = dp.clipped_grad(loss_fn, max_norm=1.0, method="ghost",
    ...                            return_norms=True)(w, x, y)
    >>> print(norms)  # |2 (x_b . w - y_b)| ||x_b||
    [18.    0.02]
    >>> print(g)  # [18, 0] scaled to norm 1, plus [0, -0.02] kept
    [ 1.   -0.02]
  """
  _norms.check_threshold("max_norm", max_norm)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if microbatch_size is not None and (not isinstance(microbatch_size, int)
                                      or isinstance(microbatch_size, bool)
                                      or microbatch_size < 1):
    raise ValueError(f"microbatch_size must be a positive int, got {microbatch_size!r}")

  def vmap_core(params, batch, mask):
    summed, norms, _ = _vmap_core(loss_fn, has_aux, max_norm, params, batch, mask)
    aux = _split_out(loss_fn(params, *batch), True)[1] if has_aux else None
    return summed, norms, aux

  def core(params, batch, mask, plan=None, use_vmap=False):
    if method == "vmap" or use_vmap:
      return vmap_core(params, batch, mask)
    if method == "auto":
      try:
        summed, norms, _, aux = _ghost_core(loss_fn, has_aux, max_norm, params, batch,
                                            auto=True, plan=plan, mask=mask)
      except _trace.Unsupported:
        return vmap_core(params, batch, mask)
      return summed, norms, aux
    summed, norms, _, aux = _ghost_core(loss_fn, has_aux, max_norm, params, batch,
                                        plan=plan, mask=mask)
    return summed, norms, aux

  def fn(params, *batch, mask=None):
    if not batch:
      raise TypeError("clipped_grad: call as fn(params, *batch) with at least one "
                      "batch argument")
    b = _batch_size(batch)
    mask = _check_mask(mask, b)
    m = microbatch_size
    plan, use_vmap = None, False
    if m is None and method != "vmap":
      try:
        plan, _ = _plan(loss_fn, has_aux, params, batch)
      except _trace.Unsupported:
        if method == "ghost":
          raise
        use_vmap = True
      if plan is not None:
        m = auto_microbatch(plan, _structure(plan))
        if m < b:
          plan = None  # the microbatches are traced at their own size
    if m is None or m >= b:
      summed, norms, aux = core(params, batch, mask, plan, use_vmap)
    else:
      if b % m:
        raise ValueError(f"batch size {b} is not a multiple of microbatch_size {m}")
      n = b // m
      mbs = jax.tree.map(lambda x: x.reshape((n, m) + x.shape[1:]), batch)
      mms = None if mask is None else mask.reshape(n, m)
      zero = jax.tree.map(lambda p: jnp.zeros(p.shape, cm.f32(p).dtype) if _is_float(p)
                          else jnp.zeros(jnp.shape(p), jnp.float32), params)

      def body(acc, xs):
        mb, mm = xs
        s, nrm, ax = core(params, mb, mm, None, use_vmap)
        acc = jax.tree.map(lambda a, x: a + x, acc, s)
        return acc, (nrm, ax)

      summed, (norms, aux) = lax.scan(body, zero, (mbs, mms))
      norms = norms.reshape(b)
      if microbatch_size is None and aux is not None:
        # Microbatches chosen by the memory policy: per-example aux leaves come back
        # as [B, ...] as without microbatching; other leaves stay stacked [n, ...].
        aux = jax.tree.map(lambda x: x.reshape((b,) + x.shape[2:])
                           if x.ndim >= 2 and x.shape[1] == m else x, aux)
    if normalize_by is not None:
      summed = jax.tree.map(lambda g: g / jnp.asarray(normalize_by, jnp.float32), summed)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype) if _is_float(p) else g,
                         summed, params)
    out = (grads,)
    if return_norms:
      out += (norms,)
    if has_aux:
      out += (aux,)
    return out[0] if len(out) == 1 else out

  return fn
