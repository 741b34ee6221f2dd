"""The training loop both trainers share: epochs of steps, resume, checkpoints, signals.

A trainer describes its work as a :class:`Task` (its batches, its jitted step, what an
epoch's record holds and how it is evaluated) and hands it to a :class:`TrainLoop`,
which does the rest the same way for ``gradclip ptb`` and ``gradclip classify``:

* **resume** (:meth:`TrainLoop.restore`): the latest checkpoint of the workdir, refused
  with a :class:`~gradclip_jax.training.errors.UsageError` if it was written with another
  config; the checkpoint holds the train state, the global step, the seconds already spent
  in the current epoch, the metric records so far and the task's host-side state
  (:meth:`Task.host_state`: metric totals, the batch sampler's statistics), so a resumed
  run computes what the uninterrupted one would have;
* **checkpoints** at every epoch end, every ``--checkpoint-every`` steps, when
  ``--max-steps`` stops the run and on a signal;
* **signals**: SIGINT / SIGTERM let the current step finish, save, and raise
  :class:`~gradclip_jax.training.errors.Interrupted` (:mod:`~gradclip_jax.training.interrupt`);
* **evaluation and records**: at an epoch end the task's :meth:`Task.epoch_record`
  (which evaluates) goes to ``metrics.jsonl``; a run that ``--max-steps`` stops inside an
  epoch writes :meth:`Task.partial_record`, marked ``"partial": true`` and not kept on
  resume;
* **progress**: a bar per epoch on a terminal, the first step's compile time, and the
  pacing of a multi-host run (:class:`~gradclip_jax.training.steps.StepLog`).

Time: ``seconds`` given to the records is the wall time of the epoch's steps (across a
resume), without checkpoints and evaluation.
"""
from __future__ import annotations

import math
import pathlib
import time
from typing import Any, Iterator, Mapping

import jax

from gradclip_jax.training import checkpoints, steps
from gradclip_jax.training.errors import Interrupted, UsageError
from gradclip_jax.training.interrupt import catch_signals
from gradclip_jax.training.metrics import MetricsWriter, jsonable, progress_bar, report
from gradclip_jax.training.options import RunOptions

__all__ = ["Task", "TrainLoop", "SYNC_EVERY"]

#: Steps between two host syncs of the loop (metrics to the host, the progress bar).
SYNC_EVERY = 20


class Task:
  """What a trainer plugs into :class:`TrainLoop` (override what applies).

  ``state`` is the trainer's train state (a pytree of arrays with an int ``step``).
  """

  def batches(self, epoch: int, start: int) -> Iterator[Any]:
    """The batches of ``epoch`` (0-based) from its ``start``-th step on, placed on the
    devices; the loop takes as many as it runs."""
    raise NotImplementedError

  def train_step(self, state: Any, batch: Any) -> Any:
    """Dispatches one step; returns the new state (per-step metrics stay in the task)."""
    raise NotImplementedError

  def begin_epoch(self, state: Any, epoch: int) -> Any:
    """Before the first step of ``epoch`` (also when a run resumes at its start)."""
    return state

  def sync(self, state: Any) -> None:
    """Brings the task's host-side metrics up to the last dispatched step (before a
    progress update, a record or a checkpoint)."""

  def postfix(self, steps_done: int, seconds: float) -> dict[str, str]:
    """Progress-bar fields after ``steps_done`` steps of the epoch in ``seconds``."""
    return {}

  def epoch_record(self, state: Any, epoch: int, seconds: float, step: int) -> Mapping:
    """The record of the finished ``epoch`` (1-based), ``step`` steps in all: evaluates."""
    raise NotImplementedError

  def partial_record(self, state: Any, epoch: int, steps_done: int, seconds: float,
                     step: int) -> Mapping:
    """The record of ``epoch`` stopped by ``--max-steps`` after ``steps_done`` steps."""
    raise NotImplementedError

  def host_state(self) -> dict[str, Any]:
    """JSON-able state of the task that a checkpoint keeps (totals, sampler)."""
    return {}

  def load_host_state(self, saved: Mapping[str, Any]) -> None:
    """Restores :meth:`host_state` from a checkpoint."""

  def checkpoint_tree(self, state: Any) -> Any:
    """The arrays a checkpoint stores (default: the train state)."""
    return {"train": state}

  def from_checkpoint_tree(self, tree: Any) -> Any:
    """The train state from a restored :meth:`checkpoint_tree` (keep the rest)."""
    return tree["train"]


class TrainLoop:
  """Runs a :class:`Task` for ``max_epochs`` epochs of ``steps_per_epoch`` steps.

  Args:
    workdir: the run's folder (``checkpoints/``, ``metrics.jsonl``).
    config: what a resumed run must share with its checkpoint (JSON-able).
    run: the shared run options (``max_steps``, ``checkpoint_every``, ``progress``).
    steps_per_epoch, max_epochs: the planned run.

  Attributes after :meth:`run`: ``step`` (global steps done), ``finished`` (every
  planned step ran), ``partial`` (the record of an epoch that ``--max-steps`` cut, or
  ``None``), ``run_seconds`` / ``run_steps`` (training time and steps of this call).
  """

  def __init__(self, workdir: str | pathlib.Path, config: Mapping, run: RunOptions, *,
               steps_per_epoch: int, max_epochs: int):
    self.workdir = pathlib.Path(workdir)
    self.config = dict(config)
    self.run_options = run
    self.steps_per_epoch, self.max_epochs = int(steps_per_epoch), int(max_epochs)
    self.total_steps = self.steps_per_epoch * self.max_epochs
    self.stop_at = self.total_steps if run.max_steps is None else min(self.total_steps,
                                                                       run.max_steps)
    self.step, self.epoch_seconds, self.done = 0, 0.0, False
    self.run_seconds, self.run_steps, self.partial = 0.0, 0, None
    self._ckpt = checkpoints.Checkpointer(self.workdir)
    self._records: list = []
    self.writer: MetricsWriter | None = None

  # -- resume and checkpoints --------------------------------------------------------

  def restore(self, task: Task, state: Any) -> Any:
    """The train state of the latest checkpoint (or ``state`` in a fresh workdir); opens
    ``metrics.jsonl`` with the checkpoint's records."""
    latest = self._ckpt.restore_meta()
    if latest is not None:
      checkpoints.check_resume_config(latest[1].get("config"), self.config)
      if "epoch_seconds" not in latest[1]:
        raise UsageError("--resume: the checkpoint was written by an older gradclip (another "
                         "layout); start afresh with --overwrite")
      tree, meta = self._ckpt.restore(task.checkpoint_tree(state))
      state = task.from_checkpoint_tree(tree)
      self.step, self.epoch_seconds = int(meta["step"]), float(meta["epoch_seconds"])
      self.done, self._records = bool(meta.get("done")), meta["records"]
      task.load_host_state(meta.get("task", {}))
      epoch, pos = divmod(self.step, self.steps_per_epoch)
      report(f"resumed from step {self.step} (epoch {epoch + 1}, step {pos} of "
             f"{self.steps_per_epoch})")
    self.writer = MetricsWriter(self.workdir, self._records)
    return state

  @property
  def records(self) -> list[dict]:
    """The metrics.jsonl records kept so far (not the partial one)."""
    return self.writer.records

  def save(self, task: Task, state: Any, *, done: bool = False) -> None:
    """A checkpoint of ``state`` at the current step."""
    self.done = done
    self._ckpt.save(self.step, task.checkpoint_tree(state), {
        "step": self.step, "epoch_seconds": self.epoch_seconds, "records": self.records,
        "done": done, "config": self.config, "task": task.host_state()})

  def finish(self, task: Task, state: Any, record: Mapping) -> None:
    """Writes the run's closing ``record`` (its test result) and a final checkpoint."""
    self.writer.write(record)
    self.save(task, state, done=True)

  def close(self) -> None:
    self._ckpt.close()

  # -- the loop ----------------------------------------------------------------------

  def run(self, task: Task, state: Any) -> Any:
    """Trains from the current step to the end of the run or ``--max-steps``; returns the
    state. Raises :class:`Interrupted` (after a checkpoint) on SIGINT / SIGTERM."""
    run, spe = self.run_options, self.steps_per_epoch
    log_step = steps.StepLog()
    with catch_signals(enabled=jax.process_count() == 1) as stop:
      while self.step < self.stop_at:
        epoch, pos = divmod(self.step, spe)
        if pos == 0:
          state = task.begin_epoch(state, epoch)
          self.epoch_seconds = 0.0
        end = min(self.stop_at - epoch * spe, spe)  # the last step of this pass
        bar = progress_bar(spe, f"epoch {epoch + 1}/{self.max_epochs}", initial=pos,
                           disable=not run.progress)
        t0 = time.perf_counter()
        for batch in task.batches(epoch, pos):
          state = task.train_step(state, batch)
          self.step, self.run_steps, pos = self.step + 1, self.run_steps + 1, pos + 1
          log_step(bar, self.step, state.step, t0)
          if pos % SYNC_EVERY == 0 or pos == end:
            task.sync(state)
            jax.block_until_ready(state.step)
            bar.set_postfix(task.postfix(pos, self.epoch_seconds + time.perf_counter() - t0),
                            refresh=False)
          if pos == end:
            break
          if stop or (run.checkpoint_every and self.step % run.checkpoint_every == 0):
            t0 = self._pause(task, state, t0)
            self.save(task, state)
            if stop:
              bar.close()
              raise Interrupted(stop.signum, self.step, self.workdir)
        self._pause(task, state, t0)
        bar.close()
        if pos == spe:
          self.writer.write(task.epoch_record(state, epoch + 1, self.epoch_seconds,
                                              self.step))
        else:  # --max-steps inside an epoch: resumable; its record is not kept on resume
          self.partial = {**jsonable(task.partial_record(
              state, epoch + 1, pos, self.epoch_seconds, self.step)), "partial": True}
          self.writer.write(self.partial, keep=False)
        self.save(task, state)
        if stop:
          raise Interrupted(stop.signum, self.step, self.workdir)
    return state

  @property
  def finished(self) -> bool:
    """Every planned step ran."""
    return self.step >= self.total_steps

  def _pause(self, task: Task, state: Any, t0: float) -> float:
    """Waits for the dispatched steps and books their time; returns a new ``t0``."""
    task.sync(state)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    self.epoch_seconds += seconds
    self.run_seconds += seconds
    return time.perf_counter()


def per_second(amount: float, seconds: float) -> float | None:
  """``amount / seconds``, or ``None`` without time (a record's rate)."""
  return amount / seconds if seconds > 0 and math.isfinite(seconds) else None
