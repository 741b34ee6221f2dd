"""The two ways a trainer stops early on purpose: a user mistake and a signal."""
from __future__ import annotations

import pathlib
import signal


class UsageError(ValueError):
  """A user mistake: a bad flag value or combination, missing or malformed data, a
  workdir that holds another run. ``gradclip`` prints the message on one line and exits
  with status 2 (``--debug`` adds the traceback)."""


class Interrupted(Exception):
  """SIGINT / SIGTERM stopped a run after a finished step, saved at ``step``.

  ``gradclip`` prints where the checkpoint is and the ``--resume`` command, and exits with
  ``128 + signum`` (130 for SIGINT, 143 for SIGTERM).
  """

  def __init__(self, signum: int, step: int, workdir: pathlib.Path):
    self.signum, self.step, self.workdir = int(signum), int(step), pathlib.Path(workdir)
    super().__init__(f"{signal.Signals(self.signum).name}: checkpoint saved at step "
                     f"{self.step} in {self.workdir}")

  @property
  def exit_code(self) -> int:
    return 128 + self.signum
