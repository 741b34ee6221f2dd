"""Hyper-parameters of the TensorFlow PTB tutorial (``ptb_word_lm.py``), reproduced exactly.

small/medium/large are the non-regularised and regularised models of Zaremba et al.
(2014), "Recurrent Neural Network Regularization", arXiv:1409.2329; ``test`` is the
tutorial's tiny config for smoke runs.
"""
from __future__ import annotations

import dataclasses
import typing

if typing.TYPE_CHECKING:
  from gradclip_jax.training.options import RunOptions


@dataclasses.dataclass(frozen=True)
class Config:
  """One PTB model/training configuration (field names as in the tutorial)."""

  init_scale: float
  learning_rate: float
  max_grad_norm: float
  num_layers: int
  num_steps: int
  hidden_size: int
  max_epoch: int
  max_max_epoch: int
  keep_prob: float
  lr_decay: float
  batch_size: int
  vocab_size: int = 10000

  def lr_at(self, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: ``lr * lr_decay ** max(epoch + 1 - max_epoch, 0)``.

    This is the tutorial's ``lr_decay ** max(i + 1 - max_epoch, 0.0)`` for epoch index
    ``i``; with 1-based epoch numbers ``e = i + 1`` it is ``lr_decay ** max(e - max_epoch, 0)``.
    """
    return self.learning_rate * self.lr_decay ** max(epoch + 1 - self.max_epoch, 0)


CONFIGS = {
    "small": Config(init_scale=0.1, learning_rate=1.0, max_grad_norm=5, num_layers=2,
                    num_steps=20, hidden_size=200, max_epoch=4, max_max_epoch=13,
                    keep_prob=1.0, lr_decay=0.5, batch_size=20),
    "medium": Config(init_scale=0.05, learning_rate=1.0, max_grad_norm=5, num_layers=2,
                     num_steps=35, hidden_size=650, max_epoch=6, max_max_epoch=39,
                     keep_prob=0.5, lr_decay=0.8, batch_size=20),
    "large": Config(init_scale=0.04, learning_rate=1.0, max_grad_norm=10, num_layers=2,
                    num_steps=35, hidden_size=1500, max_epoch=14, max_max_epoch=55,
                    keep_prob=0.35, lr_decay=1 / 1.15, batch_size=20),
    "test": Config(init_scale=0.1, learning_rate=1.0, max_grad_norm=1, num_layers=1,
                   num_steps=2, hidden_size=2, max_epoch=1, max_max_epoch=1,
                   keep_prob=1.0, lr_decay=0.5, batch_size=20),
}


def get_config(name: str) -> Config:
  try:
    return CONFIGS[name]
  except KeyError:
    raise ValueError(f"unknown PTB config {name!r}; choose one of {sorted(CONFIGS)}") from None


#: ``--matmul-dtype``: input dtype of the large matmuls (``models.PTBModel.matmul_dtype``).
MATMUL_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything ``gradclip ptb`` runs: the tutorial config and the run's options.

  Attributes:
    run: the options shared with ``gradclip classify`` (data, clipping rule, seed,
      length, checkpoints, devices, DP-SGD); see ``training.options.RunOptions``.
    hparams: the tutorial's hyper-parameters (:data:`CONFIGS`, after ``--set``).
    name: the name of the tutorial config they come from (``--config``).
    matmul_dtype: one of :data:`MATMUL_DTYPES` (``--matmul-dtype``).
    max_tokens: use only the first ``max_tokens`` tokens of each split (smoke runs).
  """

  run: "RunOptions"
  hparams: Config = CONFIGS["small"]
  name: str = "small"
  matmul_dtype: str = "float32"
  max_tokens: int | None = None

  def __post_init__(self):
    from gradclip_jax.training.errors import UsageError  # pylint: disable=import-outside-toplevel

    if self.matmul_dtype not in MATMUL_DTYPES:
      raise UsageError(f"matmul_dtype must be one of {MATMUL_DTYPES}; got "
                       f"{self.matmul_dtype!r}")
    if self.max_tokens is not None and self.max_tokens < 2:
      raise UsageError(f"--max-tokens must be >= 2, got {self.max_tokens}")

  @property
  def max_epochs(self) -> int:
    """``run.max_epochs``, else the tutorial's ``max_max_epoch``."""
    return self.run.max_epochs or self.hparams.max_max_epoch

  def describe(self) -> dict:
    """What a resumed run must share with the checkpoint's (JSON-able)."""
    return {"hparams": dataclasses.asdict(self.hparams), "name": self.name,
            "matmul_dtype": self.matmul_dtype, "max_tokens": self.max_tokens,
            **self.run.describe()}
