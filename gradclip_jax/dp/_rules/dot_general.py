"""``dot_general`` with a parameter operand: the Gram form or the per-example product.

For ``y = x . W'`` (any dimension numbers, the example axis a free dimension of the
data operand ``x``) every example's weight gradient is ``G_b = sum_t a_bt g_bt^T``
per dot-general batch index ``h``, with ``a`` the data rows (contracted features,
``K``) and ``g`` the output-gradient rows (``W'``'s free features, ``N``) at each of
the ``T`` positions (the steps of enclosing scans included). Two exact forms, chosen
per unit from the traced shapes by the engine's rule (fewest FLOPs among the forms
whose bytes let a chunk of examples fit the memory budget, see
:func:`gradclip_jax.dp._clipped_grad.choose_form`):

* ``gram`` (:data:`NORM`): ``||G_b||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)`` without
  forming ``G_b`` (Goodfellow 2015; Li et al. 2022, "ghost norm"): ``H T^2 (K + N)``
  multiply-adds and ``H T^2`` floats per example; the clipped sum
  ``sum_b w_b sum_t a_bt g_bt^T`` is then one product over the whole batch
  (book-keeping, Bu et al. 2023), ``H T K N`` per example, the share of the plain
  weight gradient. With ``T = 1`` the norm is ``|a|^2 |g|^2``.
* ``per-example, reused`` (:data:`PER_EXAMPLE`): ``G_b`` itself, ``H T K N``
  multiply-adds and ``H K N`` floats per example; its squared norm is summed, and
  once the clip weights are known the clipped sum is ``sum_b w_b G_b`` (``H K N``),
  so the product is formed once (mixed ghost clipping, Bu et al. 2022, with the
  per-example gradients kept for the sum instead of formed a second time).

The per-example form costs ``H T K N + 2 H K N`` (the product, its squared norm,
its weighted sum) against the Gram form's ``H T^2 (K + N) + H T K N``: it needs
fewer FLOPs whenever ``2 K N < T^2 (K + N)``, and more memory (``K N`` against
``2 T^2`` floats per example); :meth:`DotUnit.forms` reports both.

Uses of *different* parameters that read the same data operand (the same value, with
the same dimension numbers on its side) share their work exactly: for the total
per-example norm ``sum_l ||sum_t a_t g_lt^T||^2 = ||sum_t a_t [g_1t ... g_Lt]^T||^2``,
so they are one product with the output gradients side by side (``N`` = the sum of
their widths). Likewise data operands whose uses have the same output gradients
(``W_x x_t + W_h h_t`` in one gate) stack along ``K``: ``||sum_t [x_t; h_t] g_t^T||^2``.
``linen.LSTMCell``'s eight kernels (``x_t`` and ``h_{t-1}`` times four gates) become
one ``[2K, 4N]`` product per example (:meth:`DotGeneral.units` builds these fused
units; ``ghost_coverage`` adds ``[fused: N parameters on shared operands]``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from gradclip_jax.dp import _jaxpr as jx
from gradclip_jax.dp import _trace
from gradclip_jax.dp._rules import _common as cm
from gradclip_jax.dp._rules._base import Cost
from gradclip_jax.dp._rules._base import NORM
from gradclip_jax.dp._rules._base import PER_EXAMPLE
from gradclip_jax.dp._rules._base import Rule
from gradclip_jax.dp._rules._base import Unit
from gradclip_jax.dp._rules._base import register


class DotData(NamedTuple):
  needs: tuple     # the recorded operand: the data side
  xpos: int        # operand position of the data
  wpos: int        # operand position of W'
  xc: tuple        # data dims contracted
  xb: tuple        # data dims that are dot-general batch dims
  xfree: tuple     # data dims kept (the example axis among them)
  x_out: tuple     # output dims of the data's free dims
  w_out: tuple     # output dims of W''s free dims
  nb: int          # number of dot-general batch dims
  H: int           # size of the batch dims
  K: int           # size of the contracted dims
  N: int           # size of W''s free dims
  wsizes: tuple    # W' dims in (batch, contracted, free) order
  wperm: tuple     # W' dim d is wsizes-dim wperm[d]


class DotCanon(NamedTuple):
  a: Any  # [B, H, T, K] data rows per example
  g: Any  # [B, H, T, N] output-gradient rows per example


@register("dot_general")
class DotGeneral(Rule):
  family = "dot_general"
  form_names = {NORM: "gram", PER_EXAMPLE: "per-example, reused"}

  def match(self, use):
    if len(use.p_pos) != 1 or len(use.in_shapes) != 2 or use.pre:
      return None
    wpos = use.p_pos[0]
    xpos = 1 - wpos
    x_info, w_info = use.in_info[xpos], use.in_info[wpos]
    if not isinstance(x_info.spec, _trace.Spec) or w_info.spec is not None:
      return None
    (lc, rc), (lb, rb) = jx.dot_dimension_numbers(use.eqn)
    xc, wc, xb, wb = (lc, rc, lb, rb) if wpos == 1 else (rc, lc, rb, lb)
    xs, ws = use.in_shapes[xpos], use.in_shapes[wpos]
    xfree = tuple(d for d in range(len(xs)) if d not in xc and d not in xb)
    wfree = tuple(d for d in range(len(ws)) if d not in wc and d not in wb)
    ex = x_info.spec.axis
    if ex not in xfree:
      return None
    nb = len(xb)
    if wpos == 1:
      x_out = tuple(nb + i for i in range(len(xfree)))
      w_out = tuple(nb + len(xfree) + i for i in range(len(wfree)))
    else:
      w_out = tuple(nb + i for i in range(len(wfree)))
      x_out = tuple(nb + len(wfree) + i for i in range(len(xfree)))
    want = _trace.Spec(x_out[xfree.index(ex)], x_info.spec.inner, x_info.spec.outer)
    if use.out_info[0].spec != want:
      return None
    wlist = list(wb) + list(wc) + list(wfree)
    return DotData(needs=(xpos,), xpos=xpos, wpos=wpos, xc=tuple(xc), xb=tuple(xb),
                   xfree=xfree, x_out=x_out, w_out=w_out, nb=nb,
                   H=cm.size_of([xs[d] for d in xb]), K=cm.size_of([xs[d] for d in xc]),
                   N=cm.size_of([ws[d] for d in wfree]),
                   wsizes=tuple(ws[d] for d in wlist),
                   wperm=tuple(wlist.index(d) for d in range(len(ws))))

  def merge_key(self, use):
    d = use.data
    return ("dot_general", use.w_ident(d.wpos), d.wpos, jx.dimension_numbers_key(use.eqn),
            cm.weight_stack(use, d.wpos)[1])

  def canon(self, use, recs, gs, views, b):
    d = use.data
    ns = len(use.stack)
    wst, _ = cm.weight_stack(use, d.wpos)
    ws_dims = [[i] for i in wst]
    stack = [[i] for i in range(ns) if i not in wst]
    hs = int(np.prod([use.stack[i] for i in wst], dtype=np.int64))
    x2, dm, exd = cm.split(recs[d.xpos], use.in_info[d.xpos].spec, ns, b)
    perm = ([exd] + cm.flat(ws_dims) + cm.flat([dm[ns + i] for i in d.xb])
            + cm.flat(stack + [dm[ns + i] for i in d.xfree])
            + cm.flat([dm[ns + i] for i in d.xc]))
    a = jnp.transpose(x2, perm).reshape(b, hs * d.H, -1, d.K)
    g2, gm, gex = cm.split(gs[use.probe_pos[0]], use.out_info[0].spec, ns, b)
    perm = ([gex] + cm.flat(ws_dims) + cm.flat([gm[ns + i] for i in range(d.nb)])
            + cm.flat(stack + [gm[ns + i] for i in d.x_out])
            + cm.flat([gm[ns + i] for i in d.w_out]))
    g = jnp.transpose(g2, perm).reshape(b, hs * d.H, -1, d.N)
    return cm.Canon(DotCanon(a, g))

  def concat(self, canons):
    if len(canons) == 1:
      return canons[0]
    return cm.Canon(DotCanon(jnp.concatenate([c.ex.a for c in canons], axis=2),
                             jnp.concatenate([c.ex.g for c in canons], axis=2)))

  def units(self, groups):
    return fuse(self, groups)

  def unit(self, group):
    return DotUnit(self, [[group]])


def positions(use, b) -> int:
  """``T``: the positions per example and dot-general batch index (steps included)."""
  d = use.data
  xsize = cm.size_of(use.in_shapes[d.xpos])
  return max(xsize // max(b * d.H * d.K, 1), 1) * cm.steps_of(use)


def _layout(x, d: DotData, lead):
  """``[*lead, H, K, N]`` -> ``[*lead, *W'.shape]``."""
  x = x.reshape(tuple(lead) + d.wsizes)
  off = len(lead)
  return jnp.transpose(x, list(range(off)) + [off + p for p in d.wperm])


class DotUnit(Unit):
  """A ``dot_general`` group, or a block of groups on shared operands.

  ``rows[r][c]`` is a group: every group of row ``r`` reads the same data rows ``a``
  and every group of column ``c`` has the same output gradients ``g``, so the block
  is one product ``[K_1 + ..., N_1 + ...]`` per example.
  """

  def __init__(self, rule, rows):
    super().__init__(rule, [g for r in rows for g in r])
    self.rows = rows

  def _dims(self, b):
    u0 = self.rows[0][0].uses[0]
    k = sum(r[0].uses[0].data.K for r in self.rows)
    n = sum(g.uses[0].data.N for g in self.rows[0])
    hs = int(np.prod(cm.weight_stack(u0, u0.data.wpos)[1], dtype=np.int64))
    t = sum(positions(u, b) for u in self.rows[0][0].uses) // max(hs, 1)
    return hs * u0.data.H, max(t, 1), k, n

  def forms(self, b):
    h, t, k, n = self._dims(b)
    gram = Cost(flops=h * (t * t * (k + n) + t * k * n) if t > 1 else h * (k + n + k * n),
                bytes=4 * h * (2 * t * t if t > 1 else 1))
    pe = Cost(flops=h * (t * k * n + 2 * k * n), bytes=4 * h * k * n)
    return {NORM: gram, PER_EXAMPLE: pe}

  def suffix(self):
    if len(self.groups) < 2:
      return ""
    n = len(frozenset().union(*[g.origin for g in self.groups]))
    return f" [fused: {n} parameters on shared operands]"

  def canon(self, canons):
    if len(canons) == 1:
      return canons[0]
    it = iter(canons)
    grid = [[next(it) for _ in r] for r in self.rows]
    a = [row[0].ex.a for row in grid]
    g = [c.ex.g for c in grid[0]]
    return cm.Canon(DotCanon(a[0] if len(a) == 1 else jnp.concatenate(a, axis=-1),
                             g[0] if len(g) == 1 else jnp.concatenate(g, axis=-1)))

  def sq(self, c):
    a, g = cm.f32(c.ex.a), cm.f32(c.ex.g)
    if a.shape[2] == 1:
      return jnp.sum(jnp.sum(cm.sq(a), (2, 3)) * jnp.sum(cm.sq(g), (2, 3)), axis=1)
    aa = jnp.einsum("bhtk,bhsk->bhts", a, a, precision=cm.HI)
    gg = jnp.einsum("bhtn,bhsn->bhts", g, g, precision=cm.HI)
    return jnp.sum(aa * gg, axis=(1, 2, 3))

  def weighted(self, c, w, fin):
    s = jnp.einsum("bhtk,bhtn->hkn", cm.mask_rows(c.ex.a, fin),
                   cm.mask_rows(c.ex.g, fin, w), precision=cm.HI)
    return self.split(s)

  def per_example(self, c):
    return jnp.einsum("bhtk,bhtn->bhkn", cm.f32(c.ex.a), cm.f32(c.ex.g),
                      precision=cm.HI)

  def split(self, raw):
    """``[H, K_tot, N_tot]`` -> ``{(uid, wpos): W'}`` for every member of the block."""
    ko = np.cumsum([0] + [r[0].uses[0].data.K for r in self.rows])
    no = np.cumsum([0] + [g.uses[0].data.N for g in self.rows[0]])
    out = {}
    for r, row in enumerate(self.rows):
      for col, grp in enumerate(row):
        u0 = grp.uses[0]
        d = u0.data
        piece = raw[:, ko[r]:ko[r + 1], no[col]:no[col + 1]]
        out[(u0.uid, d.wpos)] = _layout(piece, d, cm.weight_stack(u0, d.wpos)[1])
    return out


# ------------------------------------------------ shared data operands (fused uses)


def _row_key(use):
  """Key of the canonical data rows ``a`` of a use: equal keys give equal ``a``."""
  d = use.data
  return (use.scope_id, use.rec_key.get(d.xpos), d.xc, d.xb, d.xfree,
          use.in_info[d.xpos].spec, tuple(use.stack))


def _col_key(use):
  """Key of the canonical output-gradient rows ``g`` (the probe and its layout)."""
  d = use.data
  return (use.probe_key.get(use.probe_pos[0]), d.nb, d.x_out, d.w_out,
          use.out_info[0].spec, tuple(use.stack))


def _fusable(use) -> bool:
  """A use whose rows may be concatenated with other parameters' uses."""
  d = use.data
  return not use.in_info[d.wpos].wstack and use.rec_key.get(d.xpos) is not None


def fuse(rule, groups) -> list:
  """Units of ``dot_general`` groups: blocks of groups on shared operands, else one each.

  Groups with the same data rows (``_row_key`` of each use) form a row, their output
  gradients side by side; rows whose columns have the same output gradients
  (``_col_key``), in the same order, stack along ``K``.
  """
  rows, alone = {}, []
  for g in groups:
    if not all(_fusable(u) for u in g.uses):
      alone.append(g)
      continue
    rk = tuple(_row_key(u) for u in g.uses)
    ck = tuple(_col_key(u) for u in g.uses)
    rows.setdefault(rk, []).append((ck, g))
  blocks = {}
  for members in rows.values():
    members.sort(key=lambda m: repr(m[0]))
    cols = tuple(repr(ck) for ck, _ in members)
    blocks.setdefault(cols, []).append([g for _, g in members])
  units = [DotUnit(rule, [[g]]) for g in alone]
  for rws in blocks.values():
    if sum(len(r) for r in rws) < 2:
      units.extend(DotUnit(rule, [[g]]) for r in rws for g in r)
    else:
      units.append(DotUnit(rule, rws))
  return units
