"""Elementwise ``add`` / ``sub`` / ``mul`` with a broadcast parameter operand.

Biases, LayerNorm/RMSNorm/GroupNorm scales and offsets, learned positions, gates:
``y = x + W'`` or ``y = x * W'`` with ``W'`` broadcast (size-1 or missing dims) over
the output. Per example, ``dW'_b`` is the output gradient (times the other operand
for ``mul``; negated for ``x - W'``) summed over the broadcast positions of that
example, a small ``[B, *W'.shape]`` array; its squared norm and weighted sum follow
directly (Li et al. 2022; Bu et al. 2022).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gradclip_jax.dp import _trace
from gradclip_jax.dp._rules import _common as cm


class Elementwise(cm.Rule):
  family = "elementwise"

  def match(self, use):
    if use.prim not in ("add", "sub", "mul") or len(use.p_pos) != 1:
      return None
    wpos = use.p_pos[0]
    xpos = 1 - wpos
    if use.in_info[wpos].spec is not None:
      return None
    out = _trace._shape(use.eqn.outvars[0])  # pylint: disable=protected-access
    spec = use.out_info[0].spec
    if not isinstance(spec, _trace.Spec):
      return None
    if wpos in use.pre:  # W' broadcast over the batch by a broadcast_in_dim
      dims, bshape, _ = use.pre[wpos]
      ws = _trace._shape(use.src[wpos])  # pylint: disable=protected-access
      if tuple(bshape) != tuple(out):
        return None
      wfull = [1] * len(out)
      for i, d in enumerate(dims):
        if ws[i] not in (1, out[d]):
          return None
        wfull[d] = ws[i]
    else:
      ws = _trace._shape(use.eqn.invars[wpos])  # pylint: disable=protected-access
      if ws and (len(ws) != len(out) or any(w not in (1, o) for w, o in zip(ws, out))):
        return None
      wfull = list(ws) if ws else [1] * len(out)
    if wfull[spec.axis] != 1:
      return None
    needs = (xpos,) if use.prim == "mul" else ()
    sign = -1.0 if (use.prim == "sub" and wpos == 1) else 1.0
    return {"needs": needs, "wpos": wpos, "xpos": xpos, "wfull": wfull, "wshape": ws,
            "sign": sign}

  def merge_key(self, use):
    return ("elementwise", id(use.eqn.invars[use.data["wpos"]]), use.scope_id)

  def canon(self, use, recs, gs, b, views=None):
    d = use.data
    ns = len(use.stack)
    g = cm.f32(gs[0])
    if use.prim == "mul":
      x = recs[d["xpos"]]
      if x.ndim < g.ndim:
        x = x.reshape((1,) * (g.ndim - x.ndim) + x.shape)
      dp = g * cm.f32(x)
    else:
      dp = g * d["sign"] if d["sign"] != 1.0 else g
    dp2, dm, exd = cm.split(dp, use.out_info[0].spec, ns, b)
    ex = ns + use.out_info[0].spec.axis
    wst = use.in_info[d["wpos"]].wstack  # scan levels with a weight per step
    keep = list(wst)
    drop = [i for i in range(ns) if i not in wst] + [dm[ex][0], dm[ex][1]]
    for i, w in enumerate(d["wfull"]):
      if ns + i == ex:
        continue
      (keep if w > 1 else drop).extend(dm[ns + i])
    x = jnp.transpose(dp2, [exd] + keep + drop)
    kept = int(np.prod([dp2.shape[i] for i in keep], dtype=np.int64))
    lead = (b,) + tuple(use.stack[i] for i in wst)
    pe = jnp.sum(x.reshape(b, kept, -1), axis=2).reshape(lead + tuple(d["wshape"]))
    return {"pe": pe, "wpos": d["wpos"]}

  def concat(self, canons):
    pe = canons[0]["pe"]
    for c in canons[1:]:
      pe = pe + c["pe"]
    return {"pe": pe, "wpos": canons[0]["wpos"]}

  def sq(self, c):
    return cm.per_example_sq(c["pe"]) if c["pe"].ndim > 1 else cm.sq(c["pe"])

  def weighted(self, c, w, fin, wshapes):
    return {c["wpos"]: jnp.sum(cm.mask_rows(c["pe"], fin, w), axis=0)}

  def per_example(self, c, wshapes):
    return {c["wpos"]: c["pe"]}
