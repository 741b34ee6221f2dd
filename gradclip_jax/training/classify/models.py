"""Flax (bi)LSTM sequence classifier.

embedding -> embedding dropout -> (bi)LSTM stack over the masked sequence -> features
(final states, optionally masked max / mean pooling over time) -> dropout -> dense -> logits.
With ``num_layers=0`` there is no LSTM: the features are the masked max / mean pooled
embeddings (a "bag of embeddings" model, as used for DP-SGD on IMDB by Bu et al. 2020).

The LSTM is the cell of Hochreiter & Schmidhuber (1997), "Long Short-Term Memory", with the
forget gate of Gers et al. (2000) and a forget-gate bias of 1 (Jozefowicz et al. 2015).

Masking. Batches are right-padded. At a padded step the carry ``(h, c)`` is left unchanged,
so a forward scan ends holding the state after each sequence's *true last token*, never
after padding. The backward direction scans the same padded array in reverse: padding
comes first and leaves the zero initial state untouched, so it effectively starts at the
true last token and ends after the first token.

Speed (this runs on CPUs): the input projection ``x @ W_x`` of every step is one large
2-D matmul per direction done before the scan, time-major, so XLA never re-lays out the
``[T, B, 4H]`` gates (written as one ``bte,deg->dtbg`` einsum, their transposes and
copies took about half of the IMDB step); only ``h @ W_h`` (all four gates fused in one
matmul) stays inside ``lax.scan``; and both directions share a single scan, batched over
a leading direction axis, which halves the number of sequential steps.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLINGS = ("last", "max", "mean")


class LSTMLayer(nn.Module):
  """One LSTM layer, optionally bidirectional, over a right-padded masked sequence.

  Returns ``(outputs, final_h)``: ``outputs`` ``[B, T, D*H]`` (zero at padding) and
  ``final_h`` ``[B, D*H]`` (forward state at the true last token, then, when bidirectional,
  backward state at the first token), with ``D`` = 2 if bidirectional else 1.
  """

  hidden_size: int
  bidirectional: bool = True
  unroll: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    num_dirs = 2 if self.bidirectional else 1
    h_size = self.hidden_size
    w_x = self.param("input_kernel", nn.initializers.lecun_normal(batch_axis=(0,)),
                     (num_dirs, x.shape[-1], 4 * h_size))
    w_h = self.param("recurrent_kernel", nn.initializers.orthogonal(),
                     (num_dirs, h_size, 4 * h_size))
    # Gate order i, f, g, o; forget-gate bias starts at 1.
    bias_init = lambda key, shape: jnp.zeros(shape).at[:, h_size:2 * h_size].set(1.0)
    bias = self.param("bias", bias_init, (num_dirs, 4 * h_size))

    # Time-major inside: [T, B, E]. The backward direction reads time reversed, so it
    # gets the reversed input (E wide, cheaper to reverse than its 4H-wide projection).
    x_tm = jnp.swapaxes(x, 0, 1)
    mask_t = mask.T  # [T, B]
    t_len, batch = mask_t.shape
    inputs = [x_tm] + ([x_tm[::-1]] if self.bidirectional else [])
    step_masks = tuple([mask_t] + ([mask_t[::-1]] if self.bidirectional else []))
    # The input contribution of every step, one 2-D [T*B, E] @ [E, 4H] matmul per
    # direction, already time-major: no transposed copies of the [T, B, 4H] gates.
    gates_x = tuple((xd.reshape(t_len * batch, -1) @ w_x[d] + bias[d]).reshape(t_len, batch, -1)
                    for d, xd in enumerate(inputs))

    def step(carry, inputs):
      h, c = carry                  # [D, B, H]
      g_x, m = inputs               # D x [B, 4H], D x [B]
      gates = jnp.stack(g_x) + jnp.einsum("dbh,dhg->dbg", h, w_h)
      i, f, g, o = jnp.split(gates, 4, axis=-1)
      new_c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
      new_h = nn.sigmoid(o) * jnp.tanh(new_c)
      m = jnp.stack(m)[..., None]
      h = jnp.where(m, new_h, h)
      c = jnp.where(m, new_c, c)
      out = jnp.where(m, new_h, 0.0)
      return (h, c), tuple(out[d] for d in range(num_dirs))

    zeros = jnp.zeros((num_dirs, batch, h_size), x.dtype)
    (h_final, _), outs = jax.lax.scan(step, (zeros, zeros), (gates_x, step_masks),
                                      unroll=self.unroll)
    # outs: D x [T, B, H], the backward one in reversed time -> [B, T, D*H].
    outs = [outs[0]] + ([outs[1][::-1]] if self.bidirectional else [])
    outputs = jnp.swapaxes(jnp.concatenate(outs, axis=-1), 0, 1)
    final_h = jnp.concatenate(list(h_final), axis=-1)
    return outputs, final_h


def masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Max over time of ``x`` ``[B, T, F]`` where ``mask`` ``[B, T]`` is True."""
  return jnp.max(jnp.where(mask[..., None], x, -jnp.inf), axis=1)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  m = mask[..., None].astype(x.dtype)
  return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class LSTMClassifier(nn.Module):
  """Embedding -> (bi)LSTM -> pooled features -> dropout -> dense -> logits.

  Attributes:
    vocab_size: number of token ids (id 0 is padding).
    num_classes: size of the logits.
    embed_dim, hidden_size, num_layers, bidirectional: LSTM sizes. ``num_layers=0``: no
      LSTM, the pooling reads the (dropped-out) embeddings directly.
    pooling: features fed to the classifier, any of "last" (final states), "max" and "mean"
      (masked pooling over the top layer's outputs), concatenated in that order. "last"
      needs ``num_layers >= 1``.
    embed_dropout: dropout rate on embedding vectors.
    word_dropout: probability of dropping a whole token (its embedding becomes zero).
    dropout: dropout rate between LSTM layers and before the dense layer.
  """

  vocab_size: int
  num_classes: int = 2
  embed_dim: int = 128
  hidden_size: int = 128
  num_layers: int = 1
  bidirectional: bool = True
  pooling: Sequence[str] = ("last", "max")
  embed_dropout: float = 0.0
  word_dropout: float = 0.0
  dropout: float = 0.5
  unroll: int = 1

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
    unknown = set(self.pooling) - set(POOLINGS)
    if unknown or not self.pooling:
      raise ValueError(f"pooling must be a non-empty subset of {POOLINGS}; got {self.pooling}")
    if self.num_layers < 0 or (self.num_layers == 0 and "last" in self.pooling):
      raise ValueError(f"num_layers must be >= 1 with pooling 'last' (>= 0 otherwise); got "
                       f"num_layers={self.num_layers}, pooling={self.pooling}")
    x = nn.Embed(self.vocab_size, self.embed_dim,
                 embedding_init=nn.initializers.normal(stddev=0.1), name="embed")(tokens)
    if self.word_dropout > 0:
      x = nn.Dropout(self.word_dropout, broadcast_dims=(2,))(x, deterministic=not train)
    x = nn.Dropout(self.embed_dropout)(x, deterministic=not train)
    for layer in range(self.num_layers):
      if layer > 0:
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
      x, final_h = LSTMLayer(self.hidden_size, self.bidirectional, self.unroll,
                             name=f"lstm_{layer}")(x, mask)
    features = []
    for name in self.pooling:
      features.append({"last": lambda: final_h, "max": lambda: masked_max(x, mask),
                       "mean": lambda: masked_mean(x, mask)}[name]())
    h = jnp.concatenate(features, axis=-1)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return nn.Dense(self.num_classes, name="logits")(h)
