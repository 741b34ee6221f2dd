"""What a compiled program moves, read from the program: shared by the GPU and TPU scripts.

XLA compiles for a GPU or a TPU it does not have (the CUDA plugin with a target
description, libtpu with a topology), so the optimized HLO module of a step, fusion
decisions, memory spaces and collectives included, can be read on any host. This
module holds what ``gpu_traffic.py`` (H100) and ``tpu_programs.py`` (TPU v5e) both
do with it:

* :func:`kernels`: for every kernel of the entry computation, the bytes of its
  operands (read) and results (written) that live in device memory (HBM). Operands
  in another memory space (a TPU's on-chip VMEM, ``S(1)`` in the layout) are not HBM
  traffic; an asynchronous copy between spaces moves its HBM side once. It is a
  model, not a timing: every HBM operand counts as read once in full and every
  result as written once; caches are ignored. A ``conditional`` counts its predicate
  only: the rescue branches of this library run only on a step whose sum over- or
  underflowed.
* :func:`summary`: those bytes, XLA's own cost analysis (``bytes accessed``, where
  the backend reports it: libtpu does, the deviceless CUDA compiler does not) and
  memory analysis (temporaries), the number of fusions and of cross-device
  collectives, and the bytes all-gathered.
* :func:`step_optimizers` and :func:`compile_step`: ``rule + adam`` on the 25M tree
  of ``clip_overhead.py`` (or one 8192 x 8192 leaf; float32 parameters, float32 or
  bfloat16 gradients; params and state donated), next to adam alone and Optax's own
  rules, with the gradients, parameters and state placed by a sharding.

The limits the issue tracker set for the fused step (``LIMITS``) are bytes over adam
alone's: a rule that scales by a norm must read the gradients once more (1.09x with
float32 gradients, 1.05x with bfloat16 ones on a v5e), ``clip_by_value`` fuses into
Adam's pass, AGC also reads the parameters.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_overhead  # noqa: E402  pylint: disable=wrong-import-position

_ITEMSIZE = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4,
             "u64": 8, "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1, "c64": 8,
             "c128": 16}
# Instructions that launch no kernel and move no data (or whose data an earlier
# "-start" instruction already counted).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "opt-barrier", "optimization-barrier", "copy-done", "slice-done",
         "all-reduce-done", "all-gather-done", "collective-permute-done", "send-done",
         "recv-done", "async-done", "async-update"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\((.*?)\)(.*)$")
_COMMENT = re.compile(r"/\*.*?\*/")


def arrays(shape: str) -> list:
  """``[(bytes, memory space)]`` of every array in an HLO shape string."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    space = re.search(r"S\((\d+)\)", layout or "")
    out.append((n * _ITEMSIZE.get(dtype, 0), int(space.group(1)) if space else 0))
  return out


def shape_bytes(shape: str, hbm_only: bool = True) -> int:
  """Bytes of an HLO shape such as ``(f32[], bf16[1024,64]{1,0})`` (HBM arrays only)."""
  return sum(b for b, space in arrays(shape) if space == 0 or not hbm_only)


def _tuple_elements(shape: str) -> list:
  """The top-level elements of a tuple shape string (the shape itself if no tuple)."""
  s = shape.strip()
  if not s.startswith("("):
    return [s]
  out, depth, cur = [], 0, ""
  for ch in s[1:-1]:
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
    if ch == "," and depth == 0:
      out.append(cur.strip())
      cur = ""
    else:
      cur += ch
  return out + [cur.strip()]


def kernels(hlo_text: str) -> list:
  """``[(name, opcode, HBM bytes read, HBM bytes written)]`` for the entry computation."""
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  shapes, rows = {}, []
  for line in entry.splitlines()[1:]:
    m = _INSTR.match(_COMMENT.sub("", line))
    if not m:
      continue
    name, shape, op, args, _ = m.groups()
    shapes[name] = shape
    if op in _FREE:
      continue
    operands = re.findall(r"%([\w.\-]+)", args)
    if op == "copy-start":  # (destination, source, context)
      dest, src = _tuple_elements(shape)[:2]
      read, written = shape_bytes(src), shape_bytes(dest)
    elif op == "slice-start":  # ((source), destination, context): a slice is read
      dest = _tuple_elements(shape)[1]
      read = shape_bytes(dest, hbm_only=False) if shape_bytes(shapes.get(
          operands[0], "")) else 0
      written = shape_bytes(dest)
    elif op == "conditional":
      read, written = shape_bytes(shapes.get(operands[0], "")), 0
    else:
      read = sum(shape_bytes(shapes.get(o, "")) for o in operands)
      written = shape_bytes(shape)
    rows.append((name, op, read, written))
  return rows


def collectives(hlo_text: str) -> dict:
  """``{kind: (count, bytes)}`` of the cross-device collectives in the whole module."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(_COMMENT.sub("", line))
    if not m:
      continue
    _, shape, op, _, _ = m.groups()
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind in COLLECTIVES:
      count, nbytes = out.get(kind, (0, 0))
      elements = _tuple_elements(shape)
      if op.endswith("-start") and len(elements) > 1:
        elements = elements[1:2]  # (operands, results, ...): the results
      out[kind] = (count + 1, nbytes + sum(shape_bytes(e, False) for e in elements))
  return out


def summary(compiled) -> dict:
  """The traffic model, XLA's analyses and the op counts of one compiled program."""
  text = compiled.as_text()
  rows = kernels(text)
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
    cost = cost[0] if cost else {}
  try:
    temp = compiled.memory_analysis().temp_size_in_bytes / 1e6
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    temp = None
  accessed = cost.get("bytes accessed")
  return {"kernels": len(rows),
          "fusions": sum(op == "fusion" for _, op, _, _ in rows),
          "read_mb": sum(r[2] for r in rows) / 1e6,
          "write_mb": sum(r[3] for r in rows) / 1e6,
          "hbm_mb": sum(r[2] + r[3] for r in rows) / 1e6,
          "bytes_accessed_mb": None if accessed is None else accessed / 1e6,
          "temp_mb": temp,
          "collectives": {k: v[0] for k, v in collectives(text).items()},
          "gathered_mb": collectives(text).get("all-gather", (0, 0))[1] / 1e6}


# ----------------------------------------------------------------- the fused step

# Each rule of gradclip_jax and Optax's counterpart where it has one.
COUNTERPART = {"clip_by_global_norm": "optax.clip_by_global_norm",
               "clip_by_value": "optax.clip",
               "adaptive_grad_clip": "optax.adaptive_grad_clip"}
# Bytes over adam alone's, (float32 gradients, bfloat16 gradients), from the issue.
_NORM = (1.09, 1.05)
LIMITS = {"clip_by_global_norm": _NORM, "clip_by_norm": _NORM, "autoclip": _NORM,
          "zclip": _NORM, "adagc": _NORM, "clip_by_value": (1.01, 1.01),
          "adaptive_grad_clip": (1.17, 1.12)}


def step_optimizers() -> dict:
  """name -> factory: adam alone, each rule + adam, Optax's rules + adam."""
  out = dict(clip_overhead.optimizers(adaptive=True))
  adam = lambda: optax.adam(1e-3)
  extra = {"optax.clip": lambda: optax.clip(0.01),
           "optax.adaptive_grad_clip": lambda: optax.adaptive_grad_clip(0.01)}
  for name, make in extra.items():
    out[name] = lambda make=make: optax.chain(make(), adam())
  return out


# The parameter trees of the fused step: the 25M tree of clip_overhead.py, and one
# leaf larger than a TPU v5e's 128 MiB of on-chip VMEM (nothing of it stays on chip).
TREES = {"25M": lambda: clip_overhead.make_tree("25M", jnp.float32),
         "one 67M leaf": lambda: {"w": jnp.zeros((8192, 8192), jnp.float32)}}


def step_shapes(grad_dtype, tree: str = "25M") -> tuple:
  """(params, grads) as ``ShapeDtypeStruct`` trees: float32 params, ``grad_dtype`` grads."""
  params = jax.eval_shape(TREES[tree])
  grads = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(grad_dtype)),
                       params)
  return params, grads


def placed(tree, sharding_of: Callable) -> object:
  """``tree`` of shapes with ``sharding_of(leaf)`` attached to every leaf."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=sharding_of(x)), tree)


def compile_step(make_tx: Callable, grad_dtype, sharding_of: Callable,
                 platform: Optional[str] = None, tree: str = "25M"):
  """The compiled ``p, s = step(p, s, g)`` of ``make_tx()`` (params, state donated)."""
  params, grads = step_shapes(grad_dtype, tree)
  tx = make_tx()

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  state = jax.eval_shape(tx.init, params)
  # The state takes the sharding of the leaf it mirrors; scalars are replicated.
  args = (placed(params, sharding_of), placed(state, sharding_of),
          placed(grads, sharding_of))
  traced = jax.jit(step, donate_argnums=(0, 1)).trace(*args)
  lowered = traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()
  return lowered.compile()


def ratio_rows(results: dict, base: str = "adam alone") -> dict:
  """name -> summary with ``hbm_ratio`` / ``accessed_ratio`` over ``base`` added."""
  ref = results[base]
  out = {}
  for name, r in results.items():
    r = dict(r)
    r["hbm_ratio"] = r["hbm_mb"] / ref["hbm_mb"]
    if r["bytes_accessed_mb"] is not None and ref["bytes_accessed_mb"]:
      r["accessed_ratio"] = r["bytes_accessed_mb"] / ref["bytes_accessed_mb"]
    out[name] = r
  return out


def verdict(name: str, rows: dict, dtype: str, key: str = "hbm_ratio") -> str:
  """'ok' or what is missed: the issue's limit and Optax's counterpart, on ``key``."""
  if name not in LIMITS or key not in rows[name]:
    return ""
  value = rows[name][key]
  limit = LIMITS[name][0 if dtype == "float32" else 1]
  missed = []
  if value > limit + 5e-4:
    missed.append(f"> {limit:.2f}")
  other = COUNTERPART.get(name)
  if other in rows and key in rows[other] and value > rows[other][key] + 5e-4:
    missed.append(f"> {other}")
  return "ok" if not missed else ", ".join(missed)


__all__ = ["COLLECTIVES", "COUNTERPART", "LIMITS", "arrays", "collectives",
           "compile_step", "kernels", "placed", "ratio_rows", "shape_bytes",
           "step_optimizers", "step_shapes", "summary", "TREES", "verdict"]


# ------------------------------------------------------------------ the report


def versions(*dists: str) -> dict:
  """jax's and optax's versions, and those of ``dists`` that are installed."""
  out = {"jax": jax.__version__, "optax": optax.__version__}
  for dist in dists:
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def run_info(script: str, argv, ver: dict) -> str:
  """The date, versions, host, load average and command line of a report."""
  args = " " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""
  return (f"{datetime.date.today().isoformat()}, "
          f"{', '.join(f'{k} {v}' for k, v in ver.items())}; host "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}.\n"
          f"Command: `python benchmarks/{script}{args}`.")


class Report:
  """Markdown sections, printed as they come and written at the end."""

  def __init__(self, head: str):
    self.sections = []
    self.add(head)

  def add(self, section: str) -> None:
    print(section, flush=True)
    self.sections.append(section)

  def write(self, result: dict, json_path: Optional[str], md_path: Optional[str]) -> None:
    if json_path:
      with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    if md_path:
      with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(self.sections))
