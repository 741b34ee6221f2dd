"""SIGINT / SIGTERM during training: finish the step, checkpoint, stop (:func:`catch_signals`)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

__all__ = ["StopRequest", "catch_signals"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
  """Set by the first SIGINT / SIGTERM: :attr:`signum` (``None`` until then)."""

  def __init__(self):
    self.signum: int | None = None

  def __bool__(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is not None:  # The second signal: exit at once, no checkpoint.
      sys.stderr.write(f"\n{signal.Signals(signum).name}, a second signal: exiting at "
                       "once, without a checkpoint\n")
      sys.stderr.flush()
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signum = signum


@contextlib.contextmanager
def catch_signals(enabled: bool = True) -> Iterator[StopRequest]:
  """Within the block, SIGINT and SIGTERM set the yielded :class:`StopRequest`.

  The training loop checks it after every step and then saves and raises
  :class:`~gradclip_jax.training.errors.Interrupted`. A second signal (of either kind;
  two identical signals that arrive before the first is handled count as one) exits the
  process at once with status ``128 + signum``. Outside the main thread (where Python
  cannot install handlers) or with ``enabled=False`` the handlers stay as they are and
  the request is never set. The previous handlers come back on exit.

  The trainers pass ``enabled=False`` in a multi-host run: the processes would stop at
  different steps and wait for each other in the next collective, so there a signal
  ends the process as usual and the run resumes from its last periodic checkpoint.
  """
  stop = StopRequest()
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield stop
    return
  previous = {s: signal.signal(s, stop._handle) for s in _SIGNALS}  # pylint: disable=protected-access
  try:
    yield stop
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
