"""Per-operation per-example gradients: ``conv_general_dilated`` and the fallback.

For one operation ``y = op(x, W')`` that reads parameters, the per-example gradient
``dW'_b`` is the VJP of *that operation only*, from its recorded operands and output
gradient, vmapped over the examples (never a re-run of the whole model):

* ``"rebind"`` (primitives whose parameters do not depend on the batch size, e.g.
  ``conv_general_dilated``, ``div``, ``max``, ``cumsum``): the primitive is applied to
  each example's slice (batch size 1) and its VJP is vmapped over the examples; cost
  about one extra application of the operation and its VJP.
* ``"masked"`` (operations with an inner program traced at the batch size, e.g.
  ``custom_vjp_call``, ``cond``, a ``scan`` with parameters in its carry or scanned
  inputs): the operation's VJP at the full batch is applied once per example to the
  output gradient masked to that example (``B`` VJPs, vmapped).

Both hold ``B x |W'|`` per-example gradients. ``conv_general_dilated`` with a
parameter kernel (any rank, strides, dilation, feature groups) uses "rebind" and is an
exact per-layer rule; every other operation is reported as ``"fallback: <primitive>"``.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from gradclip_jax.dp import _trace
from gradclip_jax.dp._rules import _common as cm


def _has_jaxpr(params) -> bool:
  return any(isinstance(v, (_trace.jcore.ClosedJaxpr, _trace.jcore.Jaxpr)) or callable(v)
             for v in params.values())


def _literal_or(use, j, vals):
  v = use.eqn.invars[j]
  return v.val if _trace._is_literal(v) else vals[j]  # pylint: disable=protected-access


def _step_grads(use, mode, vals, gs, b):
  """Per-example grads {j: [B, *W'_j.shape]} of one (unstacked) step."""
  eqn = use.eqn
  p_pos = list(use.p_pos)
  ws = [vals[j] for j in p_pos]
  n_in = len(eqn.invars)

  def full(wvals, others, one_example):
    out = list(others)
    for j, w in zip(p_pos, wvals):
      if j in use.pre:  # W'_j read broadcast over the batch
        dims, shape, bspec = use.pre[j]
        shape = list(shape)
        if one_example:
          shape[bspec.axis] = bspec.outer * bspec.inner
        w = lax.broadcast_in_dim(w, tuple(shape), dims)
      out[j] = w
    return out

  avals = [v.aval for v in eqn.outvars]
  if mode == "rebind":
    fronts, axes = [], []
    for j in range(n_in):
      x = vals[j]
      sp = use.in_info[j].spec
      if j in p_pos or not isinstance(sp, _trace.Spec):
        fronts.append(x)
        axes.append(None)
      else:
        fronts.append(cm.to_front(x, sp, b))
        axes.append(0)
    gfront = []
    for k, aval in enumerate(avals):
      if k in use.probe_pos:
        gfront.append(cm.to_front(gs[k], use.out_info[k].spec, b))

    def one(others, gk):
      def f(*wv):
        return _trace._bind(eqn, full(wv, others, True))  # pylint: disable=protected-access
      outs, vjp = jax.vjp(f, *ws)
      cts, it = [], iter(gk)
      for k, o in enumerate(outs):
        cts.append(next(it).astype(o.dtype) if k in use.probe_pos
                   else cm.zero_cotangent(jax.core.ShapedArray(o.shape, o.dtype)))
      return vjp(cts)

    in_axes = ([a for a in axes], [0] * len(gfront))
    res = jax.vmap(one, in_axes=in_axes)(fronts, gfront)
  else:
    others = list(vals)

    def f(*wv):
      return _trace._bind(eqn, full(wv, others, False))  # pylint: disable=protected-access

    outs, vjp = jax.vjp(f, *ws)

    def one(idx):
      cts = []
      for k, o in enumerate(outs):
        if k in use.probe_pos:
          sp = use.out_info[k].spec
          m = cm.example_mask(o.shape, sp, b, idx)
          cts.append(jnp.where(m, gs[k].astype(o.dtype), jnp.zeros((), o.dtype)))
        else:
          cts.append(cm.zero_cotangent(avals[k]))
      return vjp(cts)

    res = jax.vmap(one)(jnp.arange(b))
  return {j: cm.f32(r) for j, r in zip(p_pos, res)}


def per_example_grads(use, mode, recs, gs, views, b):
  """{j: [B, *W'_j.shape]} float32, summed over the steps of enclosing scans."""
  ns = len(use.stack)
  n_in = len(use.eqn.invars)
  vals = [None] * n_in
  for j in use.p_pos:
    vals[j] = views[j]
  for j in range(n_in):
    if j not in use.p_pos:
      vals[j] = recs[j] if j in recs else _literal_or(use, j, recs)
  gl = [gs.get(k) for k in range(len(use.eqn.outvars))]
  if ns == 0:
    return _step_grads(use, mode, vals, gl, b)
  steps = int(np.prod(use.stack))
  stacked = [j for j in range(n_in) if j not in use.p_pos and j in recs]
  xs_v = {j: vals[j].reshape((steps,) + vals[j].shape[ns:]) for j in stacked}
  xs_g = {k: g.reshape((steps,) + g.shape[ns:]) for k, g in enumerate(gl) if g is not None}
  init = {j: jnp.zeros((b,) + tuple(jnp.shape(vals[j])), jnp.float32) for j in use.p_pos}

  def body(acc, x):
    xv, xg = x
    v = list(vals)
    for j in stacked:
      v[j] = xv[j]
    g = [xg.get(k) for k in range(len(gl))]
    r = _step_grads(use, mode, v, g, b)
    return {j: acc[j] + r[j] for j in acc}, None

  acc, _ = lax.scan(body, init, (xs_v, xs_g))
  return acc


class Fallback(cm.Rule):
  family = "fallback"

  def match(self, use):
    for j in use.p_pos:
      if use.in_info[j].wstack:
        raise _trace.Unsupported(
            f"{use.prim!r} {use.where} reads a parameter scanned over (one per step) "
            "and has no exact rule")
      if use.in_info[j].spec is not None and j not in use.pre:
        raise _trace.Unsupported(
            f"the parameter operand of {use.prim!r} {use.where} has an example axis "
            "(a parameter broadcast over the batch before a non-elementwise operation)")
    for j in use.rec_pos:
      if use.in_info[j].spec == _trace.UNKNOWN:
        raise _trace.Unsupported(f"the example axis of an operand of {use.prim!r} "
                                 f"{use.where} could not be located")
    mode = "rebind" if (use.params_same and not _has_jaxpr(use.eqn.params)) else "masked"
    if mode == "rebind" and any(isinstance(use.in_info[j].spec, _trace.Spec) and
                                use.in_info[j].spec.inner * use.in_info[j].spec.outer != 1
                                for j in use.rec_pos):
      mode = "masked"
    return {"needs": use.rec_pos, "mode": mode}

  def name(self, use):
    return f"fallback: {use.prim}"

  def temp_bytes(self, use, b):
    w = sum(cm.size_of(use.eqn.invars[j].aval) for j in use.p_pos)
    if use.data.get("mode") == "masked":
      w += sum(cm.size_of(use.eqn.outvars[k].aval) for k in use.probe_pos)
    return 4 * w

  def canon(self, use, recs, gs, b, views=None):
    return {"pe": per_example_grads(use, use.data["mode"], recs, gs, views, b)}

  def sq(self, c):
    return sum(cm.per_example_sq(x) for x in c["pe"].values())

  def weighted(self, c, w, fin, wshapes):
    return {j: jnp.sum(cm.mask_rows(x, fin, w), axis=0) for j, x in c["pe"].items()}

  def per_example(self, c, wshapes):
    return dict(c["pe"])


class Conv(Fallback):
  """``conv_general_dilated`` with a parameter kernel: per-example kernel gradients."""
  family = "conv_general_dilated"

  def match(self, use):
    if use.p_pos != (1,) or len(use.eqn.invars) != 2 or use.in_info[1].wstack:
      return None
    prm = use.eqn.params
    sp = use.in_info[0].spec
    dn = prm["dimension_numbers"]
    lhs_batch = dn.lhs_spec[0] if dn is not None else 0
    if (prm.get("batch_group_count", 1) != 1 or not isinstance(sp, _trace.Spec)
        or sp.axis != lhs_batch or not use.params_same):
      return None
    return {"needs": (0,), "mode": "rebind"}

  def name(self, use):
    return self.family
