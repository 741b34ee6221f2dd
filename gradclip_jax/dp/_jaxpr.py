"""Every access to JAX's program representation, in one small module.

The ghost engine reads the program that ``jax.make_jaxpr`` traces: equations, the
names and parameters of their primitives, variables, literals, source lines, and it
re-binds equations one by one. Those are JAX's data structures (public, through
``jax.extend.core`` and ``jax.extend.source_info_util``); the analysis
(:mod:`gradclip_jax.dp._trace`) and the rules (:mod:`gradclip_jax.dp._rules`) reach
them only through the functions below, so a change in how JAX represents programs is
fixed here and nowhere else.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.extend import core as jcore
from jax.extend import source_info_util
import numpy as np

# ------------------------------------------------------------ primitive names

#: Call-like primitives whose inner program is analysed in place.
INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "remat2",
                    "checkpoint", "custom_jvp_call"})
#: Parameter-only operations that map the gradient of their output to their input
#: without changing its norm (a parameter read through them keeps the cheap norm).
ISOMETRIC = frozenset({"reshape", "transpose", "squeeze", "expand_dims",
                       "convert_element_type", "copy", "copy_p", "slice",
                       "dynamic_slice", "rev", "neg", "concatenate",
                       "reduce_precision", "optimization_barrier"})
#: Parameter-only operations that keep the axes of their operand as they are.
SAME_AXES = frozenset({"convert_element_type", "copy", "copy_p",
                       "optimization_barrier"})
SCAN = "scan"
COND = "cond"
TRANSPOSE = "transpose"
CONCATENATE = "concatenate"
CONVERT = "convert_element_type"
BROADCAST = "broadcast_in_dim"
#: Additions a probe may move forward through (see ``_trace``'s probe placement).
ADDS = frozenset({"add", "add_any"})
SPLIT = "split"


# ------------------------------------------------------------------ variables


def is_literal(v) -> bool:
  return isinstance(v, jcore.Literal)


def literal_value(v) -> Any:
  return v.val


def is_dropped(v) -> bool:
  """An output nobody reads (``_`` in a printed jaxpr)."""
  return isinstance(v, jcore.DropVar)


def shape(v) -> tuple:
  return tuple(getattr(v.aval, "shape", ()))


def dtype(v) -> Any:
  return getattr(v.aval, "dtype", None)


def size(v) -> int:
  return int(np.prod(shape(v), dtype=np.int64))


def is_float_dtype(dt) -> bool:
  """Floating or complex, bfloat16 and float16 included (not PRNG keys, not ints)."""
  if dt is None:
    return False
  try:
    return bool(jnp.issubdtype(dt, jnp.inexact))
  except TypeError:  # extended dtypes (PRNG keys)
    return False


def is_float(v) -> bool:
  return is_float_dtype(dtype(v))


def shaped(shape_: tuple, dtype_: Any) -> Any:
  """An abstract value (what ``jax.eval_shape`` would give) of this shape and dtype."""
  return jax.ShapeDtypeStruct(tuple(shape_), dtype_)


def zero_cotangent(shape_: tuple, dtype_: Any) -> Any:
  """The zero cotangent of an output of this shape and dtype (``float0`` for ints)."""
  if is_float_dtype(dtype_):
    return jnp.zeros(shape_, dtype_)
  return np.zeros(shape_, jax.dtypes.float0)


# ------------------------------------------------------------------ programs


class Program(NamedTuple):
  """An open program and the constants of its ``constvars``."""
  jaxpr: Any
  consts: list


def trace(fn, *avals) -> tuple:
  """(Program, output shapes) of ``fn`` traced at these abstract arguments."""
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*avals)
  return Program(closed.jaxpr, list(closed.consts)), out_shape


def eqns(jaxpr) -> list:
  return list(jaxpr.eqns)


def invars(jaxpr) -> list:
  return list(jaxpr.invars)


def outvars(jaxpr) -> list:
  return list(jaxpr.outvars)


def constvars(jaxpr) -> list:
  return list(jaxpr.constvars)


def _open(j) -> Program:
  if isinstance(j, jcore.ClosedJaxpr):
    return Program(j.jaxpr, list(j.consts))
  return Program(j, [])


# ----------------------------------------------------------------- equations


def name(eqn) -> str:
  return eqn.primitive.name


def ins(eqn) -> list:
  return list(eqn.invars)


def outs(eqn) -> list:
  return list(eqn.outvars)


def has_effects(eqn) -> bool:
  return bool(eqn.effects)


def where(eqn) -> str:
  """``in <name stack> at <file:line>`` of an equation, for messages."""
  loc = source_info_util.summarize(eqn.source_info)
  stack = str(getattr(eqn.source_info, "name_stack", "") or "")
  parts = [p for p in (f"in {stack}" if stack else "", f"at {loc}" if loc else "") if p]
  return " ".join(parts)


def bind(eqn, invals) -> list:
  """Applies the equation's primitive to ``invals`` (its outputs, always a list)."""
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def has_subprogram(eqn) -> bool:
  """Whether the equation's parameters hold a program or a function."""
  return any(isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr)) or callable(v)
             for v in eqn.params.values())


def same_params(eqn0, eqn1) -> bool:
  """Whether two traces of one equation (at B and B + 1) have equal parameters."""
  p0, p1 = eqn0.params, eqn1.params
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


def inner(eqn) -> Program:
  """The body of a call-like equation (``INLINE``)."""
  return _open(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")))


class Scan(NamedTuple):
  body: Program
  num_consts: int
  num_carry: int
  length: int
  reverse: bool
  unroll: Any


def scan(eqn) -> Scan:
  """A ``scan``'s body and its operand counts.

  JAX up to 0.10 gives the counts as ``num_consts`` / ``num_carry``; JAX 0.11 and 0.12
  give the operand groups (consts, carry, scanned) as ``ft_in``, whose ``unpack()``
  parts list their values.
  """
  p = eqn.params
  if "num_consts" in p:
    nc, ncar = p["num_consts"], p["num_carry"]
  else:
    try:
      groups = p["ft_in"].unpack()
      nc, ncar = len(list(groups[0].vals)), len(list(groups[1].vals))
    except (KeyError, AttributeError, IndexError, TypeError) as e:
      raise NotImplementedError(
          "gradclip_jax's ghost engine cannot read this JAX version's scan parameters "
          f"({sorted(p)}); see gradclip_jax._compat for the tested versions") from e
  return Scan(_open(p["jaxpr"]), nc, ncar, p["length"], p["reverse"], p["unroll"])


def cond_branches(eqn) -> list:
  """The branches of a ``cond`` (its operand 0 is the branch index)."""
  return [_open(b) for b in eqn.params["branches"]]


def broadcast_dimensions(eqn) -> tuple:
  return tuple(eqn.params["broadcast_dimensions"])


def split_layout(eqn) -> tuple:
  """(axis, sizes) of a ``split`` equation."""
  return int(eqn.params["axis"]), tuple(int(n) for n in eqn.params["sizes"])


def permutation(eqn) -> tuple:
  return tuple(eqn.params["permutation"])


def dot_dimension_numbers(eqn) -> tuple:
  """``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))`` as tuples of ints."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))


class GatherDims(NamedTuple):
  offset_dims: tuple
  collapsed_slice_dims: tuple
  start_index_map: tuple
  operand_batching_dims: tuple
  start_indices_batching_dims: tuple
  slice_sizes: tuple
  fill: bool  # out-of-range indices give zeros (mode FILL_OR_DROP), else clamped


def gather_dims(eqn) -> GatherDims:
  dn = eqn.params["dimension_numbers"]
  mode = str(eqn.params.get("mode", "")).upper()
  ints = lambda xs: tuple(int(d) for d in xs)  # noqa: E731
  return GatherDims(ints(dn.offset_dims), ints(dn.collapsed_slice_dims),
                    ints(dn.start_index_map), ints(dn.operand_batching_dims),
                    ints(dn.start_indices_batching_dims),
                    ints(eqn.params["slice_sizes"]), "FILL" in mode)


class ConvDims(NamedTuple):
  lhs_batch_dim: int
  batch_group_count: int


def conv_dims(eqn) -> ConvDims:
  dn = eqn.params["dimension_numbers"]
  return ConvDims(dn.lhs_spec[0] if dn is not None else 0,
                  eqn.params.get("batch_group_count", 1))


def dimension_numbers_key(eqn) -> str:
  """A hashable description of an equation's dimension numbers (for grouping)."""
  return str(eqn.params.get("dimension_numbers"))


def new_dtype(eqn) -> Optional[Any]:
  return eqn.params.get("new_dtype")
