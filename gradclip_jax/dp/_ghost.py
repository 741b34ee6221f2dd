"""``clipped_grad``: the sum of per-example clipped gradients, by vmap or ghost norms.

Loss-reduction convention
-------------------------
``loss_fn(params, *batch)`` returns a vector of ``B`` *per-example* losses (no mean,
no sum over the batch); every leaf of every ``batch`` argument has the batch axis
first. The result is ``sum_b min(1, C / n_b) * grad(loss_b)``, with ``n_b`` the L2
norm of example ``b``'s gradient, divided by ``normalize_by`` when given. If you
would train with the *mean* loss, do not average inside ``loss_fn``: pass
``normalize_by=B`` (the expected batch size under Poisson sampling) instead, so
that ``C`` bounds each example's contribution before the division. A loss that is
itself averaged over tokens of one example (per-sequence loss) is fine: that is
part of the example's loss.

Methods
-------
``"vmap"``: ``jax.vmap(jax.grad(loss_b))`` over microbatches of ``microbatch_size``
(the reference; holds ``microbatch_size`` gradient trees at once).

``"ghost"``: exact per-example norms without per-example gradients of the large
layers (Goodfellow 2015; Lee & Kifer 2021; Li et al. 2022; Bu et al. 2022). The
loss runs once under ``flax.linen.intercept_methods``: every covered layer call
records its input and adds a zero "probe" to its output; one backward pass of the
summed loss gives every probe's gradient, i.e. each layer's output gradient per
example. Per layer the squared per-example gradient norm is then computed exactly:

* ``nn.Dense`` / ``nn.DenseGeneral`` (``batch_dims=()``), also when called several
  times (the calls are concatenated along the position axis) and inside the cells
  of ``nn.RNN`` (``LSTMCell``, ``GRUCell``, ``SimpleCell``, ``MGUCell``: their
  per-step inputs and probe gradients are carried through the scan): with ``T``
  positions per example, the Gram form ``sum_{t,s} (a_t.a_s)(g_t.g_s)`` when
  ``T^2 <= d_in d_out``, else the direct ``||sum_t a_t g_t^T||^2``; bias
  ``||sum_t g_t||^2``.
* ``nn.Embed`` (``__call__``): segment sums of the output gradients over each
  example's sorted token ids; no ``V x d`` per-example matrix is ever built.
* any other leaf module (all of whose parameters are its own, e.g. ``nn.Conv``
  1-D/2-D, ``nn.LayerNorm``, ``nn.BatchNorm`` with running averages, custom
  modules): the per-example gradient of *that layer only*, from the recorded
  input and output gradient (``vmap`` of the layer's own VJP; memory
  ``B x |layer params|``).
* a parameter that no rule covers (read by a module that also has submodules, or
  used inside ``nn.scan``/``jax.checkpoint``/``nn.vmap`` other than an ``nn.RNN``
  cell's ``Dense``): per-example gradients via ``vmap`` for those parameters only.

The clipped sum needs no second backward pass ("book-keeping", Bu et al. 2023):
each layer's weight gradient is formed once from the same recorded inputs and
output gradients with each example weighted by its clip factor
(``sum_b w_b sum_t a_bt g_bt^T``; a scatter-add for embeddings; the weighted sum of
the per-example gradients for layer-local and fallback parameters). The one
backward pass only propagates activation gradients (parameters are constants in
it), so no unclipped weight gradient is ever formed.

Inside ``nn.RNN`` the probes ride along the scanned input (the RNN is run
time-major internally) and the Dense inputs come back as extra scan outputs; the
input and recurrent Dense of the same gate of an exact ``nn.LSTMCell``/``nn.GRUCell``
share one probe (their outputs are added, so their output gradient is the same).

Refused (``ValueError`` naming the layer): ``nn.BatchNorm`` normalising with batch
statistics (a cross-example operation: per-example gradients are not defined), and
an ``nn.Embed`` used both as a lookup and through ``attend`` (tied input/output
embeddings). A module called several times is handled exactly. The loss must
depend on the parameters only through ``model.apply`` (a weight penalty added to
the loss would be missed by the ghost rules: add it to the gradient instead).

Non-finite examples: an example whose loss or gradient norm is NaN/inf gets a zero
weight and contributes exactly zero (its recorded activations and gradients are
masked with ``where`` before the weighted sums, so ``0 * NaN`` cannot leak); its
norm is reported as computed (NaN/inf). Per-example squared norms are accumulated
in float32 (no overflow rescue beyond float32's range).

Limits: ``OptimizedLSTMCell`` (it reads its Dense parameters directly) and other
cells/modules used inside ``nn.scan``/``nn.remat`` fall back to per-example
gradients for their parameters only; a layer-local rule needs the module to be
deterministic (no dropout inside a leaf module that owns parameters), and a module
whose parameters are its own but whose outputs are not all batched float arrays
falls back too. Use :func:`ghost_coverage` to see which rule each parameter gets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
from flax.linen import recurrent as _rec
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from gradclip_jax import _norms
from gradclip_jax.dp import _per_example

try:  # The current trace, to tell calls inside scan/vmap/remat from top-level ones.
  from jax._src import core as _jcore
  _current_trace = lambda: _jcore.trace_ctx.trace  # noqa: E731
except Exception:  # pragma: no cover - very different JAX: every call looks nested.
  _current_trace = lambda: object()  # noqa: E731

METHODS = ("auto", "vmap", "ghost")
_RNN_CELLS = (nn.LSTMCell, nn.GRUCell, nn.SimpleCell, nn.MGUCell)
_HI = lax.Precision.HIGHEST
# Cells whose input and recurrent Dense outputs are simply added (z = W_x x + W_h h):
# the pair has one output gradient, so one probe serves both (exact for these exact
# classes, whose __call__ we know; subclasses get a probe per Dense).
_SHARED_PROBES = {nn.LSTMCell: {"hi": "ii", "hf": "if", "hg": "ig", "ho": "io"},
                  nn.GRUCell: {"hr": "ir", "hz": "iz"}}


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


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _f32(x):
  return x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32)


def _sq(x, axes):
  return jnp.sum(_norms._sq_f32(x), axis=axes)  # pylint: disable=protected-access


def _leaf_sq_per_example(g):
  return _sq(g, tuple(range(1, g.ndim))) if g.ndim > 1 else _norms._sq_f32(g)  # pylint: disable=protected-access


def _key_names(path) -> tuple:
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
  return tuple(out)


def _direct_param_names(module) -> list:
  try:
    params = module.variables.get("params", {})
  except Exception:  # pylint: disable=broad-except
    return []
  return [k for k, v in params.items() if not isinstance(v, dict) and hasattr(v, "shape")]


def _has_sub_params(module) -> bool:
  try:
    params = module.variables.get("params", {})
  except Exception:  # pylint: disable=broad-except
    return False
  return any(isinstance(v, dict) or not hasattr(v, "shape") for v in params.values())


def _resolve(module, name, args, kwargs, pos):
  if name in kwargs and kwargs[name] is not None:
    return kwargs[name]
  if len(args) > pos and args[pos] is not None:
    return args[pos]
  return getattr(module, name, None)


# --------------------------------------------------------------- the probe passes


@dataclasses.dataclass
class _Call:
  """One top-level (not nested in a transform) module call, as seen in discovery."""
  path: tuple
  type_name: str
  method: str
  kind: str = "pass"            # dense | embed | local | rnn | pass
  params: tuple = ()            # covered parameter names (own parameters)
  has_children: bool = False
  out_probe_idx: tuple = ()     # local: flat indices of outputs that get probes
  # rnn:
  cell_denses: list = dataclasses.field(default_factory=list)  # [(path, din, dout, bias, record, probe)]
  feat: int = 0
  time_major: bool = False
  forced_tm: bool = False  # rnn: run batch-major RNN time-major (cheaper probes)
  general: Optional[tuple] = None  # DenseGeneral: (contracted axes, number of features)


class _Pass:
  """State of one traced pass (discovery, or the probe pass) over ``loss_fn``."""

  def __init__(self, mode, batch_size, plan=None, probes=None):
    self.mode = mode
    self.b = batch_size
    self.plan = [] if plan is None else plan
    self.probes = probes
    self.records = {}       # idx -> arrays (aux outputs of the probe pass)
    self.static = {}        # idx -> python side info
    self.counter = 0
    self.stack = []         # active top-level calls (entries)
    self.nested_paths = set()   # params paths used inside transforms (uncovered)
    self.attend_paths = set()
    self.rnn = None         # active rnn call context
    self.cell = None        # active rnn cell-step context
    self.outer = None

  # ------------------------------------------------------------------ dispatch
  def __call__(self, next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    if _current_trace() is not self.outer:
      return self._nested(next_fun, args, kwargs, module, method)
    if self.mode == "discover":
      return self._discover(next_fun, args, kwargs, module, method)
    return self._probe(next_fun, args, kwargs, module, method)

  # ------------------------------------------------------------------ nested
  def _nested(self, next_fun, args, kwargs, module, method):
    if (self.rnn is not None and self.cell is None and method == "__call__"
        and isinstance(module, _RNN_CELLS)):
      return self._cell_call(next_fun, args, kwargs, module)
    if (self.cell is not None and isinstance(module, nn.Dense) and method == "__call__"
        and _current_trace() is self.cell["trace"]):
      return self._cell_dense(next_fun, args, kwargs, module)
    if _direct_param_names(module):
      self.nested_paths.add(tuple(module.path))
    return next_fun(*args, **kwargs)

  def _cell_call(self, next_fun, args, kwargs, module):
    carry, x = args[0], args[1]
    rnn = self.rnn
    ctx = {"trace": _current_trace(), "k": 0, "records": [], "denses": [], "seen": [],
           "share": _SHARED_PROBES.get(type(module), {}), "probe_of": {}}
    if self.mode == "probe":
      f = rnn["feat"]
      sizes = {}
      for d in rnn["entry"].cell_denses:
        sizes.setdefault(d[5], d[2])
      sizes = [sizes[i] for i in range(len(sizes))]
      parts = jnp.split(x, np.cumsum([f] + sizes)[:-1].tolist(), axis=-1)
      x, ctx["probes"] = parts[0], parts[1:]
    ctx["seen"].append(x)  # record 0: the cell's input, i.e. the RNN's own input
    self.cell = ctx
    try:
      new_carry, y = next_fun(carry, x, *args[2:], **kwargs)
    finally:
      self.cell = None
    if self.mode == "discover":
      if not rnn["entry"].cell_denses:
        rnn["entry"].cell_denses = ctx["denses"]
        rnn["entry"].feat = x.shape[-1]
      return new_carry, y
    if ctx["k"] != len(rnn["entry"].cell_denses):
      raise RuntimeError("clipped_grad(method='ghost'): the RNN cell called its Dense "
                         "layers differently in two traces")
    rnn["y_feat"] = y.shape[-1]
    recs = [r.astype(y.dtype) for r in ctx["records"]]  # one per distinct input
    return new_carry, jnp.concatenate([y] + recs, axis=-1)

  def _cell_dense(self, next_fun, args, kwargs, module):
    ctx = self.cell
    a = args[0] if args else kwargs["inputs"]
    # Dense layers reading the same array (an LSTM's 4 input gates) share one record.
    src = next((i for i, r in enumerate(ctx["seen"]) if r is a), None)
    if src is None:
      src = len(ctx["seen"])
      ctx["seen"].append(a)
    name = module.path[-1] if module.path else ""
    partner = ctx["share"].get(name)
    if partner in ctx["probe_of"]:
      pidx, owner = ctx["probe_of"][partner], False
    else:
      pidx, owner = len(set(ctx["probe_of"].values())), True
      ctx["probe_of"][name] = pidx
    if self.mode == "discover":
      y = next_fun(*args, **kwargs)
      ctx["denses"].append((tuple(module.path), a.shape[-1], y.shape[-1],
                            bool(module.use_bias), src, pidx))
      return y
    ctx["k"] += 1
    if src == len(ctx["records"]) + 1:
      ctx["records"].append(a)
    y = next_fun(*args, **kwargs)
    return y + ctx["probes"][pidx].astype(y.dtype) if owner else y

  # ------------------------------------------------------------------ discovery
  def _classify(self, module, method, args, kwargs) -> _Call:
    path = tuple(module.path)
    entry = _Call(path=path, type_name=type(module).__name__, method=method)
    if any(e.path == path for e in self.stack):
      return entry  # a method of a module already being handled: pass through.
    own = tuple(_direct_param_names(module))
    if isinstance(module, nn.BatchNorm) and method == "__call__":
      ura = _resolve(module, "use_running_average", args, kwargs, 1)
      if not ura:
        raise ValueError(
            f"clipped_grad: BatchNorm layer {'/'.join(path) or '<root>'} normalises "
            "with statistics of the whole batch (use_running_average=False), a "
            "cross-example operation under which per-example gradients (and DP-SGD's "
            "sensitivity bound) are undefined; use LayerNorm/GroupNorm, or "
            "use_running_average=True")
    if isinstance(module, nn.Embed) and method == "attend":
      self.attend_paths.add(path)
      entry.kind = "pass"
      return entry
    x = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(module, nn.RNN) and method == "__call__":
      cell = module.cell
      if isinstance(cell, _RNN_CELLS) and cell.num_feature_axes == 1 and _is_float(x):
        entry.kind = "rnn"
        entry.time_major = bool(_resolve(module, "time_major", (), kwargs, 99))
        entry.forced_tm = not entry.time_major and x.ndim == 3
      return entry
    if not own:
      return entry
    batched = hasattr(x, "shape") and x.ndim >= 1 and x.shape[0] == self.b
    if isinstance(module, nn.Embed) and method == "__call__" and batched:
      entry.kind, entry.params = "embed", ("embedding",)
    elif (isinstance(module, nn.DenseGeneral) and method == "__call__" and batched
          and not module.batch_dims and _is_float(x)):
      axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
      if all((ax % x.ndim) != 0 for ax in axes):
        feats = module.features if isinstance(module.features, tuple) else (
            module.features,)
        entry.kind, entry.params = "dense", own
        entry.general = (tuple(ax % x.ndim for ax in axes), len(feats))
    elif isinstance(module, nn.Dense) and method == "__call__" and batched and x.ndim >= 2:
      entry.kind, entry.params = "dense", own
    elif not _has_sub_params(module):
      entry.kind, entry.params = "local", own
    return entry

  def _discover(self, next_fun, args, kwargs, module, method):
    entry = self._classify(module, method, args, kwargs)
    self.plan.append(entry)
    if self.stack:
      self.stack[-1].has_children = True
    self.stack.append(entry)
    try:
      if entry.kind == "rnn":
        self.rnn = {"entry": entry}
        try:
          out = next_fun(*args, **kwargs)
        finally:
          self.rnn = None
        if not entry.cell_denses:
          entry.kind = "pass"
        return out
      out = next_fun(*args, **kwargs)
    finally:
      self.stack.pop()
    if entry.kind == "local":
      leaves = jax.tree.leaves(out)
      ok = not entry.has_children and leaves and all(
          _is_float(l) and l.ndim >= 1 and l.shape[0] == self.b for l in leaves)
      entry.out_probe_idx = tuple(range(len(leaves)))
      if not ok:
        entry.kind, entry.params = "pass", ()
    return out

  # ------------------------------------------------------------------ probe pass
  def _probe(self, next_fun, args, kwargs, module, method):
    idx = self.counter
    self.counter += 1
    entry = self.plan[idx]
    if entry.path != tuple(module.path) or entry.method != method:
      raise RuntimeError("clipped_grad(method='ghost'): loss_fn called its modules in a "
                         "different order in two traces (data-dependent Python control "
                         "flow?); use method='vmap'")
    probe = self.probes.get(idx)
    if entry.kind == "dense":
      x = args[0] if args else next(iter(kwargs.values()))
      self.records[idx] = x
      return next_fun(*args, **kwargs) + probe
    if entry.kind == "embed":
      x = args[0] if args else next(iter(kwargs.values()))
      self.records[idx] = x
      return next_fun(*args, **kwargs) + probe
    if entry.kind == "local":
      flat, treedef = jax.tree.flatten((args, kwargs))
      dyn = [i for i, l in enumerate(flat) if isinstance(l, (jax.Array, np.ndarray))]
      self.records[idx] = {
          "dyn": [flat[i] for i in dyn],
          "variables": jax.tree.map(lambda v: v, dict(module.variables)),
      }
      self.static[idx] = (treedef, flat, dyn, module.clone(parent=None))
      out = next_fun(*args, **kwargs)
      leaves, otree = jax.tree.flatten(out)
      leaves = [l + p.astype(l.dtype) for l, p in zip(leaves, probe)]
      return jax.tree.unflatten(otree, leaves)
    if entry.kind == "rnn":
      return self._rnn_call(next_fun, args, kwargs, module, entry, idx, probe)
    return next_fun(*args, **kwargs)

  def _rnn_call(self, next_fun, args, kwargs, module, entry, idx, probe):
    args = list(args)
    x = args[0] if args else kwargs["inputs"]
    # A batch-major RNN is run time-major here: the scan then needs no transposes of
    # the (wide) probe-augmented input, its outputs and their cotangents.
    x_in = jnp.swapaxes(x, 0, 1) if entry.forced_tm else x
    x_aug = jnp.concatenate([x_in] + [p.astype(x.dtype) for p in probe], axis=-1)
    if entry.forced_tm:
      kwargs = dict(kwargs, time_major=True)
    if args:
      args[0] = x_aug
    else:
      kwargs = dict(kwargs, inputs=x_aug)
    self.rnn = {"entry": entry, "feat": x.shape[-1]}
    try:
      out = next_fun(*args, **kwargs)
      y_feat = self.rnn["y_feat"]
    finally:
      self.rnn = None
    return_carry = _resolve(module, "return_carry", (), kwargs, 99)
    carry, outputs = out if return_carry else (None, out)
    din = {}
    for d in entry.cell_denses:
      if d[4] > 0:
        din.setdefault(d[4], d[1])
    din = [din[i] for i in sorted(din)]
    parts = jnp.split(outputs, np.cumsum([y_feat] + din)[:-1].tolist(), axis=-1)
    y, recs = parts[0], parts[1:]
    if entry.forced_tm:
      y = jnp.swapaxes(y, 0, 1)
    reverse = _resolve(module, "reverse", (), kwargs, 99)
    keep_order = _resolve(module, "keep_order", (), kwargs, 99)
    if reverse and not keep_order:  # records in processing order: flip them back
      seq_lengths = kwargs.get("seq_lengths")
      recs = [_rec.flip_sequences(r, seq_lengths, num_batch_dims=1,
                                  time_major=entry.time_major or entry.forced_tm)
              for r in recs]
    self.records[idx] = [x] + list(recs)
    return (carry, y) if return_carry else y


def _discovery_pass(loss_fn, has_aux, params, batch, b):
  st = _Pass("discover", b)

  def f(p, *bt):
    st.outer = _current_trace()
    with nn.intercept_methods(st):
      losses, _ = _split_out(loss_fn(p, *bt), has_aux)
    return losses

  out = jax.eval_shape(f, params, *batch)
  _check_losses(out, b)
  return st


def _run_discovery(loss_fn, has_aux, params, batch, b):
  st = _discovery_pass(loss_fn, has_aux, params, batch, b)
  # The dense/embed/local rules take an array's leading axis for the batch axis when
  # its size is B. A time-major array with T == B would pass that test (the PTB model
  # with num_steps == batch_size), so the plan is traced again, abstractly, with a
  # batch of B + 1: a rule is kept only where the leading axis grew with the batch.
  if any(e.kind in ("dense", "embed", "local") for e in st.plan):
    bigger = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((b + 1,) + tuple(x.shape[1:]), x.dtype), batch)
    try:
      st2 = _discovery_pass(loss_fn, has_aux, params, bigger, b + 1)
      plan2 = st2.plan
    except Exception:  # pylint: disable=broad-except
      plan2 = None  # loss_fn only accepts batch size B: nothing to compare with
    if plan2 is not None:
      same = len(plan2) == len(st.plan) and all(
          (e.path, e.method) == (e2.path, e2.method) for e, e2 in zip(st.plan, plan2))
      for i, e in enumerate(st.plan):
        if e.kind in ("dense", "embed", "local") and (
            not same or plan2[i].kind != e.kind):
          e.kind, e.params = "pass", ()
  both = st.attend_paths & {e.path for e in st.plan if e.kind == "embed"}
  if both:
    raise ValueError(
        f"clipped_grad(method='ghost'): Embed layer {'/'.join(sorted(both)[0])} is "
        "used both as a lookup and through attend() (tied input/output embeddings); "
        "its per-example gradient norm is not covered by a ghost rule. Use "
        "method='vmap', or untie the weights")
  # Calls that only appear nested (inside scan/remat/vmap) make their params uncovered.
  for e in st.plan:
    if e.path in st.nested_paths and e.kind in ("dense", "embed", "local"):
      e.kind, e.params = "pass", ()
  return st


class _Shapes(_Pass):
  """An abstract probe-less pass that records the probe shapes of every covered call."""

  def _probe(self, next_fun, args, kwargs, module, method):
    idx = self.counter
    self.counter += 1
    entry = self.plan[idx]
    if entry.kind == "rnn":
      x = args[0] if args else kwargs["inputs"]
      sizes = {}
      for d in entry.cell_denses:
        sizes.setdefault(d[5], d[2])
      lead = (x.shape[1], x.shape[0]) + x.shape[2:-1] if entry.forced_tm else x.shape[:-1]
      self.records[idx] = [jax.ShapeDtypeStruct(lead + (sizes[i],), x.dtype)
                           for i in range(len(sizes))]
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    if entry.kind in ("dense", "embed"):
      self.records[idx] = jax.ShapeDtypeStruct(out.shape, out.dtype)
    elif entry.kind == "local":
      self.records[idx] = [jax.ShapeDtypeStruct(l.shape, l.dtype)
                           for l in jax.tree.leaves(out)]
    return out


def _example_sq_dense(a, g, has_bias):
  """Per-example ||dW||^2 (+ ||db||^2) of y = a @ W (+ b); a [B,T,din], g [B,T,dout]."""
  a, g = _f32(a), _f32(g)
  bsz, t, din = a.shape
  dout = g.shape[-1]
  if t == 1:
    sq = _sq(a, (1, 2)) * _sq(g, (1, 2))
  elif t * t <= din * dout:
    aa = jnp.einsum("btd,bsd->bts", a, a, precision=_HI)
    gg = jnp.einsum("bte,bse->bts", g, g, precision=_HI)
    sq = jnp.sum(aa * gg, axis=(1, 2))
  else:
    w = jnp.einsum("btd,bte->bde", a, g, precision=_HI)
    sq = _sq(w, (1, 2))
  if has_bias:
    sq = sq + _sq(jnp.sum(g, axis=1), (1,))
  return sq


def _example_sq_embed(ids, g):
  """Per-example ||dE||^2 of an embedding lookup: segment sums over sorted ids."""
  bsz = ids.shape[0]
  ids = ids.reshape(bsz, -1)
  t = ids.shape[1]
  g = _f32(g).reshape(bsz, t, -1)
  order = jnp.argsort(ids, axis=1)
  ids_s = jnp.take_along_axis(ids, order, axis=1)
  g_s = jnp.take_along_axis(g, order[..., None], axis=1)
  new = jnp.concatenate([jnp.ones((bsz, 1), bool), ids_s[:, 1:] != ids_s[:, :-1]], 1)
  seg = jnp.cumsum(new, axis=1) - 1 + (jnp.arange(bsz) * t)[:, None]
  sums = jax.ops.segment_sum(g_s.reshape(bsz * t, -1), seg.reshape(-1),
                             num_segments=bsz * t, indices_are_sorted=True)
  return _sq(sums.reshape(bsz, t, -1), (1, 2))


def _dense_as_btd(general, x, g):
  """Reshape a Dense/DenseGeneral call's input/output grad to [B, T, din]/[B, T, dout]."""
  bsz = x.shape[0]
  if general is not None:
    axes, n_feat = general
    rest = [i for i in range(x.ndim) if i not in axes]
    din = int(np.prod([x.shape[i] for i in axes]))
    x = jnp.transpose(x, rest + list(axes)).reshape(bsz, -1, din)
    dout = int(np.prod(g.shape[g.ndim - n_feat:]))
    g = g.reshape(bsz, -1, dout)
  else:
    x = x.reshape(bsz, -1, x.shape[-1])
    g = g.reshape(bsz, -1, g.shape[-1])
  return x, g


# ------------------------------------------------------------------ the two cores


def _vmap_core(loss_fn, has_aux, max_norm, params, batch):
  """(f32 clipped sum, norms [m], finite [m]) of one microbatch by vmap(grad)."""

  def per_ex(p, *ex):
    ex1 = jax.tree.map(lambda x: x[None], ex)
    losses, _ = _split_out(loss_fn(p, *ex1), has_aux)
    if jnp.shape(losses) != (1,):
      raise ValueError(f"loss_fn must return one loss per example: shape (1,) for a "
                       f"batch of 1, got {jnp.shape(losses)}")
    return losses[0]

  in_axes = (None,) + (0,) * len(batch)
  losses, grads = jax.vmap(jax.value_and_grad(per_ex), in_axes=in_axes)(params, *batch)
  norms = _per_example.example_norms(grads)
  ok = jnp.isfinite(losses)
  scale, finite, _ = _per_example.clip_stats(jnp.where(ok, norms, jnp.nan), max_norm)
  summed = jax.tree.map(
      lambda g: jnp.sum(jnp.where(finite.reshape((-1,) + (1,) * (g.ndim - 1)),
                                  _f32(g) * scale.reshape((-1,) + (1,) * (g.ndim - 1)),
                                  0.0), axis=0), grads)
  return summed, norms, finite


def _ghost_core(loss_fn, has_aux, max_norm, params, batch, auto=False):
  """(f32 clipped sum, norms [B], finite [B], aux) of one microbatch by ghost norms."""
  b = _batch_size(batch)
  st = _run_discovery(loss_fn, has_aux, params, batch, b)
  plan = st.plan

  if auto and not any(e.kind != "pass" for e in plan):
    raise NotImplementedError("no linen layer covered by a ghost rule")
  # Abstract run to get each covered call's probe shapes.
  sp = _Shapes("probe", b, plan=plan, probes={})

  def shape_fn(p, *bt):
    sp.outer = _current_trace()
    with nn.intercept_methods(sp):
      return _split_out(loss_fn(p, *bt), has_aux)[0]

  jax.eval_shape(shape_fn, params, *batch)
  probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sp.records)

  pp = _Pass("probe", b, plan=plan)

  def probe_fn(pr):
    pp.probes = pr
    pp.counter = 0
    pp.records = {}
    pp.outer = _current_trace()
    with nn.intercept_methods(pp):
      losses, aux = _split_out(loss_fn(params, *batch), has_aux)
    return losses, (pp.records, aux, losses)

  # ONE backward pass, for the probes (output gradients) only: the parameters are
  # constants here, so no weight gradient is formed.
  _, vjp_fn, (records, aux, losses) = jax.vjp(probe_fn, probes, has_aux=True)
  (g_probe,) = vjp_fn(jnp.ones((b,), losses.dtype))

  # ---- per-layer squared norms, grouped by module path; weight-gradient makers
  sq = jnp.zeros((b,), jnp.float32)
  makers = {}  # covered key -> fn(weights [B], finite [B], leaf) -> f32 gradient
  dense_groups, embed_groups, local_groups = {}, {}, {}
  for idx, e in enumerate(plan):
    if e.kind == "dense":
      a, g = _dense_as_btd(e.general, records[idx], g_probe[idx])
      dense_groups.setdefault(e.path, []).append((a, g, "bias" in e.params))
    elif e.kind == "rnn":
      recs, gs = records[idx], g_probe[idx]
      if e.time_major:
        recs = [jnp.swapaxes(r, 0, 1) for r in recs]
        gs = [jnp.swapaxes(r, 0, 1) for r in gs]
      elif e.forced_tm:  # record 0 is the batch-major input itself
        recs = recs[:1] + [jnp.swapaxes(r, 0, 1) for r in recs[1:]]
        gs = [jnp.swapaxes(r, 0, 1) for r in gs]
      recs = [r.reshape(b, -1, r.shape[-1]) for r in recs]
      gs = [r.reshape(b, -1, r.shape[-1]) for r in gs]
      for dpath, _, _, has_bias, src, pidx in e.cell_denses:
        a, g = recs[src], gs[pidx]
        if dpath in st.nested_paths:
          continue
        dense_groups.setdefault(dpath, []).append((a, g, has_bias))
    elif e.kind == "embed":
      embed_groups.setdefault(e.path, []).append((records[idx], g_probe[idx]))
    elif e.kind == "local":
      local_groups.setdefault(e.path, []).append(idx)

  cache = {}

  def _mask(x, fin, w=None):
    # One masked (and weighted) copy per distinct array: the 4 gates of an LSTM share
    # their input record and their probe gradient.
    key = (id(x), w is None)
    if key not in cache:
      shp = (-1,) + (1,) * (x.ndim - 1)
      y = x if w is None else x * w.reshape(shp).astype(x.dtype)
      cache[key] = (x, jnp.where(fin.reshape(shp), y, jnp.zeros((), y.dtype)))
    return cache[key][1]

  def _cat(xs):
    return _f32(xs[0]) if len(xs) == 1 else jnp.concatenate([_f32(x) for x in xs], 1)

  for path, items in dense_groups.items():
    a = _cat([i[0] for i in items])
    g = _cat([i[1] for i in items])
    sq = sq + _example_sq_dense(a, g, items[0][2])

    def kernel_grad(w, fin, leaf, a=a, g=g):
      return jnp.einsum("btd,bte->de", _mask(a, fin), _mask(g, fin, w),
                        precision=_HI).reshape(leaf.shape)

    def bias_grad(w, fin, leaf, g=g):
      return jnp.sum(_mask(g, fin, w), axis=(0, 1)).reshape(leaf.shape)

    makers[path + ("kernel",)] = kernel_grad
    if items[0][2]:
      makers[path + ("bias",)] = bias_grad
  for path, items in embed_groups.items():
    ids = jnp.concatenate([i[0].reshape(b, -1) for i in items], axis=1)
    g = jnp.concatenate([_f32(i[1]).reshape(b, -1, i[1].shape[-1]) for i in items],
                        axis=1)
    sq = sq + _example_sq_embed(ids, g)

    def embed_grad(w, fin, leaf, ids=ids, g=g):
      rows = _mask(g, fin, w).reshape(-1, g.shape[-1])
      return jnp.zeros(leaf.shape, jnp.float32).at[ids.reshape(-1)].add(rows)

    makers[path + ("embedding",)] = embed_grad
  for path, idxs in local_groups.items():
    total = None
    for idx in idxs:
      pe = _local_per_example(pp.static[idx], records[idx], g_probe[idx], b,
                              plan[idx].method)
      total = pe if total is None else jax.tree.map(jnp.add, total, pe)
    for name, leaf in total.items():
      sq = sq + _leaf_sq_per_example(leaf)
      makers[path + (name,)] = (
          lambda w, fin, _, x=leaf: jnp.sum(_mask(_f32(x), fin, w), axis=0))
  covered = {k: True for k in makers}

  # ---- map covered params to the user's tree; the rest falls back to vmap
  rules, uncovered = _match_params(params, covered)
  pe_unc = None
  if uncovered:
    pe_unc = _fallback_per_example(loss_fn, has_aux, params, batch, uncovered)
    for x in pe_unc:
      sq = sq + _leaf_sq_per_example(x)

  norms = _norms.safe_root(sq, 2.0)
  ok = jnp.isfinite(losses)
  scale, finite, _ = _per_example.clip_stats(jnp.where(ok, norms, jnp.nan), max_norm)
  weights = jnp.where(finite, scale, 0.0)

  # ---- the clipped sum, per layer, from the same inputs and output gradients
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = {i: k for i, k in rules.items()}
  unc_pos = {i: j for j, i in enumerate(uncovered)}
  out = []
  for i, (_, leaf) in enumerate(flat):
    if i in keys:
      out.append(makers[keys[i]](weights, finite, leaf))
    elif i in unc_pos:
      out.append(jnp.sum(_mask(_f32(pe_unc[unc_pos[i]]), finite, weights), axis=0))
    else:
      out.append(jnp.zeros(jnp.shape(leaf), jnp.float32))
  grads = jax.tree.unflatten(treedef, out)
  return grads, norms, finite, aux


def _covered_params(st) -> dict:
  """(module path + param name) -> rule name, for every parameter a rule covers."""
  covered = {}
  for e in st.plan:
    if e.kind in ("dense", "embed", "local"):
      rule = {"dense": "dense", "embed": "embed"}.get(e.kind, f"layer-local:{e.type_name}")
      for n in e.params:
        covered[e.path + (n,)] = rule
    elif e.kind == "rnn":
      for dpath, _, _, has_bias, _, _ in e.cell_denses:
        if dpath in st.nested_paths:
          continue
        covered[dpath + ("kernel",)] = "rnn-cell-dense"
        if has_bias:
          covered[dpath + ("bias",)] = "rnn-cell-dense"
  return covered


def _match_params(params, covered):
  """({leaf index: rule}, [uncovered float leaf indices]); error if a rule's param is absent."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  found, rules, uncovered = set(), {}, []
  for i, (path, leaf) in enumerate(flat):
    nm = _key_names(path)
    hit = None
    for cand in (nm, nm[1:] if nm and nm[0] == "params" else None):
      if cand is not None and cand in covered:
        hit = cand
    if hit is not None:
      found.add(hit)
      rules[i] = hit
    elif _is_float(leaf):
      uncovered.append(i)
  missing = set(covered) - found
  if missing:
    raise ValueError(
        f"clipped_grad(method='ghost'): could not find parameter(s) "
        f"{sorted('/'.join(m) for m in missing)[:3]} in the params passed to loss_fn "
        "(pass the params tree, or {'params': ...}, that model.apply receives)")
  return rules, uncovered


def ghost_coverage(loss_fn: Callable[..., Any], params: Any, *batch: Any,
                   has_aux: bool = False) -> dict:
  """Which rule ``method='ghost'`` uses for each parameter (traced abstractly, no FLOPs).

  Returns ``{"params/Dense_0/kernel": "dense", ..., "params/w": "per-example
  fallback"}``. Raises the same errors as ``clipped_grad`` (BatchNorm, tied Embed).
  """
  b = _batch_size(batch)
  st = _run_discovery(loss_fn, has_aux, params, batch, b)
  covered = _covered_params(st)
  rules, uncovered = _match_params(params, covered)
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  out = {}
  for i, (path, _) in enumerate(flat):
    name = "/".join(_key_names(path))
    if i in rules:
      out[name] = covered[rules[i]]
    elif i in uncovered:
      out[name] = "per-example fallback"
  return out


def _local_per_example(static, rec, g_out, b, method):
  """Per-example gradients of one leaf-module call's own parameters, [B, ...]."""
  treedef, flat, dyn, clone = static
  variables = rec["variables"]
  dyn_vals = rec["dyn"]
  batched = [hasattr(v, "shape") and v.ndim >= 1 and v.shape[0] == b for v in dyn_vals]

  def one(p, vals, cot):
    leaves = list(flat)
    for i, v in zip(dyn, vals):
      leaves[i] = v
    args, kwargs = jax.tree.unflatten(treedef, leaves)

    def f(pp):
      var = dict(variables)
      var["params"] = pp
      out = clone.apply(var, *args, method=method, **kwargs)
      return out

    out, vjp = jax.vjp(f, p)
    cot_tree = jax.tree.unflatten(jax.tree.structure(out),
                                  [c.astype(o.dtype) for c, o in zip(cot, jax.tree.leaves(out))])
    return vjp(cot_tree)[0]

  def per_ex(*args):
    vals = list(args[:len(dyn_vals)])
    cot = list(args[len(dyn_vals):])
    vals = [v[None] if bt else v for v, bt in zip(vals, batched)]
    cot = [c[None] for c in cot]
    return one(variables["params"], vals, cot)

  in_axes = tuple(0 if bt else None for bt in batched) + (0,) * len(g_out)
  return jax.vmap(per_ex, in_axes=in_axes)(*dyn_vals, *g_out)


def _fallback_per_example(loss_fn, has_aux, params, batch, uncovered):
  """Per-example gradients ``[B, ...]`` of the parameters no rule covers (vmap(grad))."""
  leaves, treedef = jax.tree.flatten(params)
  sub = [leaves[i] for i in uncovered]

  def per_ex(s, *ex):
    full = list(leaves)
    for i, v in zip(uncovered, s):
      full[i] = v
    ex1 = jax.tree.map(lambda x: x[None], ex)
    losses, _ = _split_out(loss_fn(jax.tree.unflatten(treedef, full), *ex1), has_aux)
    return losses[0]

  return jax.vmap(jax.grad(per_ex), in_axes=(None,) + (0,) * len(batch))(sub, *batch)


# ------------------------------------------------------------------ public entry


def clipped_grad(loss_fn: Callable[..., Any], *, max_norm: Any, method: str = "auto",
                 normalize_by: Optional[Any] = None,
                 microbatch_size: Optional[int] = None, has_aux: bool = False,
                 return_norms: bool = False) -> Callable[..., Any]:
  """Builds ``(params, *batch) -> sum_b min(1, C/n_b) grad(loss_b) [/ normalize_by]``.

  ``loss_fn(params, *batch)`` must return the vector of ``B`` per-example losses
  (``(losses, aux)`` with ``has_aux``); see the module docstring for the
  loss-reduction convention, the methods and the layers ghost norms cover.

  Returns a function giving ``grads`` (each leaf in its parameter's dtype,
  accumulated in float32), then ``norms`` (``[B]`` float32 per-example norms before
  clipping; NaN/inf for a non-finite example, which contributes zero) if
  ``return_norms``, then ``aux`` if ``has_aux`` (from a batched forward pass over
  the batch; stacked along a new leading axis, one per microbatch, when
  ``microbatch_size`` splits the batch). A single value is returned bare, several
  as a tuple: ``grads``, ``(grads, norms)``, ``(grads, aux)`` or
  ``(grads, norms, aux)``.

  Args:
    loss_fn: per-example loss function.
    max_norm: clip threshold ``C >= 0``; ``inf`` disables clipping.
    method: ``"vmap"`` (reference), ``"ghost"`` (flax.linen models), or ``"auto"``
      (ghost when ``loss_fn`` calls a linen module, else vmap).
    normalize_by: divide the clipped sum by this (e.g. the expected batch size).
    microbatch_size: process the batch in microbatches of this size (``B`` must be
      a multiple), accumulating in float32 (``lax.scan``); bounds peak memory.
    has_aux: ``loss_fn`` returns ``(losses, aux)``.
    return_norms: also return the per-example norms.
  """
  _norms.check_threshold("max_norm", max_norm)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if microbatch_size is not None and (not isinstance(microbatch_size, int)
                                      or microbatch_size < 1):
    raise ValueError(f"microbatch_size must be a positive int, got {microbatch_size!r}")

  def core(params, batch):
    if method == "vmap":
      summed, norms, finite = _vmap_core(loss_fn, has_aux, max_norm, params, batch)
      aux = None
      if has_aux:
        aux = _split_out(loss_fn(params, *batch), True)[1]
      return summed, norms, aux
    if method == "auto":
      try:
        summed, norms, _, aux = _ghost_core(loss_fn, has_aux, max_norm, params, batch,
                                            auto=True)
      except NotImplementedError:
        summed, norms, _ = _vmap_core(loss_fn, has_aux, max_norm, params, batch)
        aux = _split_out(loss_fn(params, *batch), True)[1] if has_aux else None
      return summed, norms, aux
    summed, norms, _, aux = _ghost_core(loss_fn, has_aux, max_norm, params, batch)
    return summed, norms, aux

  def fn(params, *batch):
    if not batch:
      raise TypeError("clipped_grad: call as fn(params, *batch) with at least one "
                      "batch argument")
    b = _batch_size(batch)
    m = microbatch_size
    if m is None or m >= b:
      summed, norms, aux = core(params, batch)
    else:
      if b % m:
        raise ValueError(f"batch size {b} is not a multiple of microbatch_size {m}")
      n = b // m
      mbs = jax.tree.map(lambda x: x.reshape((n, m) + x.shape[1:]), batch)
      zero = jax.tree.map(lambda p: jnp.zeros(p.shape, _f32(p).dtype) if _is_float(p)
                          else None, params)

      def body(acc, mb):
        s, nrm, ax = core(params, mb)
        acc = jax.tree.map(lambda a, x: a + x, acc, s)
        return acc, (nrm, ax)

      summed, (norms, aux) = lax.scan(body, zero, mbs)
      norms = norms.reshape(b)
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
