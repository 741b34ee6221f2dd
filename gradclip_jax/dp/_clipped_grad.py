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
from gradclip_jax.dp._rules import RULES
from gradclip_jax.dp._rules import _common as cm
from gradclip_jax.dp._rules import dot_general as dot_rule

METHODS = ("auto", "vmap", "ghost")

#: Bytes of extra memory over a plain step (probe gradients, rule temporaries, see
#: ``extra_bytes_per_example``) that one microbatch of the ghost method may use when
#: ``microbatch_size=None``; the batch is split into the fewest equal microbatches
#: that fit (see :mod:`gradclip_jax.dp`). ``None``: ``DEFAULT_BUDGETS`` for the
#: default backend, else ``DEFAULT_BUDGETS["other"]``.
GHOST_MEMORY_BUDGET = None

#: The budget per backend when ``GHOST_MEMORY_BUDGET`` is ``None``. On CPU smaller
#: microbatches were lighter and mostly faster: the same-run A/B of
#: ``benchmarks/dp_cost.py --ghost-budgets 512`` (results/dp_cost-cpu-*.md, 2-core CPU,
#: B = 256) gave ghost/plain step time 1.22x vs 1.11x (linen LSTMCell), 1.25x vs 2.36x
#: (OptimizedLSTMCell), 0.66x vs 0.92x (nnx transformer) at 128 vs 512 MiB, and peak
#: RSS 0.87x vs 1.43x, 0.75x vs 1.27x, 0.59x vs 0.92x. The accelerator value is the
#: former default, not tuned by a measurement.
DEFAULT_BUDGETS = {"cpu": 128 * 2 ** 20, "other": 512 * 2 ** 20}


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
      lambda g: jnp.sum(cm.mask_rows(g, finite, scale), axis=0), grads)
  return summed, _masked_norms(norms, mask), finite


# --------------------------------------------------------- groups and components


@dataclasses.dataclass
class _Group:
  """Uses of one parameter operand W' with the same form (positions concatenated)."""
  rule: Any
  uses: list
  ws: list                # operand positions j of the first use (its W'_j)
  origin: frozenset       # parameter leaves the W' depend on
  direct: bool            # every W'_j an isometric view of distinct leaves


@dataclasses.dataclass
class _Component:
  groups: list
  leaves: frozenset
  direct: bool            # one group, isometric: the rule's own norm is the leaves' norm
  name: str
  tied: Any = None        # (gather group, dot group, rows_are_free): exact cross term
  block: Any = None       # the _Block of fused dot_general uses it belongs to


@dataclasses.dataclass
class _Block:
  """``dot_general`` groups of different parameters that share their operands.

  ``rows[r][c]`` is a group: every group of row ``r`` reads the same data rows ``a``
  and every group of column ``c`` has the same output gradients ``g``, so the whole
  block is one product ``[K_1 + ..., N_1 + ...]`` per example (see
  :mod:`gradclip_jax.dp._rules.dot_general`).
  """
  rows: list
  comps: list


def _structure(plan: _trace.Plan):
  groups = {}
  for u in plan.uses:
    key = u.rule.merge_key(u)
    key = ("use", u.uid) if key is None else key
    if key not in groups:
      groups[key] = _Group(u.rule, [], list(u.p_pos), frozenset(), True)
    groups[key].uses.append(u)
  groups = list(groups.values())
  for g in groups:
    u = g.uses[0]
    origins = [_trace.origin_of(u, j) for j in g.ws]
    g.origin = frozenset().union(*origins) if origins else frozenset()
    g.direct = all(_trace.iso_of(u, j) for j in g.ws) and (
        sum(len(o) for o in origins) == len(g.origin))
  # Components: groups connected through shared parameter leaves.
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
  out = []
  for gs in comps.values():
    leaves = frozenset().union(*[g.origin for g in gs])
    if not leaves:
      continue
    uses = [u for g in gs for u in g.uses]
    fb = [g for g in gs if g.rule.family == "fallback"]
    name = fb[0].rule.name(fb[0].uses[0]) if fb else gs[0].rule.name(gs[0].uses[0])
    if any(u.stack for u in uses):
      name += " (scan)"
    if len(uses) > 1:
      name += f" x{len(uses)} uses"
    comp = _Component(gs, leaves, len(gs) == 1 and gs[0].direct, name)
    comp.tied = _tied_pair(gs)
    if comp.tied is not None:
      comp.direct = True
    out.append(comp)
  _fuse(out)
  return out


def _fuse(comps):
  """Sets ``comp.block`` for the direct dot_general groups that share operands.

  Groups with the same data rows (``dot_rule.row_key`` of each use) form a row, their
  output gradients side by side; rows whose columns have the same output gradients
  (``dot_rule.col_key``), in the same order, stack along ``K``.
  """
  rows = {}
  for c in comps:
    if not (c.direct and c.tied is None and len(c.groups) == 1):
      continue
    g = c.groups[0]
    if g.rule.family != "dot_general" or not all(dot_rule.fusable(u) for u in g.uses):
      continue
    rk = tuple(dot_rule.row_key(u) for u in g.uses)
    ck = tuple(dot_rule.col_key(u) for u in g.uses)
    rows.setdefault(rk, []).append((ck, c))
  blocks = {}
  for members in rows.values():
    members.sort(key=lambda m: repr(m[0]))
    cols = tuple(repr(ck) for ck, _ in members)
    blocks.setdefault(cols, []).append([c for _, c in members])
  for rws in blocks.values():
    n = sum(len(r) for r in rws)
    if n < 2:
      continue
    blk = _Block(rows=[[c.groups[0] for c in r] for r in rws],
                 comps=[c for r in rws for c in r])
    for c in blk.comps:
      c.block = blk
      c.name += f" [fused: {n} parameters on shared operands]"


def _tied_pair(gs):
  """(gather group, dot group, rows_are_free) for a table read by both, else None.

  A 2-D table ``E [V, D]`` looked up by ``gather`` and multiplied by ``dot_general``
  (``h @ E.T``, tied input/output embeddings): the per-example gradient is the sum of
  the two uses' gradients, and its squared norm is ``|G_gather|^2 + |G_dot|^2 + 2
  <G_gather, G_dot>``, the cross term computed on the looked-up rows only.
  """
  if len(gs) != 2 or not all(g.direct for g in gs):
    return None
  fam = {g.rule.family: g for g in gs}
  if set(fam) != {"gather", "dot_general"}:
    return None
  ga, dg = fam["gather"], fam["dot_general"]
  if ga.origin != dg.origin or len(ga.origin) != 1:
    return None
  ug, ud = ga.uses[0], dg.uses[0]
  gi, di = ug.in_info[0], ud.in_info[ud.data["wpos"]]
  if (gi.perm != (0, 1) or di.perm is None or len(di.perm) != 2 or ud.data["H"] != 1
      or gi.wstack or di.wstack):
    return None
  wpos = ud.data["wpos"]
  row = di.perm.index(0)  # W' dim holding the table's rows
  (lc, rc), _ = ud.eqn.params["dimension_numbers"]
  wc = list(rc if wpos == 1 else lc)
  if wc == [row]:
    return ga, dg, False
  if wc == [1 - row]:
    return ga, dg, True
  return None


def _tied_cross(cg, cd, rows_are_free):
  """<G_gather_b, G_dot_b> per example (see ``_tied_pair``)."""
  ids, g1 = cg["ids"], cg["g"]                    # [B, P], [B, P, D]
  a, g = cm.f32(cd["a"][:, 0]), cm.f32(cd["g"][:, 0])  # [B, T, K], [B, T, N]
  if rows_are_free:  # dW'_b[v] = sum_t g_t[v] a_t: a_t are D-vectors
    m = jnp.einsum("bpd,btd->bpt", g1, a, precision=cm.HI)
    sel = jnp.take_along_axis(g, ids[:, None, :], axis=2)  # [B, T, P]
  else:              # dW'_b[v] = sum_t a_t[v] g_t: g_t are D-vectors
    m = jnp.einsum("bpd,btd->bpt", g1, g, precision=cm.HI)
    sel = jnp.take_along_axis(a, ids[:, None, :], axis=2)
  return jnp.einsum("bpt,btp->b", m, sel, precision=cm.HI)


def _plan(loss_fn, has_aux, params, batch):
  b = _batch_size(batch)

  def fn(p, *bt):
    losses, aux = _split_out(loss_fn(p, *bt), has_aux)
    _check_losses(losses, _batch_size(bt))
    return losses, aux

  return _trace.analyse(fn, params, batch, b, RULES), b


def _coverage_names(plan, comps) -> dict:
  names = {}
  for c in comps:
    for leaf in c.leaves:
      names[leaf] = c.name
  return names


# ------------------------------------------------------------------ ghost method


def _nbytes(aval, steps=1) -> int:
  return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize * steps


def extra_bytes_per_example(plan, comps) -> int:
  """Estimated extra bytes per example of the ghost method over a plain step.

  The probe gradients (stacked over the steps inside scans), the largest temporary of
  one rule (Gram matrices, per-example weight gradients, canonical copies), and the
  per-example gradients of the parameters on the per-example path.
  """
  b = plan.b
  total = 0
  for aval, stack in plan.top.probe_avals.values():
    total += _nbytes(aval, int(np.prod(stack, dtype=np.int64)) if stack else 1) // b
  # The recorded operands are values the backward pass keeps anyway (residuals);
  # the rules' temporaries come and go, so only the largest counts.
  temps = [u.rule.temp_bytes(u, b) for u in plan.uses]
  for blk in {id(c.block): c.block for c in comps if c.block is not None}.values():
    r0 = [g.uses[0] for g in blk.rows[0]]
    temps.append(dot_rule.block_temp_bytes(
        [r[0].uses[0].data["K"] for r in blk.rows], [u.data["N"] for u in r0],
        r0[0].data["H"], sum(dot_rule.positions(u, b) for u in blk.rows[0][0].uses)))
  temp = max(temps or [0])
  total += temp
  for c in comps:
    if not c.direct:
      total += 4 * sum(int(np.prod(plan.param_avals[i].shape, dtype=np.int64))
                       for i in c.leaves)
  return total


def auto_microbatch(plan, comps, budget=None) -> int:
  """The largest divisor m of B with m * extra_bytes_per_example <= the budget."""
  if budget is None:
    budget = memory_budget()
  per = max(extra_bytes_per_example(plan, comps), 1)
  b = plan.b
  for m in range(b, 0, -1):
    if b % m == 0 and m * per <= budget:
      return m
  return 1


def _ghost_core(loss_fn, has_aux, max_norm, params, batch, auto=False, plan=None,
                mask=None):
  """(f32 clipped sum, norms [B], finite [B], aux) of one batch by ghost norms."""
  if plan is None:
    plan, b = _plan(loss_fn, has_aux, params, batch)
  b = plan.b
  comps = _structure(plan)
  if auto and not any(not c.name.startswith("fallback") for c in comps):
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

  def use_arrays(u):
    recs = {j: records[u.rec_key[j]] for j in u.rec_pos if u.rec_key[j] in records}
    gs = {k: g_probe[u.probe_key[k]] for k in u.probe_pos}
    vw = {j: views[(u.uid, j)] for j in u.p_pos}
    return recs, gs, vw

  canons = {}
  for c in comps:
    for g in c.groups:
      parts = []
      for u in g.uses:
        recs, gs, vw = use_arrays(u)
        if u.rule.family in ("fallback", "conv_general_dilated"):
          parts.append(u.rule.canon(u, recs, gs, b, views=vw))
        else:
          parts.append(u.rule.canon(u, recs, [gs[k] for k in u.probe_pos], b, views=vw))
      if len(parts) > 1 and u.rule.family in ("fallback", "conv_general_dilated"):
        pe = {}
        for p in parts:
          for j, x in p["pe"].items():
            pe[j] = pe[j] + x if j in pe else x
        canons[id(g)] = {"pe": pe}
      else:
        canons[id(g)] = g.rule.concat(parts)

  blocks = list({id(c.block): c.block for c in comps if c.block is not None}.values())
  block_canons = [dot_rule.block_canon([[canons[id(g)] for g in row] for row in blk.rows])
                  for blk in blocks]
  sq = jnp.zeros((b,), jnp.float32)
  for bc in block_canons:
    sq = sq + dot_rule.block_sq(bc)
  materialised = []  # (component, {leaf: [B, ...] per-example grads})
  for c in comps:
    if c.block is not None:
      continue
    if c.tied is not None:
      ga, dg, free = c.tied
      cga, cdg = canons[id(ga)], canons[id(dg)]
      sq = sq + ga.rule.sq(cga) + dg.rule.sq(cdg) + 2.0 * _tied_cross(cga, cdg, free)
      continue
    if c.direct:
      g = c.groups[0]
      sq = sq + g.rule.sq(canons[id(g)])
      continue
    leaves = sorted(c.leaves)
    pe_w = {}
    for g in c.groups:
      u0 = g.uses[0]
      for j, x in g.rule.per_example(canons[id(g)], None).items():
        pe_w[(u0.uid, j)] = x
    keys = list(pe_w)

    def comp_views(sub, leaves=leaves, keys=keys):
      full = list(p_flat)
      for i, x in zip(leaves, sub):
        full[i] = x
      vw = _trace.run_views(plan, full)
      return [vw[k] for k in keys]

    sub0 = [p_flat[i] for i in leaves]
    _, cvjp = jax.vjp(comp_views, sub0)
    per_leaf = jax.vmap(lambda cts, cvjp=cvjp: cvjp(cts)[0])(
        [pe_w[k].astype(jnp.result_type(views[k])) for k in keys])
    per_leaf = dict(zip(leaves, per_leaf))
    for x in per_leaf.values():
      sq = sq + cm.per_example_sq(x)
    materialised.append(per_leaf)

  norms = jnp.sqrt(sq)
  ok = _kept(losses, mask)
  scale, finite, _ = _per_example.clip_stats(jnp.where(ok, norms, jnp.nan), max_norm)
  weights = jnp.where(finite, scale, 0.0)

  # The clipped sum from the same records: sum_b w_b dW'_b per direct group, mapped
  # to the parameter leaves by the VJP of the parameter-only part of the program.
  cts, direct_keys = [], []
  for blk, bc in zip(blocks, block_canons):
    members = [[(canons[id(g)], g.uses[0].data) for g in row] for row in blk.rows]
    for (r, col), x in dot_rule.block_weighted(bc, members, weights, finite).items():
      u0 = blk.rows[r][col].uses[0]
      key = (u0.uid, u0.data["wpos"])
      direct_keys.append(key)
      cts.append(x.astype(jnp.result_type(views[key])))
  for c in comps:
    if not c.direct or c.block is not None:
      continue
    for g in c.groups:
      u0 = g.uses[0]
      for j, x in g.rule.weighted(canons[id(g)], weights, finite, None).items():
        direct_keys.append((u0.uid, j))
        cts.append(x.astype(jnp.result_type(views[(u0.uid, j)])))
  total = [jnp.zeros(jnp.shape(x), jnp.float32) for x in p_flat]
  float_idx = [i for i, x in enumerate(p_flat) if _is_float(x)]
  if direct_keys:
    def dviews(sub):
      full = list(p_flat)
      for i, x in zip(float_idx, sub):
        full[i] = x
      vw = _trace.run_views(plan, full)
      return [vw[k] for k in direct_keys]

    _, dvjp = jax.vjp(dviews, [p_flat[i] for i in float_idx])
    grads = dvjp(cts)[0]
    for i, gr in zip(float_idx, grads):
      total[i] = total[i] + cm.f32(gr)
  for per_leaf in materialised:
    for i, x in per_leaf.items():
      total[i] = total[i] + jnp.sum(cm.mask_rows(x, finite, weights), axis=0)
  return jax.tree.unflatten(p_tree, total), _masked_norms(norms, mask), finite, aux


def ghost_coverage(loss_fn: Callable[..., Any], params: Any, *batch: Any,
                   has_aux: bool = False) -> dict:
  """Which ghost rule each float parameter leaf gets (traced abstractly, no FLOPs).

  Returns ``{"path/of/leaf": rule}`` for every floating-point leaf of ``params``
  (path components joined by ``/``). ``rule`` is one of

  * ``"dot_general"``, ``"gather"``, ``"elementwise"``, ``"conv_general_dilated"``:
    an exact rule (see :mod:`gradclip_jax.dp`);
  * ``"fallback: <primitive>"``: the per-example gradient of that one operation
    (e.g. ``"fallback: custom_vjp_call"``);
  * ``"unused"``: the losses do not depend on the leaf (its gradient is zero);

  followed by ``" (scan)"`` when a use sits inside a ``scan`` (its positions include
  the steps), ``" xN uses"`` when ``N > 1`` operations read the leaf (through the
  same operand, or sharing leaves with other operands), and ``" [fused: N parameters
  on shared operands]"`` when its ``dot_general`` shares one product with other
  parameters' (the same data operand, or the same output gradients). Leaves whose uses share
  parameters with a use of another form (e.g. a tied embedding read by ``gather`` and
  ``dot_general``) get exact per-example gradients of those leaves, named after the
  first use in program order.

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
    v dot_general
    w dot_general
  """
  plan, _ = _plan(loss_fn, has_aux, params, batch)
  names = _coverage_names(plan, _structure(plan))
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
