"""Elementwise ``add`` / ``sub`` / ``mul`` with a broadcast parameter operand.

Biases, LayerNorm/RMSNorm/GroupNorm scales and offsets, learned positions, gates:
``y = x + W'`` or ``y = x * W'`` with ``W'`` broadcast (size-1 or missing dims) over
the output. Per example, ``dW'_b`` is the output gradient (times the other operand
for ``mul``; negated for ``x - W'``) summed over the broadcast positions of that
example, a small ``[B, *W'.shape]`` array formed in ``canon``; its squared norm and
weighted sum follow directly (Li et al. 2022; Bu et al. 2022). Both forms are the
same arrays here (no extra FLOPs for either).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from gradclip_jax.dp import _trace
from gradclip_jax.dp._rules import _common as cm
from gradclip_jax.dp._rules._base import Cost
from gradclip_jax.dp._rules._base import NORM
from gradclip_jax.dp._rules._base import PER_EXAMPLE
from gradclip_jax.dp._rules._base import Rule
from gradclip_jax.dp._rules._base import Unit
from gradclip_jax.dp._rules._base import register


class ElementwiseData(NamedTuple):
  needs: tuple   # the other operand, for mul
  wpos: int      # operand position of W'
  xpos: int      # operand position of the data
  wfull: tuple   # W''s size along each output dim (1: broadcast)
  wshape: tuple  # W''s shape
  sign: float    # -1 for x - W'


class ElementwiseCanon(NamedTuple):
  pe: Any  # [B, *weight-stack, *W'.shape] float32: each example's dW'


@register("add", "sub", "mul")
class Elementwise(Rule):
  family = "elementwise"

  def match(self, use):
    if use.prim not in ("add", "sub", "mul") or len(use.p_pos) != 1:
      return None
    wpos = use.p_pos[0]
    xpos = 1 - wpos
    if use.in_info[wpos].spec is not None:
      return None
    out = use.out_shapes[0]
    spec = use.out_info[0].spec
    if not isinstance(spec, _trace.Spec):
      return None
    if wpos in use.pre:  # W' broadcast over the batch by a broadcast_in_dim
      bc = use.pre[wpos]
      ws = use.w_shape(wpos)
      if tuple(bc.shape) != tuple(out):
        return None
      wfull = [1] * len(out)
      for i, d in enumerate(bc.dims):
        if ws[i] not in (1, out[d]):
          return None
        wfull[d] = ws[i]
    else:
      ws = use.in_shapes[wpos]
      if ws and (len(ws) != len(out) or any(w not in (1, o) for w, o in zip(ws, out))):
        return None
      wfull = list(ws) if ws else [1] * len(out)
    if wfull[spec.axis] != 1:
      return None
    needs = (xpos,) if use.prim == "mul" else ()
    sign = -1.0 if (use.prim == "sub" and wpos == 1) else 1.0
    return ElementwiseData(needs=needs, wpos=wpos, xpos=xpos, wfull=tuple(wfull),
                           wshape=tuple(ws), sign=sign)

  def merge_key(self, use):
    return ("elementwise", use.w_ident(use.data.wpos),
            cm.weight_stack(use, use.data.wpos)[1])

  def canon(self, use, recs, gs, views, b):
    d = use.data
    ns = len(use.stack)
    g = cm.f32(gs[use.probe_pos[0]])
    if use.prim == "mul":
      x = recs[d.xpos]
      if x.ndim < g.ndim:
        x = x.reshape((1,) * (g.ndim - x.ndim) + x.shape)
      dp = g * cm.f32(x)
    else:
      dp = g * d.sign if d.sign != 1.0 else g
    dp2, dm, exd = cm.split(dp, use.out_info[0].spec, ns, b)
    ex = ns + use.out_info[0].spec.axis
    wst, wlen = cm.weight_stack(use, d.wpos)
    keep = list(wst)
    drop = [i for i in range(ns) if i not in wst] + [dm[ex][0], dm[ex][1]]
    for i, w in enumerate(d.wfull):
      if ns + i == ex:
        continue
      (keep if w > 1 else drop).extend(dm[ns + i])
    x = jnp.transpose(dp2, [exd] + keep + drop)
    kept = int(np.prod([dp2.shape[i] for i in keep], dtype=np.int64))
    pe = jnp.sum(x.reshape(b, kept, -1), axis=2).reshape((b,) + wlen + d.wshape)
    return cm.Canon(ElementwiseCanon(pe))

  def concat(self, canons):
    pe = canons[0].ex.pe
    for c in canons[1:]:
      pe = pe + c.ex.pe
    return cm.Canon(ElementwiseCanon(pe))

  def unit(self, group):
    return ElementwiseUnit(self, [group])


class ElementwiseUnit(Unit):

  def forms(self, b):
    u0 = self.groups[0].uses[0]
    n = cm.size_of(u0.w_shape(u0.data.wpos)) * cm.size_of(
        cm.weight_stack(u0, u0.data.wpos)[1])
    return {NORM: Cost(0, 0), PER_EXAMPLE: Cost(0, 4 * n)}

  def sq(self, c):
    return cm.per_example_sq(c.ex.pe) if c.ex.pe.ndim > 1 else cm.sq(c.ex.pe)

  def weighted(self, c, w, fin):
    return self.split(cm.weighted_rows(c.ex.pe, fin, w))

  def per_example(self, c):
    return c.ex.pe

  def split(self, raw):
    u0 = self.groups[0].uses[0]
    return {(u0.uid, u0.data.wpos): raw}
