"""``gather`` of rows of a parameter (embedding lookups, ``jnp.take``, indexing).

For ``y_t = E[id_t]`` the example's gradient has rows ``dE_b[v] = sum_{t: id_t = v}
g_bt``, so ``||dE_b||^2 = sum_v ||sum_{t: id_t = v} g_bt||^2``: the output gradients
are sorted by token id and summed per run of equal ids (segment sums), per example
(:data:`NORM`, ``T log T + T D`` work and ``T D`` floats per example). No ``V x D``
per-example matrix is formed; the clipped sum is one scatter-add of the weighted
output gradients. Out-of-range ids follow the gather's mode (dropped for ``fill``,
clamped for ``clip``). The per-example form (a dense ``V x D`` scatter per example)
exists for parameters whose per-example gradients must be formed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradclip_jax.dp import _jaxpr as jx
from gradclip_jax.dp import _trace
from gradclip_jax.dp._rules import _common as cm
from gradclip_jax.dp._rules._base import Cost
from gradclip_jax.dp._rules._base import NORM
from gradclip_jax.dp._rules._base import PER_EXAMPLE
from gradclip_jax.dp._rules._base import Rule
from gradclip_jax.dp._rules._base import Unit
from gradclip_jax.dp._rules._base import register


class GatherData(NamedTuple):
  needs: tuple      # the recorded operand: the indices
  batch_out: tuple  # output dims that follow the indices' batch dims
  offset: tuple     # output dims of the gathered row
  V: int            # rows of the table
  D: int            # size of a row
  wshape: tuple     # the table's shape
  fill: bool        # out-of-range ids are dropped (else clamped)
  row: int          # which index column addresses the rows
  n_idx: int        # index columns


class GatherCanon(NamedTuple):
  ids: Any  # [B, P] int: the row read at each position
  g: Any    # [B, P, D] float32: the output gradient there


@register("gather")
class Gather(Rule):
  family = "gather"

  def match(self, use):
    if use.p_pos != (0,) or len(use.in_shapes) != 2 or use.pre or use.in_info[0].wstack:
      return None
    dn = jx.gather_dims(use.eqn)
    ws, ids = use.in_shapes[0], use.in_shapes[1]
    spec = use.in_info[1].spec
    smap, collapsed = dn.start_index_map, dn.collapsed_slice_dims
    # Whole rows of W (dim 0 indexed, every other dim taken in full); jnp.take and
    # x[ids] give collapsed=(0,), map=(0,); a vmapped dynamic_slice (Equinox's
    # Embedding) gives collapsed=(), map=(0, 1, ...) with zero start indices.
    if (not isinstance(spec, _trace.Spec) or use.in_info[0].spec is not None
        or len(ws) < 1 or not ids or 0 not in smap or ids[-1] != len(smap)
        or spec.axis == len(ids) - 1 or collapsed not in ((), (0,))
        or dn.operand_batching_dims or dn.start_indices_batching_dims
        or dn.slice_sizes != (1,) + tuple(ws[1:])
        or len(dn.offset_dims) != len(ws) - len(collapsed)):
      return None
    out_nd = len(use.out_shapes[0])
    batch_out = tuple(d for d in range(out_nd) if d not in dn.offset_dims)
    want = _trace.Spec(batch_out[spec.axis], spec.inner, spec.outer)
    if use.out_info[0].spec != want:
      return None
    return GatherData(needs=(1,), batch_out=batch_out, offset=dn.offset_dims, V=ws[0],
                      D=cm.size_of(ws[1:]), wshape=tuple(ws), fill=dn.fill,
                      row=smap.index(0), n_idx=len(smap))

  def merge_key(self, use):
    return ("gather", use.w_ident(0))

  def canon(self, use, recs, gs, views, b):
    d = use.data
    ns = len(use.stack)
    idx = recs[1]
    ids = idx[..., d.row]
    if d.n_idx > 1 and d.fill:  # a non-zero start on a full dim drops the row
      rest = [i for i in range(d.n_idx) if i != d.row]
      ids = jnp.where(jnp.all(idx[..., rest] == 0, axis=-1), ids, -1)
    i2, dm, exd = cm.split(ids, use.in_info[1].spec, ns, b)
    perm = [exd] + cm.flat([[i] for i in range(ns)]
                           + [dm[ns + i] for i in range(ids.ndim - ns)])
    ids = jnp.transpose(i2, perm).reshape(b, -1)
    g2, gm, gex = cm.split(gs[use.probe_pos[0]], use.out_info[0].spec, ns, b)
    perm = ([gex] + cm.flat([[i] for i in range(ns)] + [gm[ns + i] for i in d.batch_out])
            + cm.flat([gm[ns + i] for i in d.offset]))
    g = cm.f32(jnp.transpose(g2, perm).reshape(b, ids.shape[1], d.D))
    if d.fill:
      ok = (ids >= 0) & (ids < d.V)
      g = jnp.where(ok[..., None], g, jnp.zeros((), g.dtype))
    return cm.Canon(GatherCanon(jnp.clip(ids, 0, d.V - 1), g))

  def concat(self, canons):
    if len(canons) == 1:
      return canons[0]
    return cm.Canon(GatherCanon(jnp.concatenate([c.ex.ids for c in canons], 1),
                                jnp.concatenate([c.ex.g for c in canons], 1)))

  def unit(self, group):
    return GatherUnit(self, [group])


class GatherUnit(Unit):

  def forms(self, b):
    d = self.groups[0].uses[0].data
    p = sum(cm.size_of(u.out_shapes[0]) * cm.steps_of(u) for u in self.groups[0].uses)
    p = max(p // (b * d.D), 1)
    return {NORM: Cost(flops=p * d.D + 8 * p, bytes=8 * p * d.D + 16 * p),
            PER_EXAMPLE: Cost(flops=d.V * d.D + p * d.D, bytes=4 * d.V * d.D)}

  def sq(self, c):
    ids, g = c.ex.ids, c.ex.g
    bsz, t = ids.shape
    order = jnp.argsort(ids, axis=1)
    ids_s = jnp.take_along_axis(ids, order, axis=1)
    g_s = jnp.take_along_axis(g, order[..., None], axis=1)
    new = jnp.concatenate([jnp.ones((bsz, 1), bool), ids_s[:, 1:] != ids_s[:, :-1]], 1)
    seg = jnp.cumsum(new, axis=1) - 1 + (jnp.arange(bsz) * t)[:, None]
    sums = jax.ops.segment_sum(g_s.reshape(bsz * t, -1), seg.reshape(-1),
                               num_segments=bsz * t, indices_are_sorted=True)
    return cm.per_example_sq(sums.reshape(bsz, -1))

  def weighted(self, c, w, fin):
    d = self.groups[0].uses[0].data
    rows = cm.mask_rows(c.ex.g, fin, w).reshape(-1, d.D)
    out = jnp.zeros((d.V, d.D), rows.dtype).at[c.ex.ids.reshape(-1)].add(rows)
    return self.split(out)

  def per_example(self, c):
    d = self.groups[0].uses[0].data
    bsz, t = c.ex.ids.shape
    rows = jnp.broadcast_to(jnp.arange(bsz)[:, None], (bsz, t))
    return jnp.zeros((bsz, d.V, d.D), c.ex.g.dtype).at[rows, c.ex.ids].add(c.ex.g)

  def split(self, raw):
    u0 = self.groups[0].uses[0]
    return {(u0.uid, 0): raw.reshape(u0.data.wshape)}
