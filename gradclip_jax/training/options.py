"""The options of a training run that both trainers share (:class:`RunOptions`).

A trainer's config is its model/optimizer hyper-parameters plus these options:
``ptb.configs.TrainConfig`` and ``classify.configs.TrainConfig``; ``train_and_evaluate``
of either trainer takes that config and a workdir.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

from gradclip_jax.training import clip as clip_lib
from gradclip_jax.training.dp import DPFlags
from gradclip_jax.training.errors import UsageError

#: Options that may differ between a run and its ``--resume`` (they do not change what is
#: computed): where the data is, how long to run this time, how often to save, the
#: devices, the progress bar.
RESUMABLE_CHANGES = ("data_dir", "max_steps", "checkpoint_every", "num_devices", "progress")


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How to run a trainer (the flags of ``gradclip ptb`` / ``gradclip classify``).

  Attributes:
    data_dir: folder of the data set files.
    clip: a rule of :data:`gradclip_jax.training.clip.RULES`; ``"dp"`` with ``dp``.
    clip_value: the rule's threshold (``None``: the config's ``max_grad_norm`` or the
      adaptive rule's default); see :func:`gradclip_jax.training.clip.build_clip`.
    seed: the random seed (initialisation, dropout, batch order, DP noise).
    max_steps: stop after this many steps in all (``None``: the whole run).
    max_epochs: override the config's number of epochs.
    checkpoint_every: also checkpoint every this many steps (0: at epoch ends only).
    num_devices: data-parallel devices (``None``: the most that divide the batch).
    progress: show a progress bar on a terminal.
    dp: DP-SGD flags (``clip`` must then be ``"dp"``), or ``None``.
  """

  data_dir: pathlib.Path
  clip: str = "global_norm"
  clip_value: float | None = None
  seed: int = 0
  max_steps: int | None = None
  max_epochs: int | None = None
  checkpoint_every: int = 500
  num_devices: int | None = None
  progress: bool = True
  dp: DPFlags | None = None

  def __post_init__(self):
    object.__setattr__(self, "data_dir", pathlib.Path(self.data_dir))
    if (self.dp is None) == (self.clip == "dp"):
      raise UsageError("clip='dp' goes with dp=DPFlags(...) and only with it; got "
                       f"clip={self.clip!r}, dp={self.dp}")
    if self.dp is None and self.clip not in clip_lib.RULES:
      raise UsageError(f"unknown clipping rule {self.clip!r}; choose one of "
                       f"{', '.join(clip_lib.RULES)}")
    if self.clip_value is not None and not (self.clip_value > 0
                                            and math.isfinite(self.clip_value)):
      raise UsageError(f"--clip-value must be positive and finite, got {self.clip_value}")
    for name in ("max_steps", "max_epochs", "num_devices"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise UsageError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
    if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
      raise UsageError(f"--checkpoint-every must be an integer >= 0, got "
                       f"{self.checkpoint_every!r}")

  def describe(self) -> dict[str, Any]:
    """JSON-able fields that a resumed run must share (all but RESUMABLE_CHANGES)."""
    out = {}
    for f in dataclasses.fields(self):
      if f.name in RESUMABLE_CHANGES:
        continue
      v = getattr(self, f.name)
      out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out
