"""The typed train state of the trainers: what a step updates and a checkpoint stores."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "distinct_buffers"]


@flax.struct.dataclass
class TrainState:
  """``step`` (int32 scalar), ``params``, ``opt_state`` and ``rng`` (the key data of the
  dropout key, ``jax.random.key_data``; a step uses ``fold_in(rng, step)``).

  The trainers extend it: ``ptb.train.PTBState`` adds the LSTM carry and the epoch's
  metric accumulators, ``classify.train.ClassifyState`` the parameter average.
  """

  step: jax.Array
  params: Any
  opt_state: optax.OptState
  rng: jax.Array

  def step_key(self) -> jax.Array:
    """The dropout key of this step: ``fold_in(wrap_key_data(rng), step)``."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def distinct_buffers(tree: Any) -> Any:
  """A copy with a distinct buffer per leaf (an optimizer's init may share one array
  between fields), since the train steps donate their state."""
  return jax.tree.map(jnp.copy, tree)
