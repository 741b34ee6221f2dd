"""Checkpoints and the workdir of a run.

* :class:`Checkpointer` -- Orbax checkpoints in ``workdir/checkpoints``: a pytree of
  arrays (the train state) plus a JSON dict (data position, host-side accumulators, the
  metric records so far, the run's config), so that a resumed run is exact.
* :func:`prepare_workdir` -- a workdir belongs to one run: reusing one that holds a run
  needs ``--resume`` (continue it) or ``--overwrite`` (remove it and start afresh).
* :func:`check_resume_config` -- refuses to continue a run with another config.
"""
from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any, Mapping

import jax

from gradclip_jax.training.errors import UsageError
from gradclip_jax.training.metrics import is_primary, jsonable

__all__ = ["Checkpointer", "RUN_FILES", "run_files", "prepare_workdir",
           "check_resume_config", "check_saved_config"]

#: What a run writes in its workdir (an ensemble adds ``member-K/`` folders of the same).
#: ``data_cache/`` (tokenized data, no run state) is not part of a run.
RUN_FILES = ("checkpoints", "metrics.jsonl", "results.json", "predictions.npz")


def run_files(workdir: os.PathLike | str) -> list[pathlib.Path]:
  """The files and folders of a run found in ``workdir`` (empty: a fresh workdir)."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    return []
  found = [workdir / n for n in RUN_FILES if (workdir / n).exists()]
  found += sorted(p for p in workdir.glob("member-*") if p.is_dir())
  return found


def prepare_workdir(workdir: os.PathLike | str, *, resume: bool, overwrite: bool) -> None:
  """Checks that ``workdir`` may take this run; with ``overwrite`` removes the old run.

  Raises:
    UsageError: ``workdir`` is a file, or holds a run and neither ``resume`` nor
      ``overwrite`` is set (nothing is touched then), or both are set.
  """
  workdir = pathlib.Path(workdir)
  if resume and overwrite:
    raise UsageError("--resume continues the run in --workdir and --overwrite removes "
                     "it: give one of them")
  if workdir.exists() and not workdir.is_dir():
    raise UsageError(f"--workdir {workdir} is a file, not a folder")
  found = run_files(workdir)
  # Multi-host: every process looks before process 0 removes anything, so that all take
  # the same branch (one that saw a half-removed run would resume while the others start
  # afresh, and then wait for each other forever).
  _barrier("gradclip_workdir_checked")
  if not found or resume:
    return
  if not overwrite:
    names = ", ".join(p.name for p in found)
    raise UsageError(f"--workdir {workdir} holds a run ({names}): continue it with "
                     f"--resume, or start afresh with --overwrite (removes them)")
  if is_primary():
    for p in found:
      if p.is_dir():
        shutil.rmtree(p)
      else:
        p.unlink()
  _barrier("gradclip_workdir_cleared")  # nobody reads the workdir before it is clear


def _barrier(name: str) -> None:
  """Waits until every process of a multi-host run gets here (no-op in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices(name)


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (so that a difference names its field)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_resume_config(saved: Mapping | None, now: Mapping) -> None:
  """Refuses to resume a checkpoint written with another config (``UsageError``)."""
  now = jsonable(now)
  if saved is None:
    raise UsageError("--resume: the checkpoint records no config (written by an older "
                     "gradclip); start afresh with --overwrite")
  saved, now = _flat(saved), _flat(now)
  changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if changed:
    diffs = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
                      for k in changed)
    raise UsageError(f"--resume: the run in this workdir has another config ({diffs}); "
                     "resume with the same flags, or start afresh with --overwrite")


def check_saved_config(workdir: os.PathLike | str, now: Mapping,
                       ignore: tuple[str, ...] = ("dp_settings",)) -> None:
  """:func:`check_resume_config` against the latest checkpoint in ``workdir``, if any,
  leaving out ``ignore`` (what is known only once the data is loaded). Creates nothing,
  so a run can refuse a resume before it reads its data."""
  if not (pathlib.Path(workdir) / "checkpoints").is_dir():
    return
  ckpt = Checkpointer(workdir)
  try:
    latest = ckpt.restore_meta()
  finally:
    ckpt.close()
  if latest is not None:
    saved = latest[1].get("config")
    if saved is not None:
      saved = {k: v for k, v in saved.items() if k not in ignore}
    check_resume_config(saved, {k: v for k, v in now.items() if k not in ignore})


class Checkpointer:
  """Orbax checkpoints in ``workdir/checkpoints``: a pytree of arrays plus a JSON dict.

  ``step`` is the global training step; saving the same step twice replaces the earlier
  checkpoint. In a multi-host run every process calls :meth:`save` and :meth:`restore`
  (Orbax writes each array once and the metadata from process 0).
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
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(jsonable(meta))),
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
