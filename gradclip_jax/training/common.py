"""Shared pieces of the ``gradclip`` trainers (``gradclip ptb``, ``gradclip classify``).

The public API is deliberately small:

* :data:`RULES` and :func:`build_clip` -- the clipping rule selected by ``--clip``.
* :func:`add_common_arguments` -- the flags every trainer accepts
  (``--data-dir --workdir --clip --clip-value --max-steps --max-epochs --seed --resume``
  plus ``--checkpoint-every --num-devices --no-progress``).
* :func:`clipped_this_step` -- the metrics convention: did the rule change the gradient?
* :func:`grad_norm` -- the per-step gradient norm logged by the trainers.
* :class:`MetricsWriter` -- ``metrics.jsonl`` (one JSON object per line).
* :class:`Checkpointer` -- orbax checkpoints of an arbitrary pytree plus a JSON dict
  (data position, metric accumulators, ...), so that ``--resume`` is exact.
* :func:`progress_bar` -- a tqdm bar, disabled off a TTY or with ``--no-progress``.
* :func:`num_data_devices`, :func:`make_mesh`, :func:`replicate`, :func:`shard_batch`
  -- data parallelism over ``jax.devices()``: batch sharded on the leading axis,
  parameters replicated; ``jit`` (GSPMD) inserts the gradient all-reduce.

Everything here is framework plumbing; the clipping itself lives in :mod:`gradclip_jax`.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import pathlib
import sys
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "RULES",
    "DATA_AXIS",
    "build_clip",
    "add_common_arguments",
    "clipped_this_step",
    "grad_norm",
    "MetricsWriter",
    "Checkpointer",
    "progress_bar",
    "num_data_devices",
    "make_mesh",
    "replicate",
    "shard_batch",
]

# ---------------------------------------------------------------------------
# Clipping rules.
# ---------------------------------------------------------------------------

#: Names accepted by ``--clip`` (and :func:`build_clip`).
RULES = (
    "none",
    "global_norm",
    "value",
    "norm",
    "average_norm",
    "autoclip",
    "zclip",
    "adagc",
    "agc",
)

# Rules whose threshold is a norm / value taken from the config when --clip-value is absent.
_THRESHOLD_RULES = {
    "global_norm": "clip_by_global_norm",
    "value": "clip_by_value",
    "norm": "clip_by_norm",
    "average_norm": "clip_by_average_norm",
}
# Adaptive rules (gradclip_jax/_adaptive.py): their own defaults, unless --clip-value is
# given, which sets the keyword argument named here (the rule's threshold).
_ADAPTIVE_RULES = {
    "autoclip": ("autoclip", "percentile"),
    "zclip": ("zclip", "z_threshold"),
    "adagc": ("adagc", "lambda_rel"),
    "agc": ("adaptive_grad_clip", "clipping"),
}


def _resolve(attr: str, rule: str):
  import gradclip_jax  # pylint: disable=import-outside-toplevel

  fn = getattr(gradclip_jax, attr, None)
  if fn is None:
    raise NotImplementedError(
        f"--clip {rule} needs gradclip_jax.{attr}, which this gradclip_jax does not provide"
    )
  return fn


def build_clip(
    name: str, value: float | None, default_max_norm: float
) -> optax.GradientTransformation:
  """Returns the gradient transformation for clipping rule ``name``.

  Args:
    name: one of :data:`RULES`.
    value: the ``--clip-value`` flag, or ``None``.
    default_max_norm: the threshold used by the norm/value rules when ``value`` is
      ``None`` (e.g. the config's ``max_grad_norm``). The adaptive rules (``autoclip``,
      ``zclip``, ``adagc``, ``agc``) ignore it and use their own defaults; if ``value``
      is given it sets their threshold: ``autoclip(percentile=v)``,
      ``zclip(z_threshold=v)``, ``adagc(lambda_rel=v)``, ``adaptive_grad_clip(clipping=v)``.

  Mapping: ``none`` -> ``optax.identity()``, ``global_norm`` ->
  ``clip_by_global_norm(v)``, ``value`` -> ``clip_by_value(-v, v)``, ``norm`` ->
  ``clip_by_norm(v)``, ``average_norm`` -> ``clip_by_average_norm(v)``, ``autoclip`` /
  ``zclip`` / ``adagc`` -> the rule of that name, ``agc`` -> ``adaptive_grad_clip``
  (which needs ``params``: callers must always call ``tx.update(grads, state, params)``).
  """
  if name == "none":
    return optax.identity()
  if name in _THRESHOLD_RULES:
    v = float(default_max_norm if value is None else value)
    if not (v > 0 and math.isfinite(v)):
      raise ValueError(f"--clip {name} needs a positive finite threshold, got {v}")
    fn = _resolve(_THRESHOLD_RULES[name], name)
    return fn(-v, v) if name == "value" else fn(v)
  if name in _ADAPTIVE_RULES:
    attr, keyword = _ADAPTIVE_RULES[name]
    fn = _resolve(attr, name)
    if value is not None:
      return fn(**{keyword: float(value)})
    required = [
        p for p in inspect.signature(fn).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if required:
      raise ValueError(f"--clip {name} needs --clip-value ({required[0].name})")
    return fn()
  raise ValueError(f"unknown clipping rule {name!r}; choose one of {', '.join(RULES)}")


def _num_clipped(state) -> jax.Array:
  """Sum of every ``num_clipped`` counter found in an optimizer state (0 if none)."""
  leaves = [v for _, v in optax.tree_utils.tree_get_all_with_path(state, "num_clipped")]
  if not leaves:
    return jnp.zeros((), jnp.int32)
  return sum(jnp.asarray(v, jnp.int32) for v in leaves)


def grad_norm(grads, new_state=None) -> jax.Array:
  """The step's gradient norm: ``gradclip_jax.functional.global_norm(grads)``.

  When ``new_state`` (the optimizer state after the update) holds exactly one
  ``ClipByGlobalNormState``, its pre-clip ``global_norm`` -- the same number, already
  computed by the rule -- is returned instead, so logging the norm costs nothing extra
  in a clipped run. (The state does not record ``norm_type``; :func:`build_clip` only
  makes L2 rules -- pass ``new_state=None`` for a rule built with another norm.)
  Use inside ``jit``.
  """
  if new_state is not None:
    found = optax.tree_utils.tree_get_all_with_path(
        new_state, "global_norm",
        filtering=lambda path, _: getattr(path[-1], "tuple_name", None)
        == "ClipByGlobalNormState")
    if len(found) == 1:
      return jnp.asarray(found[0][1], jnp.float32)
  import gradclip_jax  # pylint: disable=import-outside-toplevel

  return gradclip_jax.functional.global_norm(grads)


def clipped_this_step(old_state, new_state) -> jax.Array:
  """True where the clipping rule changed the gradient in this update.

  The convention of both trainers: a rule's ``num_clipped`` counter (int32, the number
  of steps in which it clipped) went up between ``old_state`` and ``new_state``.
  Works inside ``jit``; returns a boolean scalar (False for ``--clip none``).
  """
  return _num_clipped(new_state) > _num_clipped(old_state)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def add_common_arguments(
    parser: argparse.ArgumentParser, *, default_clip: str = "global_norm"
) -> None:
  """Adds the flags shared by every trainer to ``parser``."""
  g = parser.add_argument_group("common training options")
  g.add_argument("--data-dir", required=True, type=pathlib.Path,
                 help="folder holding the data set files (plain or .gz)")
  g.add_argument("--workdir", required=True, type=pathlib.Path,
                 help="output folder: metrics.jsonl and checkpoints/")
  g.add_argument("--clip", default=default_clip, choices=RULES, metavar="RULE",
                 help=f"gradient clipping rule, one of: {', '.join(RULES)} "
                 f"(default {default_clip})")
  g.add_argument("--clip-value", type=float, default=None,
                 help="threshold for the rule (default: the config's max_grad_norm); "
                 "for the adaptive rules it sets autoclip's percentile, zclip's "
                 "z_threshold, adagc's lambda_rel, agc's clipping (default: theirs)")
  g.add_argument("--max-steps", type=int, default=None,
                 help="stop after this many training steps in total (smoke runs); "
                 "metrics and a checkpoint are written first")
  g.add_argument("--max-epochs", type=int, default=None,
                 help="override the config's number of epochs")
  g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
  g.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --workdir")
  g.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS",
                 help="also checkpoint every this many steps inside an epoch "
                 "(0: only at epoch ends; default 500)")
  g.add_argument("--num-devices", type=int, default=None,
                 help="data-parallel devices to use (default: the largest number of "
                 "jax.devices() that divides the batch size)")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()
  return x


class MetricsWriter:
  """Appends one JSON object per line to ``workdir/metrics.jsonl``.

  ``MetricsWriter(workdir, records)`` rewrites the file with ``records`` first (pass
  the records stored in a checkpoint on ``--resume``, so a run killed between an
  epoch's metrics line and its checkpoint never duplicates or loses a line).
  ``records`` is also kept in memory as :attr:`records`.
  """

  FILENAME = "metrics.jsonl"

  def __init__(self, workdir: os.PathLike | str, records: Iterable[Mapping] = ()):
    self.path = pathlib.Path(workdir) / self.FILENAME
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.records: list[dict] = [_jsonable(r) for r in records]
    with open(self.path, "w", encoding="utf-8") as f:
      for r in self.records:
        f.write(json.dumps(r) + "\n")

  def write(self, record: Mapping) -> None:
    r = _jsonable(record)
    self.records.append(r)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(r) + "\n")
      f.flush()
      os.fsync(f.fileno())

  @staticmethod
  def read(workdir: os.PathLike | str) -> list[dict]:
    """The records of ``workdir/metrics.jsonl``."""
    path = pathlib.Path(workdir) / MetricsWriter.FILENAME
    with open(path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------


class Checkpointer:
  """Orbax checkpoints in ``workdir/checkpoints``: a pytree of arrays plus a JSON dict.

  Save everything needed for an exact resume: in the pytree the parameters, optimizer
  state, recurrent carry and PRNG key (store ``jax.random.key_data(key)``); in ``meta``
  the data position (epoch, step in epoch), host-side metric accumulators and the
  metric records written so far. ``step`` is the global training step; saving the
  same step twice replaces the earlier checkpoint.
  """

  def __init__(self, workdir: os.PathLike | str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    self._ocp = ocp
    self.directory = pathlib.Path(workdir).resolve() / "checkpoints"
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False),
        item_names=("state", "meta"),
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, meta: Mapping) -> None:
    ocp = self._ocp
    if step in self._mngr.all_steps():
      self._mngr.delete(step)
    self._mngr.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_jsonable(meta))),
        force=True,
    )
    self._mngr.wait_until_finished()

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict] | None:
    """Restores into the structure, shapes, dtypes and shardings of ``target``.

    Returns ``(state, meta)``, or ``None`` when there is no checkpoint.
    """
    ocp = self._ocp
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    out = self._mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
    )
    return out["state"], dict(out["meta"])

  def close(self) -> None:
    self._mngr.close()


# ---------------------------------------------------------------------------
# Progress bar.
# ---------------------------------------------------------------------------


def progress_bar(total: int | None, desc: str = "", *, disable: bool = False,
                 initial: int = 0, unit: str = "step"):
  """A tqdm bar on stderr; disabled when ``disable`` or stderr is not a TTY."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True,
              disable=disable or not sys.stderr.isatty(), leave=False)


# ---------------------------------------------------------------------------
# Data parallelism.
# ---------------------------------------------------------------------------

#: Name of the mesh axis the batch is sharded over.
DATA_AXIS = "data"


def num_data_devices(batch_size: int, requested: int | None = None) -> int:
  """Number of devices to shard a batch of ``batch_size`` over.

  ``requested`` (``--num-devices``) must divide ``batch_size`` and not exceed
  ``len(jax.devices())``. By default, the largest device count <= ``len(jax.devices())``
  dividing ``batch_size`` (e.g. 4 of 8 devices for batch 20).
  """
  available = len(jax.devices())
  if requested is not None:
    if not 1 <= requested <= available:
      raise ValueError(f"--num-devices {requested}: {available} device(s) available")
    if batch_size % requested:
      raise ValueError(f"--num-devices {requested} does not divide batch size {batch_size}")
    return requested
  return max(n for n in range(1, available + 1) if batch_size % n == 0)


def make_mesh(num_devices: int) -> Mesh | None:
  """A 1-D ``Mesh`` over the first ``num_devices`` devices, or ``None`` for one device."""
  if num_devices <= 1:
    return None
  devices = np.asarray(jax.devices()[:num_devices])
  return Mesh(devices, (DATA_AXIS,))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Places every array of ``tree`` on all devices of ``mesh`` (no-op without a mesh)."""
  if mesh is None:
    return jax.device_put(tree)
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(tree: Any, mesh: Mesh | None) -> Any:
  """Shards every array of ``tree`` along its leading (batch) axis over ``mesh``."""
  if mesh is None:
    return jax.device_put(tree)
  return jax.device_put(tree, NamedSharding(mesh, P(DATA_AXIS)))
