"""The per-operation fallback: per-example gradients of one operation.

For one operation ``y = op(x, W')`` that reads parameters and no rule covers, the
per-example gradient ``dW'_b`` is the VJP of *that operation only*, from its recorded
operands and output gradient, vmapped over the examples (never a re-run of the whole
model):

* ``"rebind"`` (primitives whose parameters do not depend on the batch size, e.g.
  ``div``, ``max``, ``cumsum``): the primitive is applied to each example's slice
  (batch size 1) and its VJP is vmapped over the examples; cost about one extra
  application of the operation and its VJP. Outside scans this runs per chunk of
  examples, from the records.
* ``"masked"`` (operations with an inner program traced at the batch size, e.g.
  ``custom_vjp_call``, ``while``, a ``cond`` whose branch depends on the example, a
  ``scan`` with parameters in its carry): the operation's VJP at the full batch is
  applied once per example to the output gradient masked to that example (``B``
  VJPs, vmapped).

Both hold ``B x |W'|`` per-example gradients (the :data:`PER_EXAMPLE` form only).
``ghost_coverage`` reports these uses as ``"fallback: <primitive>"``; the
``conv_general_dilated`` rule (:mod:`.conv`) is the "rebind" form as an exact
per-layer rule.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from gradclip_jax.dp import _jaxpr as jx
from gradclip_jax.dp import _trace
from gradclip_jax.dp._rules import _common as cm
from gradclip_jax.dp._rules._base import Cost
from gradclip_jax.dp._rules._base import PER_EXAMPLE
from gradclip_jax.dp._rules._base import Rule
from gradclip_jax.dp._rules._base import Unit
from gradclip_jax.dp._rules._base import register_fallback


class FallbackData(NamedTuple):
  needs: tuple  # every data operand
  mode: str     # "rebind" or "masked"


class Fronts(NamedTuple):
  """Example-major operands of one use (``rebind`` outside scans)."""
  xs: dict  # operand j -> [B, ...] its per-example slices
  gs: dict  # output k -> [B, ...] the output gradient's per-example slices


class Shared(NamedTuple):
  vals: dict  # operand j -> the value read whole (W', constants, literals)


def _with_w(use, wvals, others, one_example):
  """The operands of the use with ``W'`` values ``wvals`` (re-broadcast if needed)."""
  out = list(others)
  for j, w in zip(use.p_pos, wvals):
    if j in use.pre:  # W'_j read broadcast over the batch
      bc = use.pre[j]
      shape = list(bc.shape)
      if one_example:
        shape[bc.spec.axis] = bc.spec.outer * bc.spec.inner
      w = lax.broadcast_in_dim(w, tuple(shape), bc.dims)
    out[j] = w
  return out


def _rebind_one(use, shared_vals, xs, gk):
  """One example's ``{j: dW'_j}``: the operation at batch size 1 and its VJP."""
  n_in = len(use.in_shapes)
  others = [xs[j] if j in xs else shared_vals.get(j) for j in range(n_in)]
  ws = [shared_vals[j] for j in use.p_pos]

  def f(*wv):
    return jx.bind(use.eqn, _with_w(use, wv, others, True))

  outs, vjp = jax.vjp(f, *ws)
  cts = []
  for k, o in enumerate(outs):
    cts.append(gk[k].astype(o.dtype) if k in gk else jx.zero_cotangent(o.shape, o.dtype))
  return {j: cm.f32(r) for j, r in zip(use.p_pos, vjp(cts))}


def _masked(use, vals, gl, b):
  """``{j: [B, *W'_j]}``: the VJP at the full batch, once per example (masked)."""
  others = list(vals)

  def f(*wv):
    return jx.bind(use.eqn, _with_w(use, wv, others, False))

  outs, vjp = jax.vjp(f, *[vals[j] for j in use.p_pos])

  def one(idx):
    cts = []
    for k, o in enumerate(outs):
      if k in use.probe_pos:
        m = cm.example_mask(o.shape, use.out_info[k].spec, b, idx)
        cts.append(jnp.where(m, gl[k].astype(o.dtype), jnp.zeros((), o.dtype)))
      else:
        cts.append(jx.zero_cotangent(use.out_shapes[k], use.out_dtypes[k]))
    return {j: cm.f32(r) for j, r in zip(use.p_pos, vjp(cts))}

  return jax.vmap(one)(jnp.arange(b))


def _fronts(use, vals, gl, b):
  xs, shared = {}, {}
  for j, x in enumerate(vals):
    sp = use.in_info[j].spec
    if j in use.p_pos or not isinstance(sp, _trace.Spec):
      shared[j] = x
    else:
      xs[j] = cm.to_front(x, sp, b)
  gs = {k: cm.to_front(gl[k], use.out_info[k].spec, b) for k in use.probe_pos}
  return Fronts(xs, gs), Shared(shared)


def _rebind_all(use, fronts, shared):
  return jax.vmap(lambda xs, gk: _rebind_one(use, shared.vals, xs, gk))(
      fronts.xs, fronts.gs)


def per_example_grads(use, recs, gs, views, b):
  """{j: [B, *W'_j.shape]} float32, summed over the steps of enclosing scans."""
  mode = use.data.mode
  ns = len(use.stack)
  n_in = len(use.in_shapes)
  vals = [None] * n_in
  for j in use.p_pos:
    vals[j] = views[j]
  for j in range(n_in):
    if j not in use.p_pos:
      vals[j] = recs[j] if j in recs else use.literals.get(j)
  gl = {k: gs[k] for k in use.probe_pos}

  def step(vs, gk):
    if mode == "rebind":
      return _rebind_all(use, *_fronts(use, vs, gk, b))
    return _masked(use, vs, gk, b)

  if ns == 0:
    return step(vals, gl)
  steps = cm.steps_of(use)
  stacked = [j for j in range(n_in) if j not in use.p_pos and j in recs]
  xs_v = {j: vals[j].reshape((steps,) + vals[j].shape[ns:]) for j in stacked}
  xs_g = {k: g.reshape((steps,) + g.shape[ns:]) for k, g in gl.items()}
  init = {j: jnp.zeros((b,) + tuple(jnp.shape(vals[j])), cm.f32(vals[j]).dtype)
          for j in use.p_pos}

  def body(acc, x):
    xv, xg = x
    v = list(vals)
    for j in stacked:
      v[j] = xv[j]
    r = step(v, xg)
    return {j: acc[j] + r[j] for j in acc}, None

  acc, _ = lax.scan(body, init, (xs_v, xs_g))
  return acc


class PerOperation(Rule):
  """Rules whose only form is the per-example gradient of the one operation."""

  def canon(self, use, recs, gs, views, b):
    vw = {j: views[(use.uid, j)] for j in use.p_pos}
    if use.data.mode == "rebind" and not use.stack:
      vals = [None] * len(use.in_shapes)
      for j in use.p_pos:
        vals[j] = vw[j]
      for j in range(len(vals)):
        if j not in use.p_pos:
          vals[j] = recs[j] if j in recs else use.literals.get(j)
      fronts, shared = _fronts(use, vals, {k: gs[k] for k in use.probe_pos}, b)
      return cm.Canon(fronts, shared)
    return cm.Canon(per_example_grads(use, recs, gs, vw, b))

  def unit(self, group):
    return PerOperationUnit(self, [group])


@register_fallback
class Fallback(PerOperation):
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
    mode = "rebind" if (use.params_same and not jx.has_subprogram(use.eqn)) else "masked"
    if mode == "rebind" and any(isinstance(use.in_info[j].spec, _trace.Spec) and
                                use.in_info[j].spec.inner * use.in_info[j].spec.outer != 1
                                for j in use.rec_pos):
      mode = "masked"
    return FallbackData(needs=use.rec_pos, mode=mode)

  def name(self, use):
    return f"fallback: {use.prim}"


class PerOperationUnit(Unit):
  """One use on the per-operation path (such uses are never merged: no merge key)."""

  def forms(self, b):
    w = 0
    for u in self.groups[0].uses:
      w = max(w, sum(cm.size_of(u.w_shape(j)) for j in u.p_pos))
    return {PER_EXAMPLE: Cost(flops=2 * w, bytes=4 * w)}

  def per_example(self, c):
    if isinstance(c.ex, Fronts):
      return _rebind_all(self.groups[0].uses[0], c.ex, c.shared)
    return c.ex

  def split(self, raw):
    u0 = self.groups[0].uses[0]
    return {(u0.uid, j): x for j, x in raw.items()}
