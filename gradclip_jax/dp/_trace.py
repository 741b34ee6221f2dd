"""The traced program: tracing, example axes, parameter uses, and its interpreter.

:func:`analyse` traces ``loss_fn`` abstractly with ``jax.make_jaxpr`` at the batch
size ``B`` and at ``B + 1`` and walks the two programs side by side (they must have
the same equations). For every variable it knows:

* its *kind*: ``P`` (computed from parameters and constants only: a loop-invariant
  function of the parameters), ``V`` (varies with the data: depends on the batch, a
  loop carry or a scanned input) or ``C`` (a constant);
* whether it depends on the batch, and its *example axis*: the one axis whose size
  moved between the two traces. An axis that grew by ``k > 1`` holds ``outer x B x
  inner`` entries (``k = outer * inner``; e.g. ``[T, B, H] -> [T*B, H]``); its
  ``inner`` comes from the reshape that merged it, or from an operand with the same
  axis;
* whether it reaches the per-example losses (liveness).

A live equation that reads a ``P`` and a ``V`` operand is a *use* of parameters.
``pjit``/closed calls, ``checkpoint`` and ``custom_jvp_call`` are looked through
(their inner program is analysed in place), ``scan`` with parameters among its
constants is looked through with its body (the uses inside run once per step), and
every other use gets a rule from :mod:`gradclip_jax.dp._rules` by primitive, or the
per-operation fallback. A batch-dependent value that has no example axis (a
reduction or normalisation over the batch) or two (examples combined pairwise) is
refused with a ``ValueError`` naming the operation and its source line.

:func:`run_probes` evaluates the program equation by equation, adds a zero *probe*
to every output of every use, and returns the recorded operands of the uses (inside
a scan they become extra scan outputs, and the probes extra scanned inputs, stacked
over the steps). :func:`run_views` evaluates only the ``P`` part: the value each use
reads as its parameter operand ``W'`` (a function of the parameters whose VJP maps a
gradient of ``W'`` back to the parameter leaves).

Only public names are used: ``jax.make_jaxpr``, ``jax.extend.core`` (``Literal``,
``Jaxpr``, ``ClosedJaxpr``) and ``jax.extend.source_info_util``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax import lax
from jax.extend import core as jcore
from jax.extend import source_info_util
import numpy as np

P, V, C = "P", "V", "C"
#: An example-axis value meaning "the example axis could not be located".
UNKNOWN = "unknown"

#: Call-like primitives whose inner program is analysed in place.
INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "remat2",
                    "checkpoint", "custom_jvp_call"})
#: Parameter-only operations that map the gradient of their output to their input
#: without changing its norm (so a parameter read through them keeps the cheap norm).
ISOMETRIC = frozenset({"reshape", "transpose", "squeeze", "expand_dims",
                       "convert_element_type", "copy", "copy_p", "slice",
                       "dynamic_slice", "rev", "neg", "concatenate",
                       "reduce_precision", "optimization_barrier"})


class Unsupported(ValueError):
  """The ghost method cannot handle this program (``method="auto"`` then uses vmap)."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """The example axis of an array: ``axis`` holds ``outer * B * inner`` entries."""
  axis: int
  inner: int = 1
  outer: int = 1


@dataclasses.dataclass
class Info:
  kind: str
  batch: bool
  spec: Any            # Spec, None (no example axis) or UNKNOWN
  origin: frozenset    # parameter leaf indices a P value depends on
  iso: bool            # P value is an isometric view of distinct parameter leaves
  bsrc: Any = None     # P value broadcast over the batch: (source var, its Info, dims)
  perm: Any = None     # P value = transpose(one leaf, perm): its dim i is leaf dim perm[i]
  wstack: tuple = ()   # scan levels over which a P value varies (parameters scanned as xs)


_CONST = Info(C, False, None, frozenset(), True)


@dataclasses.dataclass
class Use:
  """One equation that reads parameters (``P`` operands) and data (``V`` operands)."""
  uid: int
  eqn: Any
  prim: str
  p_pos: tuple          # operand positions read as parameters (W')
  rec_pos: tuple        # operand positions recorded in the probe pass
  in_info: tuple        # Info per operand
  out_info: tuple       # Info per output
  probe_pos: tuple      # outputs that get a probe
  stack: tuple          # lengths of the enclosing scans, outermost first
  rule: Any = None      # the rule object (gradclip_jax.dp._rules)
  data: Any = None      # the rule's static data
  reason: str = ""      # why a use is on the fallback
  params_same: bool = True  # the equation's parameters do not depend on B
  where: str = ""       # source location, for messages
  scope_id: int = 0     # the program level it sits in (uses merge only within one)
  rec_key: dict = dataclasses.field(default_factory=dict)    # operand j -> record key
  # operand j -> (broadcast_dimensions, shape, example axis): W'_j is read broadcast over the batch;
  # the use's W'_j is the value before that broadcast_in_dim (src[j]).
  pre: dict = dataclasses.field(default_factory=dict)
  src: dict = dataclasses.field(default_factory=dict)
  probe_key: dict = dataclasses.field(default_factory=dict)  # output k -> probe key


@dataclasses.dataclass
class Scope:
  """The analysis of one program level (the top, a call body or a scan body)."""
  jaxpr: Any
  consts: list
  actions: list = dataclasses.field(default_factory=list)  # per equation
  uses: list = dataclasses.field(default_factory=list)     # all uses, nested included
  probe_at: dict = dataclasses.field(default_factory=dict)  # eqn index -> [(k, key)]
  probe_avals: dict = dataclasses.field(default_factory=dict)  # key -> (aval, stack)
  depth: int = 0       # number of enclosing scans (a scan body: its own level + 1)


@dataclasses.dataclass
class Plan:
  top: Scope
  uses: list
  n_params: int
  param_avals: list
  out_tree: Any
  b: int


# ------------------------------------------------------------------ small helpers


def _is_literal(v) -> bool:
  return isinstance(v, jcore.Literal)


def _shape(v):
  aval = v.aval
  return tuple(getattr(aval, "shape", ()))


def _is_float_aval(aval) -> bool:
  dt = getattr(aval, "dtype", None)
  if dt is None:
    return False
  try:
    return bool(np.issubdtype(dt, np.inexact))
  except TypeError:  # extended dtypes (PRNG keys)
    return False


def _inner(params):
  """(open jaxpr, consts) of a call-like equation's body."""
  j = params.get("jaxpr", params.get("call_jaxpr"))
  if isinstance(j, jcore.ClosedJaxpr):
    return j.jaxpr, list(j.consts)
  return j, []


def where_of(eqn) -> str:
  loc = source_info_util.summarize(eqn.source_info)
  stack = str(getattr(eqn.source_info, "name_stack", "") or "")
  parts = [p for p in (f"in {stack}" if stack else "", f"at {loc}" if loc else "") if p]
  return " ".join(parts)


def _same_params(p0, p1) -> bool:
  for k in set(p0) | set(p1):
    a, b = p0.get(k), p1.get(k)
    if isinstance(a, (jcore.ClosedJaxpr, jcore.Jaxpr)) or callable(a):
      return False
    try:
      if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not np.array_equal(a, b):
          return False
      elif a != b:
        return False
    except (TypeError, ValueError):  # incomparable: treat as depending on B
      return False
  return True


def _spec(shape0, shape1, b, guess) -> Any:
  """Example axis from the shapes at B and B + 1 (``guess(axis)`` -> (inner, outer))."""
  if len(shape0) != len(shape1):
    return UNKNOWN
  moved = [(ax, s1 - s0) for ax, (s0, s1) in enumerate(zip(shape0, shape1)) if s0 != s1]
  if not moved:
    return None
  if len(moved) > 1:
    return UNKNOWN
  ax, d = moved[0]
  if d <= 0 or shape0[ax] != d * b:
    return UNKNOWN
  if d == 1:
    return Spec(ax)
  io = guess(ax, shape0[ax], shape1[ax])
  if io is None or io[0] * io[1] != d:
    return UNKNOWN
  return Spec(ax, io[0], io[1])


# ----------------------------------------------------------------------- analysis


class _Analysis:
  """Walks the programs traced at B and B + 1 together (see the module docstring)."""

  def __init__(self, b, rules):
    self.b = b
    self.rules = rules
    self.uses = []

  # -- batch dependence only (for scan carries: a fixpoint)
  def batch_flow(self, jaxpr, in_batch):
    env = {}
    for v, bt in zip(jaxpr.invars, in_batch):
      env[v] = bt
    rd = lambda v: False if _is_literal(v) else env.get(v, False)  # noqa: E731
    for eqn in jaxpr.eqns:
      ins = [rd(v) for v in eqn.invars]
      name = eqn.primitive.name
      if name == "scan":
        outs = self._scan_batch(eqn, ins)
      elif name in INLINE:
        outs = self.batch_flow(_inner(eqn.params)[0], ins)
      else:
        outs = [any(ins)] * len(eqn.outvars)
      for v, bt in zip(eqn.outvars, outs):
        env[v] = bt
    return [rd(v) for v in jaxpr.outvars]

  def _scan_batch(self, eqn, ins):
    nc, ncar = eqn.params["num_consts"], eqn.params["num_carry"]
    body = eqn.params["jaxpr"].jaxpr
    carry = list(ins[nc:nc + ncar])
    for _ in range(len(carry) + 2):
      out = self.batch_flow(body, ins[:nc] + carry + ins[nc + ncar:])
      new = [a or b for a, b in zip(carry, out[:ncar])]
      if new == carry:
        break
      carry = new
    out = self.batch_flow(body, ins[:nc] + carry + ins[nc + ncar:])
    return carry + out[ncar:]

  # -- the full analysis of one level
  def scope(self, jaxpr, consts, jaxpr1, in_info, live_out, stack) -> Scope:
    sc = Scope(jaxpr, consts, depth=len(stack) - 1)
    if len(jaxpr.eqns) != len(jaxpr1.eqns) or len(jaxpr.invars) != len(jaxpr1.invars):
      raise Unsupported("loss_fn traces to different programs at batch sizes B and "
                        "B + 1 (Python control flow on the batch size?)")
    env = {}
    live = set(v for v, lv in zip(jaxpr.outvars, live_out) if lv and not _is_literal(v))
    eqn_live = [False] * len(jaxpr.eqns)
    for i in range(len(jaxpr.eqns) - 1, -1, -1):
      eqn = jaxpr.eqns[i]
      if any(v in live for v in eqn.outvars if not isinstance(v, jcore.DropVar)) or (
          eqn.effects):
        eqn_live[i] = True
        live.update(v for v in eqn.invars if not _is_literal(v))
    for v, info in zip(jaxpr.invars, in_info):
      env[v] = info
    for v, v1 in zip(jaxpr.constvars, jaxpr1.constvars):
      env[v] = Info(C, False, _spec(_shape(v), _shape(v1), self.b, lambda *a: None),
                    frozenset(), True)

    def rd(v):
      return _CONST if _is_literal(v) else env[v]

    direct = []
    for i, (eqn, eqn1) in enumerate(zip(jaxpr.eqns, jaxpr1.eqns)):
      name = eqn.primitive.name
      if name != eqn1.primitive.name or len(eqn.invars) != len(eqn1.invars) or len(
          eqn.outvars) != len(eqn1.outvars):
        raise Unsupported("loss_fn traces to different programs at batch sizes B and "
                          f"B + 1 ({name} against {eqn1.primitive.name})")
      ins = [rd(v) for v in eqn.invars]
      kinds = [x.kind for x in ins]
      batch_in = any(x.batch for x in ins)

      def guess(ax, s0, s1, eqn=eqn, eqn1=eqn1, ins=ins):
        return self._guess(eqn, eqn1, ins, ax, s0, s1)

      out_specs = [_spec(_shape(v), _shape(v1), self.b, guess)
                   for v, v1 in zip(eqn.outvars, eqn1.outvars)]
      if not eqn_live[i]:  # not needed for the losses (maybe for aux): evaluated as is
        sc.actions.append(("bind",))
        for v, s in zip(eqn.outvars, out_specs):
          env[v] = Info(V, batch_in, s, frozenset(), False)
        continue
      has_p = P in kinds
      has_v = V in kinds
      if not has_p:
        sc.actions.append(("bind",))
        if name == "scan":
          batch_out = self._scan_batch(eqn, [x.batch for x in ins])
        elif name in INLINE:
          batch_out = self.batch_flow(_inner(eqn.params)[0], [x.batch for x in ins])
        else:
          batch_out = [batch_in] * len(eqn.outvars)
        infos = [Info(V if has_v else C, bo, s, frozenset(), False)
                 for bo, s in zip(batch_out, out_specs)]
      elif not has_v:  # a function of parameters and constants only
        sc.actions.append(("bind",))
        origin = frozenset().union(*[x.origin for x in ins if x.kind == P])
        pins = [x for x in ins if x.kind == P]
        expand = name == "broadcast_in_dim" and int(np.prod(_shape(eqn.outvars[0]))) == (
            int(np.prod(_shape(eqn.invars[0])))) if name == "broadcast_in_dim" else False
        iso = ((name in ISOMETRIC or expand) and all(x.iso for x in pins)
               and sum(len(x.origin) for x in pins) == len(origin)
               and (name != "concatenate" or all(k == P for k in kinds)))
        if name == "convert_element_type" and not _is_float_aval(eqn.outvars[0].aval):
          iso = False
        wst = tuple(sorted(set().union(*[set(x.wstack) for x in pins])))
        infos = [Info(P, False, s, origin, iso, wstack=wst) for s in out_specs]
        if len(pins) == 1 and ins[0].kind == P and ins[0].perm is not None:
          if name in ("convert_element_type", "copy", "copy_p", "optimization_barrier"):
            infos[0].perm = ins[0].perm
          elif name == "transpose":
            infos[0].perm = tuple(ins[0].perm[d] for d in eqn.params["permutation"])
        if (name == "broadcast_in_dim" and isinstance(out_specs[0], Spec)
            and ins[0].kind == P and ins[0].spec is None):
          infos[0].bsrc = (eqn.invars[0], ins[0],
                           tuple(eqn.params["broadcast_dimensions"]))
      elif name in INLINE:
        inner, iconsts = _inner(eqn.params)
        inner1, _ = _inner(eqn1.params)
        child = self.scope(inner, iconsts, inner1, ins,
                           [v in live for v in eqn.outvars], stack)
        sc.actions.append(("inline", child))
        sc.uses.extend(child.uses)
        infos = child.out_info
      elif name == "scan" and all(
          k != P for k in kinds[eqn.params["num_consts"]:
                                eqn.params["num_consts"] + eqn.params["num_carry"]]) and all(
              x.spec is None for x in ins[eqn.params["num_consts"]:] if x.kind == P):
        infos = self._scan(sc, eqn, eqn1, ins, live, stack)
      else:
        infos = self._use(sc, eqn, eqn1, ins, out_specs, stack)
        direct.append(sc.actions[-1][1])
      for v, info in zip(eqn.outvars, infos):
        env[v] = info
      # Cross-example operations: refused.
      for v, info in zip(eqn.outvars, infos):
        if isinstance(v, jcore.DropVar) or v not in live or not info.batch:
          continue
        if info.spec is None or (info.spec == UNKNOWN and _two_axes(v, eqn1, eqn)):
          raise ValueError(
              f"clipped_grad(method='ghost'): the operation {name!r} "
              f"{where_of(eqn)} combines different examples of the batch (its result "
              f"{'has no' if info.spec is None else 'has two'} example axis) - e.g. "
              "BatchNorm with batch statistics, or a mean over the batch. Per-example "
              "gradients (and DP-SGD's sensitivity bound) are not defined for such a "
              "loss; normalise per example (LayerNorm/GroupNorm, BatchNorm with "
              "use_running_average=True) or reduce over the batch outside loss_fn")
    sc.out_info = [rd(v) for v in jaxpr.outvars]
    self._place_probes(sc, direct, stack)
    for child in sc.actions:
      if child[0] in ("inline", "scan"):
        sc.probe_avals.update(child[1].probe_avals)
    return sc

  def _place_probes(self, sc, direct, stack):
    """Probe keys of this level's uses; records keyed by variable (shared).

    A use's output that is only added (same shape) into one other value has that
    value's gradient: the probe moves forward through such ``add`` equations, so the
    two Dense layers of an LSTM gate (``W_x x + W_h h``) and a Dense and its bias
    share one probe.
    """
    jaxpr = sc.jaxpr
    producer, consumers = {}, {}
    for i, (eqn, act) in enumerate(zip(jaxpr.eqns, sc.actions)):
      if act[0] == "skip":
        continue
      for v in eqn.outvars:
        producer[v] = i
      for v in eqn.invars:
        if not _is_literal(v):
          consumers.setdefault(v, []).append(i)
    for v in jaxpr.outvars:
      if not _is_literal(v):
        consumers.setdefault(v, []).append(-1)
    for use in direct:
      for j in use.rec_pos:
        use.rec_key[j] = (id(sc), id(use.eqn.invars[j]))
      for k in use.probe_pos:
        v = use.eqn.outvars[k]
        while True:
          cs = consumers.get(v, [])
          if len(cs) != 1 or cs[0] < 0:
            break
          nxt = jaxpr.eqns[cs[0]]
          if (nxt.primitive.name not in ("add", "add_any")
              or sc.actions[cs[0]][0] not in ("bind", "use")
              or _shape(nxt.outvars[0]) != _shape(v)
              or nxt.outvars[0].aval.dtype != v.aval.dtype):
            break
          v = nxt.outvars[0]
        key = (id(sc), id(v))
        use.probe_key[k] = key
        if key not in sc.probe_avals:
          sc.probe_avals[key] = (v.aval, stack)
          i = producer[v]
          out_k = list(jaxpr.eqns[i].outvars).index(v)
          sc.probe_at.setdefault(i, []).append((out_k, key))

  def _guess(self, eqn, eqn1, ins, ax, s0, s1):
    """(inner, outer) of a merged example axis of an output of ``eqn``."""
    d = s1 - s0
    if eqn.primitive.name == "reshape" and ins and isinstance(ins[0].spec, Spec):
      sp = ins[0].spec
      s_in = _shape(eqn.invars[0])
      stride_b = sp.inner * int(np.prod(s_in[sp.axis + 1:], dtype=np.int64))
      s_out = _shape(eqn.outvars[0])
      stride_j = int(np.prod(s_out[ax + 1:], dtype=np.int64))
      if stride_j and stride_b % stride_j == 0:
        inner = stride_b // stride_j
        if inner >= 1 and d % inner == 0:
          return inner, d // inner
      return None
    for v, v1, x in zip(eqn.invars, eqn1.invars, ins):
      if isinstance(x.spec, Spec) and x.spec.inner * x.spec.outer == d:
        sh0, sh1 = _shape(v), _shape(v1)
        if len(sh0) > x.spec.axis and sh0[x.spec.axis] == s0 and sh1[x.spec.axis] == s1:
          return x.spec.inner, x.spec.outer
    return None

  def _scan(self, sc, eqn, eqn1, ins, live, stack):
    prm = eqn.params
    nc, ncar = prm["num_consts"], prm["num_carry"]
    body, bconsts = prm["jaxpr"].jaxpr, list(prm["jaxpr"].consts)
    body1 = eqn1.params["jaxpr"].jaxpr
    batch = self._scan_batch(eqn, [x.batch for x in ins])
    carry_b = batch[:ncar]
    b_in = []
    step_xs = []
    for j, (v, v1) in enumerate(zip(body.invars, body1.invars)):
      if j < nc:
        b_in.append(dataclasses.replace(ins[j], bsrc=None))
      elif j >= nc + ncar and ins[j].kind == P:  # parameters scanned over (per step)
        x = ins[j]
        step_xs.append(j)
        b_in.append(Info(P, False, None, x.origin, x.iso,
                         wstack=tuple(x.wstack) + (len(stack),)))
      else:
        outer = ins[j]
        hint = outer.spec

        def guess(ax, s0, s1, hint=hint, shift=0 if j < nc + ncar else 1):
          if isinstance(hint, Spec) and hint.axis - shift == ax:
            return hint.inner, hint.outer
          return None

        bt = carry_b[j - nc] if j < nc + ncar else outer.batch
        b_in.append(Info(V, bt, _spec(_shape(v), _shape(v1), self.b, guess),
                         frozenset(), False))
    live_body = [True] * ncar + [v in live for v in eqn.outvars[ncar:]]
    child = self.scope(body, bconsts, body1, b_in, live_body, stack + (prm["length"],))
    sc.actions.append(("scan", child, tuple(step_xs)))
    sc.uses.extend(child.uses)
    out = []
    for j, (v, v1) in enumerate(zip(eqn.outvars, eqn1.outvars)):
      inner = child.out_info[j]
      hint = inner.spec
      shift = 0 if j < ncar else 1

      def guess(ax, s0, s1, hint=hint, shift=shift):
        if isinstance(hint, Spec) and hint.axis + shift == ax:
          return hint.inner, hint.outer
        return None

      out.append(Info(V, batch[j], _spec(_shape(v), _shape(v1), self.b, guess),
                      frozenset(), False))
    return out

  def _use(self, sc, eqn, eqn1, ins, out_specs, stack):
    name = eqn.primitive.name
    p_pos = tuple(j for j, x in enumerate(ins) if x.kind == P)
    ins = list(ins)
    pre, src = {}, {}
    for j in p_pos:
      if ins[j].spec is not None and ins[j].bsrc is not None:
        var, info, dims = ins[j].bsrc
        pre[j] = (dims, _shape(eqn.invars[j]), ins[j].spec)
        src[j] = var
        ins[j] = info
    rec_pos = tuple(j for j, (v, x) in enumerate(zip(eqn.invars, ins))
                    if x.kind != P and not _is_literal(v))
    out_info = tuple(Info(V, True, s, frozenset(), False) for s in out_specs)
    probe_pos = tuple(k for k, v in enumerate(eqn.outvars)
                      if _is_float_aval(v.aval) and not isinstance(v, jcore.DropVar))
    use = Use(uid=len(self.uses), eqn=eqn, prim=name, p_pos=p_pos, rec_pos=rec_pos,
              in_info=tuple(ins), out_info=out_info, probe_pos=probe_pos, stack=stack,
              params_same=_same_params(eqn.params, eqn1.params), where=where_of(eqn),
              scope_id=id(sc), pre=pre, src=src)
    for k in probe_pos:
      if not isinstance(out_specs[k], Spec):
        raise Unsupported(f"the output of {name!r} {use.where}, which reads a "
                          "parameter, has no example axis that could be located")
    rule = self.rules.get(name)
    data = rule.match(use) if rule is not None else None
    if data is None:
      rule = self.rules["fallback"]
      data = rule.match(use)
    use.rule, use.data = rule, data
    self.uses.append(use)
    sc.uses.append(use)
    sc.actions.append(("use", use))
    return out_info


def _two_axes(v, eqn1, eqn) -> bool:
  k = list(eqn.outvars).index(v)
  s0, s1 = _shape(v), _shape(eqn1.outvars[k])
  return len(s0) == len(s1) and sum(a != b for a, b in zip(s0, s1)) > 1


def analyse(fn, params, batch, b, rules) -> Plan:
  """Traces ``fn(params, *batch) -> (losses, aux)`` at B and B + 1 and analyses it."""
  p_flat, p_tree = jax.tree.flatten(params)
  b_flat, b_tree = jax.tree.flatten(batch)
  sds = lambda x, lead=None: jax.ShapeDtypeStruct(  # noqa: E731
      (tuple(np.shape(x)) if lead is None else (lead,) + tuple(np.shape(x))[1:]),
      jax.numpy.result_type(x) if not hasattr(x, "dtype") else x.dtype)

  def flat_fn(*xs):
    p = jax.tree.unflatten(p_tree, xs[:len(p_flat)])
    bt = jax.tree.unflatten(b_tree, xs[len(p_flat):])
    return fn(p, *bt)

  avals0 = [sds(x) for x in p_flat] + [sds(x) for x in b_flat]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals0)
  avals1 = [sds(x) for x in p_flat] + [sds(x, b + 1) for x in b_flat]
  try:
    closed1 = jax.make_jaxpr(flat_fn)(*avals1)
  except Exception as e:  # pylint: disable=broad-except  # any failure of user code
    raise Unsupported(f"loss_fn could not be traced at batch size B + 1 = {b + 1} "
                      f"(needed to find the example axes): {type(e).__name__}: {e}"
                      ) from e
  an = _Analysis(b, rules)
  in_info = []
  for i, x in enumerate(p_flat):
    if _is_float_aval(jax.core.ShapedArray(np.shape(x), sds(x).dtype)):
      in_info.append(Info(P, False, None, frozenset([i]), True,
                          perm=tuple(range(np.ndim(x)))))
    else:
      in_info.append(_CONST)
  for v, v1 in zip(closed.jaxpr.invars[len(p_flat):], closed1.jaxpr.invars[len(p_flat):]):
    in_info.append(Info(V, True, _spec(_shape(v), _shape(v1), b, lambda *a: None),
                        frozenset(), False))
  n_out = len(closed.jaxpr.outvars)
  live_out = [True] + [False] * (n_out - 1)
  top = an.scope(closed.jaxpr, list(closed.consts), closed1.jaxpr, in_info, live_out, ())
  head = top.out_info[0]
  if head.kind != V or not head.batch:
    raise Unsupported("the per-example losses do not depend on the batch")
  if head.spec != Spec(0):
    raise Unsupported("the per-example losses have no example axis")
  return Plan(top=top, uses=an.uses, n_params=len(p_flat),
              param_avals=[sds(x) for x in p_flat],
              out_tree=jax.tree.structure(out_shape), b=b)


# -------------------------------------------------------------------- interpreter


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _eval(sc: Scope, invals, probes, records, views: bool):
  """Evaluates one level. ``views``: only the P/C part, storing each use's W'."""
  env = {}
  for v, x in zip(sc.jaxpr.constvars, sc.consts):
    env[v] = x
  for v, x in zip(sc.jaxpr.invars, invals):
    if x is not None:
      env[v] = x

  def rd(v):
    if _is_literal(v):
      return v.val
    return env.get(v)

  for i, (eqn, act) in enumerate(zip(sc.jaxpr.eqns, sc.actions)):
    kind = act[0]
    if kind == "skip":
      continue
    ins = [rd(v) for v in eqn.invars]
    if kind == "bind":
      if views and any(x is None for x in ins):
        continue
      outs = _bind(eqn, ins)
    elif kind == "inline":
      outs = _eval(act[1], ins, probes, records, views)
    elif kind == "scan":
      if views:
        _views_scan(eqn, act[1], act[2], ins, records)
        continue
      outs = _eval_scan(eqn, act[1], ins, probes, records)
    else:  # a use
      use = act[1]
      if views:
        for j in use.p_pos:
          records[(use.uid, j)] = env[use.src[j]] if j in use.src else ins[j]
        continue
      outs = _bind(eqn, ins)
      for j in use.rec_pos:
        if j in use.data.get("needs", use.rec_pos):
          records[use.rec_key[j]] = ins[j]
    if not views:
      for k, key in sc.probe_at.get(i, ()):
        outs[k] = outs[k] + probes[key].astype(outs[k].dtype)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar) and x is not None:
        env[v] = x
  return [rd(v) for v in sc.jaxpr.outvars]


def _views_scan(eqn, child, step_xs, ins, records):
  """W' of the uses inside a scan body; stacked over the steps where they vary."""
  nc = eqn.params["num_consts"]
  base = ins[:nc] + [None] * (len(ins) - nc)
  if not step_xs:
    _eval(child, base, {}, records, True)
    return
  def one(xs_vals):
    vals = list(base)
    for j, x in zip(step_xs, xs_vals):
      vals[j] = x
    recs = {}
    _eval(child, vals, {}, recs, True)
    return recs

  stacked = jax.vmap(one)([ins[j] for j in step_xs])
  depth = child.depth
  varying = {(u.uid, j) for u in child.uses for j in u.p_pos
             if depth in u.in_info[j].wstack}
  for k, x in stacked.items():
    records[k] = x if k in varying else x[0]


def _eval_scan(eqn, child, ins, probes, records):
  prm = eqn.params
  nc, ncar = prm["num_consts"], prm["num_carry"]
  consts, init, xs = ins[:nc], ins[nc:nc + ncar], ins[nc + ncar:]
  px = {k: probes[k] for k in child.probe_avals}

  def body(carry, x):
    xs_t, px_t = x
    recs = {}
    outs = _eval(child, list(consts) + list(carry) + list(xs_t), px_t, recs, False)
    return outs[:ncar], (outs[ncar:], recs)

  carry, (ys, recs) = lax.scan(body, list(init), (list(xs), px), length=prm["length"],
                               reverse=prm["reverse"], unroll=prm["unroll"])
  records.update(recs)
  return list(carry) + list(ys)


def probe_shapes(plan: Plan) -> dict:
  """{(uid, k): ShapeDtypeStruct} of every probe (stacked over enclosing scans)."""
  return {key: jax.ShapeDtypeStruct(tuple(stack) + tuple(aval.shape), aval.dtype)
          for key, (aval, stack) in plan.top.probe_avals.items()}


def run_probes(plan: Plan, p_flat, b_flat, probes):
  """(flat outputs, records) of the program with ``probes`` added to the uses."""
  records = {}
  outs = _eval(plan.top, list(p_flat) + list(b_flat), probes, records, False)
  return outs, records


def run_views(plan: Plan, p_flat) -> dict:
  """{(uid, j): W'} the parameter operand of every use, from the parameters only."""
  records = {}
  _eval(plan.top, list(p_flat) + [None] * (len(plan.top.jaxpr.invars) - len(p_flat)),
        {}, records, True)
  return records


def origin_of(use: Use, j: int) -> frozenset:
  return use.in_info[j].origin


def iso_of(use: Use, j: int) -> bool:
  return use.in_info[j].iso


def w_var(use: Use, j: int) -> Any:
  return use.eqn.invars[j]

