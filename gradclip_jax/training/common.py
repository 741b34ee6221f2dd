"""Shared pieces of the ``gradclip`` trainers (``gradclip ptb``, ``gradclip classify``).

The public API is deliberately small:

* :data:`RULES` and :func:`build_clip` -- the clipping rule selected by ``--clip``.
* :func:`add_common_arguments` -- the flags every trainer accepts
  (``--data-dir --workdir --clip --clip-value --max-steps --max-epochs --seed --resume``
  plus ``--checkpoint-every --num-devices --no-progress``).
* :func:`clipped_this_step` -- the metrics convention: did the rule change the gradient?
* :func:`update_with_norm` (on :func:`norm_before_update` and :func:`grad_norm`) -- the
  optimizer update and the per-step gradient norm logged by the trainers.
* :class:`MetricsWriter` -- ``metrics.jsonl`` (one JSON object per line).
* :class:`Checkpointer` -- orbax checkpoints of an arbitrary pytree plus a JSON dict
  (data position, metric accumulators, ...), so that ``--resume`` is exact.
* :func:`progress_bar` -- a tqdm bar, disabled off a TTY or with ``--no-progress``.
* :func:`num_data_devices`, :func:`make_mesh`, :func:`replicate`, :func:`shard_batch`
  -- data parallelism over ``jax.devices()``: batch sharded on the leading axis,
  parameters replicated; ``jit`` (GSPMD) inserts the gradient all-reduce.
* DP-SGD (``--dp``): :func:`add_dp_arguments`, :func:`dp_flags_from_args` (flag checks),
  :class:`DPFlags` / :class:`DPSettings` (noise multiplier from ``--target-epsilon``,
  epsilon spent after ``n`` steps), :func:`dp_transform` (noise and ``1/B``),
  :func:`dp_clipped_grad` and :func:`dp_example_stats`; :class:`FlagError`.

Everything here is framework plumbing; the clipping itself lives in :mod:`gradclip_jax`.
"""
from __future__ import annotations

import argparse
import dataclasses
import contextlib
import inspect
import json
import logging
import math
import os
import pathlib
import sys
import warnings
from typing import Any, Callable, Iterable, Mapping

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
    "norm_before_update",
    "update_with_norm",
    "tune_host_allocator",
    "MetricsWriter",
    "Checkpointer",
    "progress_bar",
    "num_data_devices",
    "make_mesh",
    "replicate",
    "shard_batch",
    "FlagError",
    "DP_METHODS",
    "DEFAULT_DELTA",
    "add_dp_arguments",
    "dp_flags_from_args",
    "DPFlags",
    "DPSettings",
    "dp_noise_seed",
    "dp_transform",
    "dp_clipped_grad",
    "dp_example_stats",
    "check_dp_resume",
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


# glibc's mallopt parameters (malloc.h) and the values tune_host_allocator sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 256 << 20
_TRIM_THRESHOLD = 1 << 30
ALLOCATOR_ENV = "GRADCLIP_TUNE_MALLOC"


def tune_host_allocator() -> bool:
  """Keeps freed host memory for reuse instead of unmapping it (glibc only).

  XLA:CPU allocates the temporary buffers of every step afresh. glibc serves blocks
  above its mmap threshold (at most 32 MB after its own adjustments) with ``mmap`` and
  returns them with ``munmap``, so the next step pays a page fault for every 4 KB of
  every large buffer it writes: the PTB small step spent ~11 ms of ~45 ms in them
  (measured with ``jax.profiler``: the 16 MB logits and the embedding gradient's zero
  fill). With an mmap threshold of 256 MB and a trim threshold of 1 GB the buffers stay
  in the heap and are reused: 9.1k -> 12.1k words/s on PTB small on the 2-core CPU
  (``benchmarks/ptb_speed.py``). The cost is a process that keeps up to ~1 GB of freed
  memory instead of returning it to the OS.

  Process-wide, so only the ``gradclip`` trainers and the PTB speed benchmark call it
  (importing ``gradclip_jax`` never does). Set ``GRADCLIP_TUNE_MALLOC=0`` to turn it
  off. Returns whether the settings were applied (False off glibc / Linux).
  """
  if os.environ.get(ALLOCATOR_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  if not sys.platform.startswith("linux"):
    return False
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl)
    return False
  return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
      mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def _recorded_norms(opt_state) -> list:
  return optax.tree_utils.tree_get_all_with_path(
      opt_state, "global_norm",
      filtering=lambda path, _: getattr(path[-1], "tuple_name", None)
      == "ClipByGlobalNormState")


def norm_before_update(grads, opt_state) -> tuple[Any, jax.Array | None]:
  """``(grads, norm)`` for logging, taken before ``tx.update`` (use inside ``jit``).

  When ``opt_state`` holds exactly one ``ClipByGlobalNormState``, the rule records the
  norm itself: returns ``(grads, None)``, and :func:`grad_norm` reads it after the update.
  Otherwise ``norm = gradclip_jax.functional.global_norm(grads)`` and the gradients come
  back multiplied by ``where(norm < 0, 0, 1)``, which is exactly 1 (a norm is >= 0 or
  NaN), so no value changes. That factor makes every parameter update depend on every
  gradient, as a global-norm clip does: without it (``--clip none``, per-element rules)
  XLA:CPU cannot prove that the backward pass has finished reading a donated weight
  before the optimizer overwrites it, and copies the weights at every step (the 8 MB
  softmax and both input kernels of the PTB small config). ``lax.optimization_barrier``
  does not give copy insertion that ordering; a data dependency does. The multiply fuses
  into the optimizer's update.
  """
  if len(_recorded_norms(opt_state)) == 1:
    return grads, None
  import gradclip_jax  # pylint: disable=import-outside-toplevel

  norm = gradclip_jax.functional.global_norm(grads)
  one = jnp.where(norm < 0, 0.0, 1.0)
  return jax.tree.map(lambda g: g * one.astype(g.dtype), grads), norm


def update_with_norm(tx, grads, opt_state, params):
  """``tx.update`` plus the step's pre-clip gradient norm for logging (inside ``jit``).

  Returns ``(updates, new_state, norm)``: the norm the rule recorded, else one computed
  here, with the gradients tied to it (see :func:`norm_before_update`).
  """
  grads, norm = norm_before_update(grads, opt_state)
  updates, new_state = tx.update(grads, opt_state, params)
  if norm is None:  # The rule recorded it.
    norm = grad_norm(grads, new_state)
  return updates, new_state, norm


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
    found = _recorded_norms(new_state)
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


class FlagError(ValueError):
  """A bad combination of command-line flags (``gradclip`` reports it as a usage error)."""


class _StoreExplicit(argparse.Action):
  """``store``, and remember in ``namespace._explicit`` that the flag was given."""

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, values)
    setattr(namespace, "_explicit", set(getattr(namespace, "_explicit", ())) | {self.dest})


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
                 action=_StoreExplicit,
                 help=f"gradient clipping rule, one of: {', '.join(RULES)} "
                 f"(default {default_clip}; with --dp only 'none' may be given)")
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

  def restore_meta(self, step: int | None = None) -> tuple[int, dict] | None:
    """``(step, meta)`` of a checkpoint without reading its arrays (``None``: none)."""
    ocp = self._ocp
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return step, dict(out["meta"])

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


# ---------------------------------------------------------------------------
# Differential privacy (DP-SGD).
# ---------------------------------------------------------------------------

#: ``--dp-method``: how ``gradclip_jax.clipped_grad`` gets the per-example norms.
DP_METHODS = ("auto", "ghost", "vmap")
#: ``--delta`` when not given.
DEFAULT_DELTA = 1e-5
_DP_FLAGS = {"noise_multiplier": "--noise-multiplier", "target_epsilon": "--target-epsilon",
             "delta": "--delta", "dp_max_norm": "--dp-max-norm", "dp_method": "--dp-method"}


@contextlib.contextmanager
def _quiet_absl():
  """dp-accounting logs a warning per RDP order it drops (large sampling rates): hide them."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(max(level, logging.ERROR))
  try:
    yield
  finally:
    logger.setLevel(level)


def add_dp_arguments(parser: argparse.ArgumentParser, *, unit: str,
                     default_method: str = "auto") -> None:
  """Adds the DP-SGD flags (``--dp --noise-multiplier --target-epsilon --delta ...``).

  ``unit`` names the privacy unit in the help text (e.g. "one review").
  """
  g = parser.add_argument_group(
      "differential privacy (DP-SGD)",
      f"Privacy unit: {unit}. Each example's gradient is clipped to L2 norm "
      "--dp-max-norm (this replaces --clip), Gaussian noise of stddev "
      "noise_multiplier * dp_max_norm is added to the sum, and the sum is divided by "
      "the batch size. Epsilon is accounted with the RDP accountant assuming Poisson "
      "sampling with rate batch_size / training examples (the trainers draw "
      "fixed-size shuffled batches: the customary approximation).")
  g.add_argument("--dp", action="store_true", help="train with DP-SGD")
  g.add_argument("--noise-multiplier", type=float, default=None, metavar="SIGMA",
                 help="noise stddev / dp_max_norm; derived from --target-epsilon when "
                 "omitted")
  g.add_argument("--target-epsilon", type=float, default=None, metavar="EPS",
                 help="epsilon to spend over the planned run (epochs x steps per epoch, "
                 "--max-steps ignored); sets the noise multiplier, or checks a given one")
  g.add_argument("--delta", type=float, default=None,
                 help=f"delta of the (epsilon, delta) guarantee (default {DEFAULT_DELTA})")
  g.add_argument("--dp-max-norm", type=float, default=None, metavar="C",
                 help="per-example clipping norm (default: the config's max_grad_norm)")
  g.add_argument("--dp-method", choices=DP_METHODS, default=None,
                 help=f"per-example norms: ghost norms, vmap reference, or auto "
                 f"(default {default_method})")
  parser.set_defaults(_dp_default_method=default_method)


@dataclasses.dataclass(frozen=True)
class DPFlags:
  """The DP-SGD flags as given (``None``: not given); see :func:`dp_flags_from_args`."""

  noise_multiplier: float | None = None
  target_epsilon: float | None = None
  delta: float = DEFAULT_DELTA
  max_norm: float | None = None
  method: str = "auto"

  def __post_init__(self):
    if self.noise_multiplier is None and self.target_epsilon is None:
      raise FlagError("--dp needs --noise-multiplier SIGMA or --target-epsilon EPS (or "
                      "both: then SIGMA must spend at most EPS)")
    if self.noise_multiplier is not None and not (
        self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
      raise FlagError(f"--noise-multiplier must be positive and finite, got "
                      f"{self.noise_multiplier}")
    if self.target_epsilon is not None and not (
        self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
      raise FlagError(f"--target-epsilon must be positive and finite, got "
                      f"{self.target_epsilon}")
    if not 0.0 < self.delta < 1.0:
      raise FlagError(f"--delta must be in (0, 1), got {self.delta}")
    if self.max_norm is not None and not (self.max_norm > 0 and math.isfinite(self.max_norm)):
      raise FlagError(f"--dp-max-norm must be positive and finite, got {self.max_norm}")
    if self.method not in DP_METHODS:
      raise FlagError(f"--dp-method must be one of {DP_METHODS}, got {self.method!r}")

  def resolve(self, *, batch_size: int, dataset_size: int, planned_steps: int,
              default_max_norm: float) -> DPSettings:
    """The settings of a run: the noise multiplier derived or checked against the target.

    ``batch_size`` is the (expected) batch size ``B``, ``dataset_size`` the number ``N``
    of privacy units in the training set (sampling rate ``q = B / N``), and
    ``planned_steps`` the steps of the whole planned run (epochs x steps per epoch).
    """
    from gradclip_jax.dp import accounting  # pylint: disable=import-outside-toplevel

    if not 0 < batch_size <= dataset_size:
      raise FlagError(f"--dp: batch size {batch_size} must be in [1, {dataset_size}] "
                      "(the number of training examples)")
    max_norm = float(default_max_norm if self.max_norm is None else self.max_norm)
    if not (max_norm > 0 and math.isfinite(max_norm)):
      raise FlagError(f"--dp needs a positive finite --dp-max-norm, got {max_norm}")
    q = batch_size / dataset_size
    sigma = self.noise_multiplier
    if self.target_epsilon is not None:
      with _quiet_absl():
        needed = accounting.noise_multiplier_for_epsilon(self.target_epsilon, self.delta, q,
                                                         planned_steps)
        eps = None if sigma is None else accounting.epsilon_spent(sigma, q, planned_steps,
                                                                  self.delta)
      if sigma is None:
        sigma = needed
      else:
        if eps > self.target_epsilon * (1 + 1e-9):
          raise FlagError(
              f"--noise-multiplier {sigma} and --target-epsilon {self.target_epsilon} "
              f"contradict each other: over the planned {planned_steps} steps (sampling "
              f"rate {q:.4g}, delta {self.delta:g}) it spends epsilon {eps:.3f}; "
              f"--target-epsilon {self.target_epsilon} needs a noise multiplier of at "
              f"least {needed:.4f}. Give only one of the two flags")
    if self.delta >= 1.0 / dataset_size:
      warnings.warn(f"--delta {self.delta:g} is not below 1/N = {1 / dataset_size:.3g} "
                    f"({dataset_size} training examples): a weak guarantee", stacklevel=2)
    return DPSettings(noise_multiplier=float(sigma), max_norm=max_norm, delta=self.delta,
                      batch_size=int(batch_size), dataset_size=int(dataset_size),
                      planned_steps=int(planned_steps), method=self.method,
                      target_epsilon=self.target_epsilon)


@dataclasses.dataclass(frozen=True)
class DPSettings:
  """The DP-SGD settings of one run (see :meth:`DPFlags.resolve`)."""

  noise_multiplier: float
  max_norm: float
  delta: float
  batch_size: int
  dataset_size: int
  planned_steps: int
  method: str = "auto"
  target_epsilon: float | None = None

  @property
  def sample_rate(self) -> float:
    return self.batch_size / self.dataset_size

  def epsilon(self, steps: int) -> float:
    """Epsilon spent after ``steps`` steps (RDP accountant, Poisson sampling)."""
    from gradclip_jax.dp import accounting  # pylint: disable=import-outside-toplevel

    with _quiet_absl():
      return accounting.epsilon_spent(self.noise_multiplier, self.sample_rate, int(steps),
                                      self.delta)

  def record(self, steps: int) -> dict[str, float]:
    """The DP fields of a metrics.jsonl line after ``steps`` steps."""
    return {"epsilon": self.epsilon(steps), "noise_multiplier": self.noise_multiplier,
            "dp_max_norm": self.max_norm, "delta": self.delta}

  def as_meta(self) -> dict[str, Any]:
    """What a checkpoint stores to refuse resuming with other DP settings."""
    return {"noise_multiplier": self.noise_multiplier, "max_norm": self.max_norm,
            "delta": self.delta, "batch_size": self.batch_size,
            "dataset_size": self.dataset_size}

  def describe(self) -> str:
    return (f"DP-SGD: noise multiplier {self.noise_multiplier:.4f}, per-example clip "
            f"{self.max_norm:g}, sampling rate {self.batch_size}/{self.dataset_size} = "
            f"{self.sample_rate:.4g}, delta {self.delta:g}, {self.method} norms; epsilon "
            f"{self.epsilon(self.planned_steps):.3f} after the planned "
            f"{self.planned_steps} steps")


def dp_flags_from_args(args: argparse.Namespace, *,
                       default_clip: str = "global_norm") -> DPFlags | None:
  """Checks the DP flags of ``args``; ``None`` without ``--dp``.

  With ``--dp`` the per-example clip (``--dp-max-norm``) replaces the batch-level rule:
  ``--clip`` may only be left out or be ``none``, and ``--clip-value`` must be left out.
  The DP flags without ``--dp`` are an error too.
  """
  given = [flag for attr, flag in _DP_FLAGS.items() if getattr(args, attr, None) is not None]
  if not getattr(args, "dp", False):
    if given:
      raise FlagError(f"{', '.join(given)} only apply with --dp")
    return None
  explicit = getattr(args, "_explicit", set())
  if "clip" in explicit and args.clip != "none":
    raise FlagError(f"--dp clips every example's gradient to --dp-max-norm (the DP-SGD "
                    f"sensitivity bound) in place of --clip; drop --clip {args.clip}")
  if getattr(args, "clip_value", None) is not None:
    raise FlagError("--clip-value does not apply with --dp; set the per-example clipping "
                    "norm with --dp-max-norm")
  return DPFlags(noise_multiplier=args.noise_multiplier, target_epsilon=args.target_epsilon,
                 delta=DEFAULT_DELTA if args.delta is None else args.delta,
                 max_norm=args.dp_max_norm,
                 method=args.dp_method or getattr(args, "_dp_default_method", "auto"))


def dp_noise_seed(seed: int) -> int:
  """The seed of the DP noise of a run with ``--seed seed`` (distinct from its other keys)."""
  return int(np.random.SeedSequence([int(seed), 0x44505347]).generate_state(1)[0]) >> 1


def dp_transform(dp: DPSettings, seed: int) -> optax.GradientTransformation:
  """Noise then ``1/B``: ``chain(add_noise(sigma, C, seed), scale(1 / B))``.

  Takes the *sum* of clipped per-example gradients (:func:`dp_clipped_grad`); put it in
  front of the optimizer, where the clipping rule goes otherwise. The noise key lives in
  the optimizer state (split every step from :func:`dp_noise_seed`), so a checkpointed
  run resumes with the noise of an uninterrupted one.
  """
  import gradclip_jax  # pylint: disable=import-outside-toplevel

  return optax.chain(
      gradclip_jax.add_noise(dp.noise_multiplier, dp.max_norm, seed=dp_noise_seed(seed)),
      optax.scale(1.0 / dp.batch_size))


def dp_clipped_grad(per_example_loss: Callable[..., Any], dp: DPSettings) -> Callable:
  """``clipped_grad(per_example_loss, max_norm=C, method, has_aux=True, return_norms=True)``.

  ``per_example_loss(params, *batch)`` returns ``(losses [B], aux)``; multiply the loss
  of an example that only fills a batch by 0, so it contributes nothing. The result is
  ``(clipped sum, norms [B], aux)``.
  """
  import gradclip_jax  # pylint: disable=import-outside-toplevel

  return gradclip_jax.clipped_grad(per_example_loss, max_norm=dp.max_norm, method=dp.method,
                                   has_aux=True, return_norms=True)


def dp_example_stats(norms: jax.Array, weights: jax.Array, max_norm: float
                     ) -> dict[str, jax.Array]:
  """Sum and max of the per-example norms and the number clipped, real examples only.

  ``weights`` is 0 for an example that only fills a batch; such an example (and one whose
  norm is not finite, which ``clipped_grad`` drops) is left out. Use inside ``jit``.
  """
  real = (weights > 0) & jnp.isfinite(norms)
  n = jnp.where(real, norms, 0.0)
  return {"norm_sum": jnp.sum(n), "norm_max": jnp.max(n, initial=0.0),
          "num_clipped": jnp.sum(real & (norms > max_norm)).astype(jnp.float32)}


def check_dp_resume(saved: Mapping | None, dp: DPSettings | None) -> None:
  """Refuses to resume a checkpoint written with other DP settings (or without DP)."""
  now = None if dp is None else dp.as_meta()
  saved = None if saved is None else dict(saved)
  if saved != now:
    raise FlagError(f"--resume: the checkpoint was written with DP settings {saved}, this "
                    f"run has {now}; resume with the same --dp flags and config")
