"""Devices of a run: the data-parallel mesh, batch sharding, multi-host start-up.

The batch is sharded on its leading axis over a 1-D mesh (axis :data:`DATA_AXIS`), the
parameters are replicated, and ``jit`` (GSPMD) inserts the gradient all-reduce. In a
multi-host run (:func:`initialize_distributed`) the mesh spans every process's devices
(``jax.devices()``) and each process feeds its own rows of every global batch
(:func:`shard_batch`, via ``jax.make_array_from_process_local_data``).

Multi-host runs on XLA:CPU (gloo) need two rules, which the trainers follow:

* **A bounded run-ahead.** Dispatch is asynchronous, and XLA:CPU admits at most 32
  programs in flight per device; the launch that finds the limit reached blocks a thread
  of the client's pool, which has one thread per core. A program with collectives runs
  on every local device at once, each on its own pool thread; with as many devices as
  cores (2 and 2 in the tests) it then waits for a thread that the blocked launch holds,
  and the processes, each waiting in its collective for the other, hang. So a loop
  waits for its latest result at least every :data:`MAX_AHEAD` programs
  (:func:`pace`), and does one jitted program per step (no eager ``jnp`` ops on global
  arrays between them).
* **No hidden collectives.** ``jax.device_put`` of host data onto a sharding that spans
  several processes checks that every process passed the same value, an all-gather per
  array; :func:`put` and :func:`replicate` place each process's shards directly.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gradclip_jax.training.errors import UsageError

__all__ = ["DATA_AXIS", "MAX_AHEAD", "initialize_distributed", "num_data_devices",
           "make_mesh", "put", "on_one_device", "replicate", "shard_batch", "process_rows",
           "to_host", "pace"]

log = logging.getLogger(__name__)

#: Name of the mesh axis the batch is sharded over.
DATA_AXIS = "data"

#: Most programs a training or evaluation loop dispatches before it waits for the last
#: one (:func:`pace`); half of XLA:CPU's limit of 32 in flight per device.
MAX_AHEAD = 16


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """``jax.distributed.initialize`` (``gradclip ... --distributed``).

  Arguments left ``None`` come from JAX's cluster auto-detection (SLURM, Open MPI,
  Cloud TPU pods, GKE, ...) or its ``JAX_COORDINATOR_ADDRESS`` variable. Must run before
  anything else touches the devices.
  """
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except (ValueError, TypeError) as e:  # JAX's checks of the arguments
    raise UsageError(f"--distributed: {e} (give --coordinator-address, --num-processes "
                     "and --process-id, or run under a cluster JAX detects)") from e
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def num_data_devices(batch_size: int, requested: int | None = None) -> int:
  """Number of devices to shard a batch of ``batch_size`` over.

  ``requested`` (``--num-devices``) must divide ``batch_size`` and not exceed
  ``len(jax.devices())``. By default, the largest device count <= ``len(jax.devices())``
  dividing ``batch_size`` (e.g. 4 of 8 devices for batch 20). A multi-host run uses
  every device of every process, so their number must divide the batch.
  """
  available = len(jax.devices())
  if jax.process_count() > 1:
    if requested not in (None, available):
      raise UsageError(f"--num-devices {requested}: a multi-host run uses all {available} "
                       "devices of its processes")
    if batch_size % available:
      raise UsageError(f"batch size {batch_size} is not divisible by the {available} "
                       f"devices of the {jax.process_count()} processes")
    return available
  if requested is not None:
    if not 1 <= requested <= available:
      raise UsageError(f"--num-devices {requested}: {available} device(s) available")
    if batch_size % requested:
      raise UsageError(f"--num-devices {requested} does not divide batch size {batch_size}")
    return requested
  return max(n for n in range(1, available + 1) if batch_size % n == 0)


def make_mesh(num_devices: int) -> Mesh | None:
  """A 1-D ``Mesh`` over the first ``num_devices`` devices, or ``None`` for one device."""
  if num_devices <= 1:
    return None
  devices = np.asarray(jax.devices()[:num_devices])
  return Mesh(devices, (DATA_AXIS,))


def put(tree: Any, shardings: Any) -> Any:
  """``jax.device_put(tree, shardings)`` of values that every process holds in full.

  ``shardings`` is one ``Sharding`` or a pytree of them like ``tree``. In a multi-host run
  each process places the shards of its own devices from its copy
  (``jax.make_array_from_callback``), with no cross-process check: ``device_put`` would
  all-gather every array to compare the copies (the values here are the same by
  construction: same seed, same data).
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(a, sharding):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda a: one(a, shardings), tree)
  return jax.tree.map(one, tree, shardings)


def on_one_device(tree: Any) -> Any:
  """``tree`` committed to the first device (a run without a mesh).

  Committed, not merely placed: ``jax.device_put(tree)`` leaves arrays uncommitted, and a
  jitted step fed uncommitted arrays on its first call and its own (committed) outputs
  afterwards is compiled twice.
  """
  return jax.device_put(tree, jax.devices()[0])


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Places every array of ``tree`` on all devices of ``mesh`` (without a mesh: commits
  it to the first device, :func:`on_one_device`)."""
  if mesh is None:
    return on_one_device(tree)
  return put(tree, NamedSharding(mesh, P()))


def process_rows(n: int, mesh: Mesh) -> slice:
  """The rows of a global batch of ``n`` rows that this process feeds to ``mesh``.

  Rows go to devices in mesh order (``n / mesh.size`` each), so a process holds those
  of its devices: one contiguous block, as ``jax.devices()`` lists each process's
  devices together.
  """
  per_device = n // mesh.size
  mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
  start, stop = mine[0] * per_device, (mine[-1] + 1) * per_device
  if len(mine) * per_device != stop - start:
    raise ValueError("this process's devices are not contiguous in the mesh")
  return slice(start, stop)


def shard_batch(tree: Any, mesh: Mesh | None) -> Any:
  """Shards every array of ``tree`` (a global batch) along its leading axis over ``mesh``.

  Every process passes the same global batch; in a multi-host run each one places only
  its rows (:func:`process_rows`) and the result is the global array.
  """
  if mesh is None:
    return on_one_device(tree)
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_process_local_data(sharding, a[process_rows(len(a), mesh)],
                                                  a.shape)

  return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
  """NumPy copies of a pytree of (possibly batch-sharded, multi-host) arrays.

  In a multi-host run a replicated array is read from this process's copy; any other is
  all-gathered (``multihost_utils.process_allgather``), leaf by leaf in ``tree``'s order,
  which is the same in every process.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def one(x):
    if isinstance(x, jax.Array) and x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return multihost_utils.process_allgather(x, tiled=True)

  return jax.tree.map(one, tree)


def pace(count: int, tree: Any) -> None:
  """Waits for ``tree`` every :data:`MAX_AHEAD` calls: call it after the ``count``-th
  program of a loop (1-based) with that program's output, in every process."""
  if count % MAX_AHEAD == 0:
    jax.block_until_ready(tree)
