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
constants is looked through with its body (the uses inside run once per step),
``cond`` whose branch index is the same for every example is looked through with all
its branches (the untaken branches' uses record zeros), and every other use gets a
rule from :mod:`gradclip_jax.dp._rules` by primitive, or the per-operation fallback.
A batch-dependent value that has no example axis (a reduction or normalisation over
the batch) or two (examples combined pairwise) is refused with a ``ValueError``
naming the operation and its source line.

:func:`run_probes` evaluates the program equation by equation, adds a zero *probe*
to every output of every use, and returns the recorded operands of the uses (inside
a scan they become extra scan outputs, and the probes extra scanned inputs, stacked
over the steps). :func:`run_views` evaluates only the ``P`` part: the value each use
reads as its parameter operand ``W'`` (a function of the parameters whose VJP maps a
gradient of ``W'`` back to the parameter leaves).

JAX's program representation is read only through :mod:`gradclip_jax.dp._jaxpr`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from gradclip_jax.dp import _jaxpr as jx

P, V, C = "P", "V", "C"
#: An example-axis value meaning "the example axis could not be located".
UNKNOWN = "unknown"

_IDENTS = itertools.count()


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
  """What the analysis knows of one variable."""
  kind: str
  batch: bool
  spec: Any            # Spec, None (no example axis) or UNKNOWN
  origin: frozenset    # parameter leaf indices a P value depends on
  iso: bool            # P value is an isometric view of distinct parameter leaves
  bsrc: Any = None     # P value broadcast over the batch: a BroadcastSource
  perm: Any = None     # P value = transpose(one leaf, perm): its dim i is leaf dim perm[i]
  wstack: tuple = ()   # scan levels over which a P value varies (parameters scanned as xs)
  ident: Any = None    # P value: the same number wherever the same value is read


_CONST = Info(C, False, None, frozenset(), True)


class Broadcast(NamedTuple):
  """A parameter value broadcast over the batch before an elementwise use."""
  dims: tuple     # the broadcast_in_dim's broadcast_dimensions
  shape: tuple    # the shape it broadcasts to
  spec: Any       # the example axis of that shape


class BroadcastSource(NamedTuple):
  var: Any        # the parameter value before the broadcast
  info: Any       # its Info
  dims: tuple     # the broadcast_dimensions


class Probe(NamedTuple):
  aval: Any       # shape and dtype of the value the probe is added to
  stack: tuple    # lengths of the enclosing scans (the probe is stacked over them)


@dataclasses.dataclass
class Action:
  """What the interpreter does with one equation of a level."""
  kind: str                 # "bind", "use", "inline", "scan" or "cond"
  use: Any = None           # "use": the Use
  child: Any = None         # "inline", "scan": the Scope of the body
  children: tuple = ()      # "cond": the Scope of each branch
  step_xs: tuple = ()       # "scan": operands that are parameters scanned over


_BIND = Action("bind")


@dataclasses.dataclass
class Use:
  """One equation that reads parameters (``P`` operands) and data (``V`` operands).

  ``eqn`` is JAX's equation, an opaque handle for :mod:`gradclip_jax.dp._jaxpr`;
  the shapes and dtypes of its operands and outputs are copied here.
  """
  uid: int
  eqn: Any
  prim: str
  p_pos: tuple          # operand positions read as parameters (W')
  rec_pos: tuple        # operand positions recorded in the probe pass
  in_info: tuple        # Info per operand
  out_info: tuple       # Info per output
  probe_pos: tuple      # outputs that get a probe
  stack: tuple          # lengths of the enclosing scans, outermost first
  in_shapes: tuple = ()
  out_shapes: tuple = ()
  in_dtypes: tuple = ()
  out_dtypes: tuple = ()
  literals: dict = dataclasses.field(default_factory=dict)  # operand j -> its value
  rule: Any = None      # the rule object (gradclip_jax.dp._rules)
  data: Any = None      # the rule's static data (a NamedTuple with ``needs``)
  params_same: bool = True  # the equation's parameters do not depend on B
  where: str = ""       # source location, for messages
  scope_id: int = 0     # the program level it sits in
  rec_key: dict = dataclasses.field(default_factory=dict)    # operand j -> record key
  # operand j -> Broadcast: W'_j is read broadcast over the batch; the use's W'_j is
  # the value before that broadcast_in_dim (src[j]).
  pre: dict = dataclasses.field(default_factory=dict)
  src: dict = dataclasses.field(default_factory=dict)
  src_shapes: dict = dataclasses.field(default_factory=dict)  # operand j -> src shape
  probe_key: dict = dataclasses.field(default_factory=dict)  # output k -> probe key

  def w_ident(self, j: int) -> Any:
    """The identity of the parameter value ``W'_j`` (equal for equal values)."""
    return self.in_info[j].ident

  def w_shape(self, j: int) -> tuple:
    """The shape of ``W'_j`` as the use reads it (before a broadcast over the batch)."""
    return self.src_shapes.get(j, self.in_shapes[j])


@dataclasses.dataclass
class Scope:
  """The analysis of one program level (the top, a call body, a scan body, a branch)."""
  jaxpr: Any
  consts: list
  actions: list = dataclasses.field(default_factory=list)  # an Action per equation
  uses: list = dataclasses.field(default_factory=list)     # all uses, nested included
  probe_at: dict = dataclasses.field(default_factory=dict)  # eqn index -> [(k, key)]
  probe_avals: dict = dataclasses.field(default_factory=dict)  # key -> Probe
  depth: int = 0       # number of enclosing scans (a scan body: its own level + 1)
  out_info: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Plan:
  top: Scope
  uses: list
  n_params: int
  param_avals: list
  out_tree: Any
  b: int


# ------------------------------------------------------------------ small helpers


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


def _no_guess(*_):
  return None


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
    for v, bt in zip(jx.invars(jaxpr), in_batch):
      env[v] = bt
    rd = lambda v: False if jx.is_literal(v) else env.get(v, False)  # noqa: E731
    for eqn in jx.eqns(jaxpr):
      ins = [rd(v) for v in jx.ins(eqn)]
      name = jx.name(eqn)
      if name == jx.SCAN:
        outs = self._scan_batch(eqn, ins)
      elif name in jx.INLINE:
        outs = self.batch_flow(jx.inner(eqn).jaxpr, ins)
      else:
        outs = [any(ins)] * len(jx.outs(eqn))
      for v, bt in zip(jx.outs(eqn), outs):
        env[v] = bt
    return [rd(v) for v in jx.outvars(jaxpr)]

  def _scan_batch(self, eqn, ins):
    sc = jx.scan(eqn)
    nc, ncar = sc.num_consts, sc.num_carry
    carry = list(ins[nc:nc + ncar])
    for _ in range(len(carry) + 2):
      out = self.batch_flow(sc.body.jaxpr, ins[:nc] + carry + ins[nc + ncar:])
      new = [a or b for a, b in zip(carry, out[:ncar])]
      if new == carry:
        break
      carry = new
    out = self.batch_flow(sc.body.jaxpr, ins[:nc] + carry + ins[nc + ncar:])
    return carry + out[ncar:]

  # -- the full analysis of one level
  def scope(self, prog, prog1, in_info, live_out, stack) -> Scope:
    jaxpr, jaxpr1 = prog.jaxpr, prog1.jaxpr
    sc = Scope(jaxpr, prog.consts, depth=len(stack) - 1)
    e0, e1 = jx.eqns(jaxpr), jx.eqns(jaxpr1)
    if len(e0) != len(e1) or len(jx.invars(jaxpr)) != len(jx.invars(jaxpr1)):
      raise Unsupported("loss_fn traces to different programs at batch sizes B and "
                        "B + 1 (Python control flow on the batch size?)")
    env = {}
    live = set(v for v, lv in zip(jx.outvars(jaxpr), live_out)
               if lv and not jx.is_literal(v))
    eqn_live = [False] * len(e0)
    for i in range(len(e0) - 1, -1, -1):
      eqn = e0[i]
      if any(v in live for v in jx.outs(eqn) if not jx.is_dropped(v)) or (
          jx.has_effects(eqn)):
        eqn_live[i] = True
        live.update(v for v in jx.ins(eqn) if not jx.is_literal(v))
    for v, info in zip(jx.invars(jaxpr), in_info):
      env[v] = info
    for v, v1 in zip(jx.constvars(jaxpr), jx.constvars(jaxpr1)):
      env[v] = Info(C, False, _spec(jx.shape(v), jx.shape(v1), self.b, _no_guess),
                    frozenset(), True)

    def rd(v):
      return _CONST if jx.is_literal(v) else env[v]

    direct = []
    for i, (eqn, eqn1) in enumerate(zip(e0, e1)):
      name = jx.name(eqn)
      if name != jx.name(eqn1) or len(jx.ins(eqn)) != len(jx.ins(eqn1)) or len(
          jx.outs(eqn)) != len(jx.outs(eqn1)):
        raise Unsupported("loss_fn traces to different programs at batch sizes B and "
                          f"B + 1 ({name} against {jx.name(eqn1)})")
      ins = [rd(v) for v in jx.ins(eqn)]
      kinds = [x.kind for x in ins]
      batch_in = any(x.batch for x in ins)

      def guess(ax, s0, s1, eqn=eqn, eqn1=eqn1, ins=ins):
        return self._guess(eqn, eqn1, ins, ax, s0, s1)

      out_specs = [_spec(jx.shape(v), jx.shape(v1), self.b, guess)
                   for v, v1 in zip(jx.outs(eqn), jx.outs(eqn1))]
      if not eqn_live[i]:  # not needed for the losses (maybe for aux): evaluated as is
        sc.actions.append(_BIND)
        for v, s in zip(jx.outs(eqn), out_specs):
          env[v] = Info(V, batch_in, s, frozenset(), False)
        continue
      has_p = P in kinds
      has_v = V in kinds
      if not has_p:
        sc.actions.append(_BIND)
        if name == jx.SCAN:
          batch_out = self._scan_batch(eqn, [x.batch for x in ins])
        elif name in jx.INLINE:
          batch_out = self.batch_flow(jx.inner(eqn).jaxpr, [x.batch for x in ins])
        else:
          batch_out = [batch_in] * len(jx.outs(eqn))
        infos = [Info(V if has_v else C, bo, s, frozenset(), False)
                 for bo, s in zip(batch_out, out_specs)]
      elif not has_v:  # a function of parameters and constants only
        sc.actions.append(_BIND)
        infos = self._p_only(eqn, ins, kinds, out_specs)
      elif name in jx.INLINE:
        child = self.scope(jx.inner(eqn), jx.inner(eqn1), ins,
                           [v in live for v in jx.outs(eqn)], stack)
        sc.actions.append(Action("inline", child=child))
        sc.uses.extend(child.uses)
        infos = child.out_info
      elif name == jx.SCAN and self._scan_ok(eqn, ins):
        infos = self._scan(sc, eqn, eqn1, ins, live, stack)
      elif name == jx.COND and not ins[0].batch:
        infos = self._cond(sc, eqn, eqn1, ins, out_specs, live, stack)
      else:
        infos = self._use(sc, eqn, eqn1, ins, out_specs, stack)
        direct.append(sc.actions[-1].use)
      for v, info in zip(jx.outs(eqn), infos):
        env[v] = info
      # Cross-example operations: refused.
      for v, info in zip(jx.outs(eqn), infos):
        if jx.is_dropped(v) or v not in live or not info.batch:
          continue
        if info.spec is None or (info.spec == UNKNOWN and _two_axes(v, eqn1, eqn)):
          raise ValueError(
              f"clipped_grad(method='ghost'): the operation {name!r} "
              f"{jx.where(eqn)} combines different examples of the batch (its result "
              f"{'has no' if info.spec is None else 'has two'} example axis) - e.g. "
              "BatchNorm with batch statistics, or a mean over the batch. Per-example "
              "gradients (and DP-SGD's sensitivity bound) are not defined for such a "
              "loss; normalise per example (LayerNorm/GroupNorm, BatchNorm with "
              "use_running_average=True) or reduce over the batch outside loss_fn")
    sc.out_info = [rd(v) for v in jx.outvars(jaxpr)]
    self._place_probes(sc, direct, stack)
    for act in sc.actions:
      for child in ((act.child,) if act.child is not None else ()) + act.children:
        sc.probe_avals.update(child.probe_avals)
    return sc

  def _p_only(self, eqn, ins, kinds, out_specs):
    """Infos of the outputs of a parameter-only equation."""
    name = jx.name(eqn)
    origin = frozenset().union(*[x.origin for x in ins if x.kind == P])
    pins = [x for x in ins if x.kind == P]
    outs = jx.outs(eqn)
    expand = (name == jx.BROADCAST
              and jx.size(outs[0]) == jx.size(jx.ins(eqn)[0]))
    iso = ((name in jx.ISOMETRIC or expand) and all(x.iso for x in pins)
           and sum(len(x.origin) for x in pins) == len(origin)
           and (name != jx.CONCATENATE or all(k == P for k in kinds)))
    if name == jx.CONVERT and not jx.is_float(outs[0]):
      iso = False
    wst = tuple(sorted(set().union(*[set(x.wstack) for x in pins])))
    infos = [Info(P, False, s, origin, iso, wstack=wst, ident=next(_IDENTS))
             for s in out_specs]
    if len(pins) == 1 and ins[0].kind == P and ins[0].perm is not None:
      if name in jx.SAME_AXES:
        infos[0].perm = ins[0].perm
      elif name == jx.TRANSPOSE:
        infos[0].perm = tuple(ins[0].perm[d] for d in jx.permutation(eqn))
    if (name == jx.BROADCAST and isinstance(out_specs[0], Spec)
        and ins[0].kind == P and ins[0].spec is None):
      infos[0].bsrc = BroadcastSource(jx.ins(eqn)[0], ins[0], jx.broadcast_dimensions(eqn))
    return infos

  @staticmethod
  def _split_pair(sc, v, eq, producer, consumers):
    """The outputs of the piecewise sums when ``v`` is split and each piece is only
    added to the same piece of another value split alike, else ``None``.

    Both values then have the gradient ``concatenate(g(sum_j))``: one probe serves
    both (whichever is placed first), keyed by the first sum so that either value
    finds it.
    """
    cs = consumers.get(v, [])
    if len(cs) != 1 or cs[0] < 0 or jx.name(eq[cs[0]]) != jx.SPLIT:
      return None
    split = eq[cs[0]]
    if sc.actions[cs[0]].kind not in ("bind", "use") or len(jx.ins(split)) != 1:
      return None
    sums, others, adds = [], [], []
    for piece in jx.outs(split):
      pcs = consumers.get(piece, [])
      if len(pcs) != 1 or pcs[0] < 0:
        return None
      add = eq[pcs[0]]
      if (jx.name(add) not in jx.ADDS or sc.actions[pcs[0]].kind not in ("bind", "use")
          or len(jx.ins(add)) != 2):
        return None
      other = [w for w in jx.ins(add) if w is not piece]
      out = jx.outs(add)[0]
      if (len(other) != 1 or jx.is_literal(other[0])
          or jx.shape(other[0]) != jx.shape(piece) or jx.shape(out) != jx.shape(piece)
          or jx.dtype(out) != jx.dtype(piece)):
        return None
      sums.append(out)
      others.append(other[0])
      adds.append(pcs[0])
    # The other pieces: all outputs, in order, of one split alike of a value of v's
    # shape and dtype.
    j = producer.get(others[0])
    if (j is None or j == cs[0] or jx.name(eq[j]) != jx.SPLIT
        or list(jx.outs(eq[j])) != others
        or jx.split_layout(eq[j]) != jx.split_layout(split)):
      return None
    u = jx.ins(eq[j])[0]
    if (jx.is_literal(u) or jx.shape(u) != jx.shape(v) or jx.dtype(u) != jx.dtype(v)
        or len(consumers.get(u, [])) != 1 or sc.actions[j].kind not in ("bind", "use")
        or any(consumers.get(w, []) != [a] for w, a in zip(others, adds))):
      return None
    return sums[0]

  def _place_probes(self, sc, direct, stack):
    """Probe keys of this level's uses; records keyed by variable (shared).

    A use's output that is only added (same shape) into one other value has that
    value's gradient: the probe moves forward through such ``add`` equations, so the
    two Dense layers of an LSTM gate (``W_x x + W_h h``) and a Dense and its bias
    share one probe. Two outputs that are split alike and added piece by piece
    (``split(W_x x)[j] + split(W_h h)[j]``, Flax's ``OptimizedLSTMCell``) have the same
    gradient too, and share one probe as well.
    """
    jaxpr = sc.jaxpr
    eq = jx.eqns(jaxpr)
    producer, consumers = {}, {}
    for i, eqn in enumerate(eq):
      for v in jx.outs(eqn):
        producer[v] = i
      for v in jx.ins(eqn):
        if not jx.is_literal(v):
          consumers.setdefault(v, []).append(i)
    for v in jx.outvars(jaxpr):
      if not jx.is_literal(v):
        consumers.setdefault(v, []).append(-1)
    for use in direct:
      for j in use.rec_pos:
        use.rec_key[j] = (id(sc), id(jx.ins(use.eqn)[j]))
      for k in use.probe_pos:
        v = jx.outs(use.eqn)[k]
        while True:
          cs = consumers.get(v, [])
          if len(cs) != 1 or cs[0] < 0:
            break
          nxt = eq[cs[0]]
          nout = jx.outs(nxt)[0]
          if (jx.name(nxt) not in jx.ADDS
              or sc.actions[cs[0]].kind not in ("bind", "use")
              or jx.shape(nout) != jx.shape(v) or jx.dtype(nout) != jx.dtype(v)):
            break
          v = nout
        key = (id(sc), id(v))
        paired = self._split_pair(sc, v, eq, producer, consumers)
        if paired is not None:  # negative: never the id of a variable
          key = (id(sc), -id(paired))
        use.probe_key[k] = key
        if key not in sc.probe_avals:
          sc.probe_avals[key] = Probe(jx.shaped(jx.shape(v), jx.dtype(v)), stack)
          i = producer[v]
          out_k = jx.outs(eq[i]).index(v)
          sc.probe_at.setdefault(i, []).append((out_k, key))

  def _guess(self, eqn, eqn1, ins, ax, s0, s1):
    """(inner, outer) of a merged example axis of an output of ``eqn``."""
    d = s1 - s0
    if jx.name(eqn) == "reshape" and ins and isinstance(ins[0].spec, Spec):
      sp = ins[0].spec
      s_in = jx.shape(jx.ins(eqn)[0])
      stride_b = sp.inner * int(np.prod(s_in[sp.axis + 1:], dtype=np.int64))
      s_out = jx.shape(jx.outs(eqn)[0])
      stride_j = int(np.prod(s_out[ax + 1:], dtype=np.int64))
      if stride_j and stride_b % stride_j == 0:
        inner = stride_b // stride_j
        if inner >= 1 and d % inner == 0:
          return inner, d // inner
      return None
    for v, v1, x in zip(jx.ins(eqn), jx.ins(eqn1), ins):
      if isinstance(x.spec, Spec) and x.spec.inner * x.spec.outer == d:
        sh0, sh1 = jx.shape(v), jx.shape(v1)
        if len(sh0) > x.spec.axis and sh0[x.spec.axis] == s0 and sh1[x.spec.axis] == s1:
          return x.spec.inner, x.spec.outer
    return None

  @staticmethod
  def _scan_ok(eqn, ins) -> bool:
    """A scan looked through: no parameter in its carry, none scanned with an example axis."""
    s = jx.scan(eqn)
    kinds = [x.kind for x in ins]
    return (all(k != P for k in kinds[s.num_consts:s.num_consts + s.num_carry])
            and all(x.spec is None for x in ins[s.num_consts:] if x.kind == P))

  def _scan(self, sc, eqn, eqn1, ins, live, stack):
    s, s1 = jx.scan(eqn), jx.scan(eqn1)
    nc, ncar = s.num_consts, s.num_carry
    batch = self._scan_batch(eqn, [x.batch for x in ins])
    carry_b = batch[:ncar]
    b_in = []
    step_xs = []
    for j, (v, v1) in enumerate(zip(jx.invars(s.body.jaxpr), jx.invars(s1.body.jaxpr))):
      if j < nc:
        b_in.append(dataclasses.replace(ins[j], bsrc=None))
      elif j >= nc + ncar and ins[j].kind == P:  # parameters scanned over (per step)
        x = ins[j]
        step_xs.append(j)
        b_in.append(Info(P, False, None, x.origin, x.iso,
                         wstack=tuple(x.wstack) + (len(stack),), ident=x.ident))
      else:
        outer = ins[j]
        hint = outer.spec

        def guess(ax, s0, s1_, hint=hint, shift=0 if j < nc + ncar else 1):
          del s0, s1_
          if isinstance(hint, Spec) and hint.axis - shift == ax:
            return hint.inner, hint.outer
          return None

        bt = carry_b[j - nc] if j < nc + ncar else outer.batch
        b_in.append(Info(V, bt, _spec(jx.shape(v), jx.shape(v1), self.b, guess),
                         frozenset(), False))
    outs = jx.outs(eqn)
    live_body = [True] * ncar + [v in live for v in outs[ncar:]]
    child = self.scope(s.body, s1.body, b_in, live_body, stack + (s.length,))
    sc.actions.append(Action("scan", child=child, step_xs=tuple(step_xs)))
    sc.uses.extend(child.uses)
    out = []
    for j, (v, v1) in enumerate(zip(outs, jx.outs(eqn1))):
      hint = child.out_info[j].spec
      shift = 0 if j < ncar else 1

      def guess(ax, s0, s1_, hint=hint, shift=shift):
        del s0, s1_
        if isinstance(hint, Spec) and hint.axis + shift == ax:
          return hint.inner, hint.outer
        return None

      out.append(Info(V, batch[j], _spec(jx.shape(v), jx.shape(v1), self.b, guess),
                      frozenset(), False))
    return out

  def _cond(self, sc, eqn, eqn1, ins, out_specs, live, stack):
    """A ``cond`` whose branch index is the same for all examples: every branch."""
    live_out = [v in live for v in jx.outs(eqn)]
    children = []
    for br, br1 in zip(jx.cond_branches(eqn), jx.cond_branches(eqn1)):
      children.append(self.scope(br, br1, ins[1:], live_out, stack))
    sc.actions.append(Action("cond", children=tuple(children)))
    for child in children:
      sc.uses.extend(child.uses)
    out = []
    for k, s in enumerate(out_specs):
      infos = [child.out_info[k] for child in children]
      kind = V if any(x.kind == V for x in infos) else (
          P if any(x.kind == P for x in infos) else C)
      batch = any(x.batch for x in infos)
      if kind == P:  # a parameter value chosen at run time: not a fixed view
        origin = frozenset().union(*[x.origin for x in infos])
        out.append(Info(P, False, s, origin, False, ident=next(_IDENTS)))
      else:
        out.append(Info(kind, batch, s, frozenset(), False))
    return out

  def _use(self, sc, eqn, eqn1, ins, out_specs, stack):
    name = jx.name(eqn)
    eins, eouts = jx.ins(eqn), jx.outs(eqn)
    p_pos = tuple(j for j, x in enumerate(ins) if x.kind == P)
    ins = list(ins)
    pre, src, src_shapes = {}, {}, {}
    for j in p_pos:
      if ins[j].spec is not None and ins[j].bsrc is not None:
        bs = ins[j].bsrc
        pre[j] = Broadcast(bs.dims, jx.shape(eins[j]), ins[j].spec)
        src[j] = bs.var
        src_shapes[j] = jx.shape(bs.var)
        ins[j] = bs.info
    rec_pos = tuple(j for j, (v, x) in enumerate(zip(eins, ins))
                    if x.kind != P and not jx.is_literal(v))
    out_info = tuple(Info(V, True, s, frozenset(), False) for s in out_specs)
    probe_pos = tuple(k for k, v in enumerate(eouts)
                      if jx.is_float(v) and not jx.is_dropped(v))
    use = Use(uid=len(self.uses), eqn=eqn, prim=name, p_pos=p_pos, rec_pos=rec_pos,
              in_info=tuple(ins), out_info=out_info, probe_pos=probe_pos, stack=stack,
              in_shapes=tuple(jx.shape(v) for v in eins),
              out_shapes=tuple(jx.shape(v) for v in eouts),
              in_dtypes=tuple(jx.dtype(v) for v in eins),
              out_dtypes=tuple(jx.dtype(v) for v in eouts),
              literals={j: jx.literal_value(v) for j, v in enumerate(eins)
                        if jx.is_literal(v)},
              params_same=jx.same_params(eqn, eqn1), where=jx.where(eqn),
              scope_id=id(sc), pre=pre, src=src, src_shapes=src_shapes)
    for k in probe_pos:
      if not isinstance(out_specs[k], Spec):
        raise Unsupported(f"the output of {name!r} {use.where}, which reads a "
                          "parameter, has no example axis that could be located")
    rule, data = self.rules.match(use)
    use.rule, use.data = rule, data
    self.uses.append(use)
    sc.uses.append(use)
    sc.actions.append(Action("use", use=use))
    return out_info


def _two_axes(v, eqn1, eqn) -> bool:
  k = jx.outs(eqn).index(v)
  s0, s1 = jx.shape(v), jx.shape(jx.outs(eqn1)[k])
  return len(s0) == len(s1) and sum(a != b for a, b in zip(s0, s1)) > 1


def analyse(fn, params, batch, b, rules) -> Plan:
  """Traces ``fn(params, *batch) -> (losses, aux)`` at B and B + 1 and analyses it.

  ``rules.match(use) -> (rule, data)`` gives each use its rule (the registry of
  :mod:`gradclip_jax.dp._rules`).
  """
  p_flat, p_tree = jax.tree.flatten(params)
  b_flat, b_tree = jax.tree.flatten(batch)

  def sds(x, lead=None):
    shp = tuple(np.shape(x)) if lead is None else (lead,) + tuple(np.shape(x))[1:]
    return jx.shaped(shp, x.dtype if hasattr(x, "dtype") else jnp.result_type(x))

  def flat_fn(*xs):
    p = jax.tree.unflatten(p_tree, xs[:len(p_flat)])
    bt = jax.tree.unflatten(b_tree, xs[len(p_flat):])
    return fn(p, *bt)

  prog, out_shape = jx.trace(flat_fn, *([sds(x) for x in p_flat]
                                        + [sds(x) for x in b_flat]))
  try:
    prog1, _ = jx.trace(flat_fn, *([sds(x) for x in p_flat]
                                   + [sds(x, b + 1) for x in b_flat]))
  except Exception as e:  # pylint: disable=broad-except  # any failure of user code
    raise Unsupported(f"loss_fn could not be traced at batch size B + 1 = {b + 1} "
                      f"(needed to find the example axes): {type(e).__name__}: {e}"
                      ) from e
  an = _Analysis(b, rules)
  in_info = []
  for i, x in enumerate(p_flat):
    if jx.is_float_dtype(sds(x).dtype):
      in_info.append(Info(P, False, None, frozenset([i]), True,
                          perm=tuple(range(np.ndim(x))), ident=next(_IDENTS)))
    else:
      in_info.append(_CONST)
  vin = jx.invars(prog.jaxpr)[len(p_flat):]
  vin1 = jx.invars(prog1.jaxpr)[len(p_flat):]
  for v, v1 in zip(vin, vin1):
    in_info.append(Info(V, True, _spec(jx.shape(v), jx.shape(v1), b, _no_guess),
                        frozenset(), False))
  n_out = len(jx.outvars(prog.jaxpr))
  live_out = [True] + [False] * (n_out - 1)
  top = an.scope(prog, prog1, in_info, live_out, ())
  head = top.out_info[0]
  if head.kind != V or not head.batch:
    raise Unsupported("the per-example losses do not depend on the batch")
  if head.spec != Spec(0):
    raise Unsupported("the per-example losses have no example axis")
  return Plan(top=top, uses=an.uses, n_params=len(p_flat),
              param_avals=[sds(x) for x in p_flat],
              out_tree=jax.tree.structure(out_shape), b=b)


# -------------------------------------------------------------------- interpreter


def _eval(sc: Scope, invals, probes, records, views: bool):
  """Evaluates one level. ``views``: only the P/C part, storing each use's W'."""
  env = {}
  for v, x in zip(jx.constvars(sc.jaxpr), sc.consts):
    env[v] = x
  for v, x in zip(jx.invars(sc.jaxpr), invals):
    if x is not None:
      env[v] = x

  def rd(v):
    if jx.is_literal(v):
      return jx.literal_value(v)
    return env.get(v)

  for i, (eqn, act) in enumerate(zip(jx.eqns(sc.jaxpr), sc.actions)):
    kind = act.kind
    ins = [rd(v) for v in jx.ins(eqn)]
    if kind == "bind":
      if views and any(x is None for x in ins):
        continue
      outs = jx.bind(eqn, ins)
    elif kind == "inline":
      outs = _eval(act.child, ins, probes, records, views)
    elif kind == "scan":
      if views:
        _views_scan(eqn, act.child, act.step_xs, ins, records)
        continue
      outs = _eval_scan(eqn, act.child, ins, probes, records)
    elif kind == "cond":
      if views:
        for child in act.children:
          _eval(child, ins[1:], {}, records, True)
        continue
      outs = _eval_cond(act.children, ins, probes, records)
    else:  # a use
      use = act.use
      if views:
        for j in use.p_pos:
          records[(use.uid, j)] = env[use.src[j]] if j in use.src else ins[j]
        continue
      outs = jx.bind(eqn, ins)
      for j in use.rec_pos:
        if j in use.data.needs:
          records[use.rec_key[j]] = ins[j]
    if not views:
      for k, key in sc.probe_at.get(i, ()):
        outs[k] = outs[k] + probes[key].astype(outs[k].dtype)
    for v, x in zip(jx.outs(eqn), outs):
      if not jx.is_dropped(v) and x is not None:
        env[v] = x
  return [rd(v) for v in jx.outvars(sc.jaxpr)]


def _views_scan(eqn, child, step_xs, ins, records):
  """W' of the uses inside a scan body; stacked over the steps where they vary."""
  nc = jx.scan(eqn).num_consts
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
  s = jx.scan(eqn)
  nc, ncar = s.num_consts, s.num_carry
  consts, init, xs = ins[:nc], ins[nc:nc + ncar], ins[nc + ncar:]
  px = {k: probes[k] for k in child.probe_avals}

  def body(carry, x):
    xs_t, px_t = x
    recs = {}
    outs = _eval(child, list(consts) + list(carry) + list(xs_t), px_t, recs, False)
    return outs[:ncar], (outs[ncar:], recs)

  carry, (ys, recs) = lax.scan(body, list(init), (list(xs), px), length=s.length,
                               reverse=s.reverse, unroll=s.unroll)
  records.update(recs)
  return list(carry) + list(ys)


def _eval_cond(children, ins, probes, records):
  """``lax.switch`` over the branches; each returns every branch's records (zeros
  for the branches not taken), so the untaken uses contribute exactly zero."""
  index, ops = ins[0], list(ins[1:])

  def branch(child):
    def run(ops_):
      recs = {}
      outs = _eval(child, list(ops_), probes, recs, False)
      return outs, recs
    return run

  shapes = [jax.eval_shape(branch(child), ops) for child in children]
  keys = {}
  for _, recs in shapes:
    for k, s in recs.items():
      keys[k] = s

  def padded(child):
    run = branch(child)

    def fn(ops_):
      outs, recs = run(ops_)
      return outs, {k: recs[k] if k in recs else jnp.zeros(s.shape, s.dtype)
                    for k, s in keys.items()}
    return fn

  outs, recs = lax.switch(index, [padded(child) for child in children], ops)
  records.update(recs)
  return list(outs)


def probe_shapes(plan: Plan) -> dict:
  """{key: ShapeDtypeStruct} of every probe (stacked over enclosing scans)."""
  return {key: jx.shaped(tuple(p.stack) + tuple(p.aval.shape), p.aval.dtype)
          for key, p in plan.top.probe_avals.items()}


def run_probes(plan: Plan, p_flat, b_flat, probes):
  """(flat outputs, records) of the program with ``probes`` added to the uses."""
  records = {}
  outs = _eval(plan.top, list(p_flat) + list(b_flat), probes, records, False)
  return outs, records


def run_views(plan: Plan, p_flat) -> dict:
  """{(uid, j): W'} the parameter operand of every use, from the parameters only."""
  records = {}
  n_in = len(jx.invars(plan.top.jaxpr))
  _eval(plan.top, list(p_flat) + [None] * (n_in - len(p_flat)), {}, records, True)
  return records


def origin_of(use: Use, j: int) -> frozenset:
  return use.in_info[j].origin


def iso_of(use: Use, j: int) -> bool:
  return use.in_info[j].iso
