"""The PTB LSTM language model of Zaremba, Sutskever & Vinyals (2014), in Flax.

embedding -> ``num_layers`` LSTM layers -> softmax over the vocabulary, as in
TensorFlow's ``ptb_word_lm.py``: every weight uniform in ``[-init_scale, init_scale]``,
LSTM biases zero, forget-gate bias 0, dropout ``1 - keep_prob`` on the embeddings and
on the output of every LSTM layer (non-recurrent connections only, Zaremba et al. §3).

For speed the model is time-major inside and runs layer by layer: each layer's input
projection (``x @ W_x + b`` for the whole window) is one large matmul, and only the
recurrent part ``h @ W_h`` is inside a ``lax.scan`` over time (the 4 gates fused into
one ``[H, 4H]`` matmul). The softmax layer is one ``[T*B, H] @ [H, V]`` matmul after
the scan. This computes exactly the tutorial's BasicLSTMCell (gate order i, j, f, o).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# Per layer (c, h), each [batch, hidden]: batch is the leading axis so it can be sharded.
Carry = Sequence[tuple[jax.Array, jax.Array]]


def uniform_init(scale: float):
  """TF's ``random_uniform_initializer(-scale, scale)``."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


def _cell(w_h, xp, c, h, forget_bias):
  """One BasicLSTMCell step given the input projection ``xp = x @ W_x + b``."""
  z = xp + h @ w_h
  i, j, f, o = jnp.split(z, 4, axis=-1)
  i, j = jax.nn.sigmoid(i), jnp.tanh(j)
  f, o = jax.nn.sigmoid(f + forget_bias), jax.nn.sigmoid(o)
  c = c * f + i * j
  tc = jnp.tanh(c)
  return c, tc * o, (i, j, f, o, tc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lstm_recurrence(w_h, x_proj, c0, h0, forget_bias=0.0):
  """Runs the LSTM recurrence over time: ``x_proj`` [T, B, 4H] -> (hs [T, B, H], c, h).

  Same values as autodiff of a ``lax.scan`` of :func:`_cell`; the custom backward pass
  keeps only ``dz @ W_h^T`` inside the reverse scan and computes the recurrent weight
  gradient as one ``[H, T*B] @ [T*B, 4H]`` matmul afterwards (instead of ``T`` small
  accumulations), which is what makes the medium/large configs fast on CPU.
  """
  return _recurrence_fwd(w_h, x_proj, c0, h0, forget_bias)[0]


def _recurrence_fwd(w_h, x_proj, c0, h0, forget_bias):
  def step(carry, xp):
    c, h = carry
    c_new, h_new, (i, j, f, o, tc) = _cell(w_h, xp, c, h, forget_bias)
    return (c_new, h_new), (h_new, (c, h, i, j, f, o, tc))

  (c, h), (hs, res) = jax.lax.scan(step, (c0, h0), x_proj)
  return (hs, c, h), (w_h, res)


def _recurrence_bwd(forget_bias, residuals, cotangents):
  del forget_bias
  w_h, (c_prev, h_prev, i, j, f, o, tc) = residuals
  d_hs, d_c, d_h = cotangents
  w_h_t = w_h.T

  def step(carry, xs):
    dc, dh = carry
    d_out, c_p, i_, j_, f_, o_, tc_ = xs
    dh = dh + d_out
    do = dh * tc_
    dc = dc + dh * o_ * (1.0 - tc_ * tc_)
    dz = jnp.concatenate([dc * j_ * i_ * (1.0 - i_), dc * i_ * (1.0 - j_ * j_),
                          dc * c_p * f_ * (1.0 - f_), do * o_ * (1.0 - o_)], axis=-1)
    return (dc * f_, dz @ w_h_t), dz

  (dc0, dh0), dz = jax.lax.scan(step, (d_c, d_h), (d_hs, c_prev, i, j, f, o, tc),
                                reverse=True)
  d_w_h = _flat(h_prev).T @ _flat(dz)
  return d_w_h, dz, dc0, dh0


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _flat(x: jax.Array) -> jax.Array:
  """[T, B, F] -> [T*B, F] (free: a row-major bitcast)."""
  return x.reshape(-1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """``x @ w`` with inputs rounded to ``dtype`` and float32 accumulation and result."""
  return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _mixed_matmul_fwd(x, w, dtype):
  xc, wc = x.astype(dtype), w.astype(dtype)
  return jnp.dot(xc, wc, preferred_element_type=jnp.float32), (xc, wc)


def _mixed_matmul_bwd(dtype, res, dy):
  # Both backward matmuls also take ``dtype`` inputs and accumulate in float32, as in
  # mixed-precision training (Micikevicius et al. 2018); the gradients are float32.
  xc, wc = res
  dyc = dy.astype(dtype)
  dx = jnp.dot(dyc, wc.T, preferred_element_type=jnp.float32)
  dw = jnp.dot(xc.T, dyc, preferred_element_type=jnp.float32)
  return dx, dw


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def time_distributed_matmul(x: jax.Array, w: jax.Array, matmul_dtype=None) -> jax.Array:
  """``x @ w`` for ``x`` [T, B, I] as one 2-D ``[T*B, I] @ [I, O]`` matmul -> [T, B, O].

  The same numbers as ``x @ w``, but written in 2-D so that the gradient of ``w`` is a
  plain ``x^T @ dy`` over ``T*B`` rows: with the 3-D form, XLA:CPU first copies the
  whole ``[T, B, O]`` output gradient into a transposed ``[O, T, B]`` layout (16 MB per
  step for the softmax layer of the small config).

  ``matmul_dtype`` (e.g. ``jnp.bfloat16``): the forward and both backward matmuls take
  inputs rounded to it and accumulate in float32 (:func:`_mixed_matmul`); ``None`` keeps
  everything float32.
  """
  if matmul_dtype is None or jnp.dtype(matmul_dtype) == jnp.float32:
    y = _flat(x) @ w
  else:
    y = _mixed_matmul(_flat(x), w, jnp.dtype(matmul_dtype))
  return y.reshape(*x.shape[:-1], w.shape[-1])


class LSTMLayer(nn.Module):
  """One LSTM layer (TF ``BasicLSTMCell``) unrolled over a time-major window."""

  hidden_size: int
  init_scale: float
  forget_bias: float = 0.0
  matmul_dtype: Any = None

  @nn.compact
  def __call__(self, carry, xs):
    """``carry``: (c, h), each [B, H]; ``xs``: [T, B, I] -> (carry, hs [T, B, H])."""
    h4 = 4 * self.hidden_size
    w_x = self.param("kernel_x", uniform_init(self.init_scale), (xs.shape[-1], h4))
    w_h = self.param("kernel_h", uniform_init(self.init_scale), (self.hidden_size, h4))
    b = self.param("bias", nn.initializers.zeros, (h4,))
    x_proj = time_distributed_matmul(xs, w_x, self.matmul_dtype) + b  # one matmul, all steps
    hs, c, h = lstm_recurrence(w_h, x_proj, carry[0], carry[1], self.forget_bias)
    return (c, h), hs


class PTBModel(nn.Module):
  """Word-level LSTM language model: tokens [B, T] -> logits [T, B, V] (time-major)."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  init_scale: float
  keep_prob: float = 1.0
  # None (float32) or e.g. jnp.bfloat16: the dtype of the inputs of the large matmuls
  # (every layer's input projection and the softmax layer, forward and backward), which
  # accumulate in float32. Parameters, the recurrence, the loss and the optimizer stay
  # float32.
  matmul_dtype: Any = None

  def initial_carry(self, batch_size: int) -> Carry:
    zeros = lambda: jnp.zeros((batch_size, self.hidden_size), jnp.float32)
    return tuple((zeros(), zeros()) for _ in range(self.num_layers))  # distinct buffers

  @nn.compact
  def __call__(self, carry: Carry, tokens: jax.Array, *, train: bool = False):
    init = uniform_init(self.init_scale)
    rate = 1.0 - self.keep_prob
    dropout = lambda x: nn.Dropout(rate, deterministic=not train or rate == 0.0)(x)

    embedding = self.param("embedding", init, (self.vocab_size, self.hidden_size))
    x = dropout(jnp.take(embedding, tokens.T, axis=0))  # [T, B, H]
    new_carry = []
    for layer in range(self.num_layers):
      c, x = LSTMLayer(self.hidden_size, self.init_scale, matmul_dtype=self.matmul_dtype,
                       name=f"lstm_{layer}")(carry[layer], x)
      new_carry.append(c)
      x = dropout(x)
    w = self.param("softmax_w", init, (self.hidden_size, self.vocab_size))
    b = self.param("softmax_b", init, (self.vocab_size,))
    logits = time_distributed_matmul(x, w, self.matmul_dtype) + b  # [T, B, V], one matmul
    return tuple(new_carry), logits


def sequence_cost(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """The tutorial's cost: cross-entropy averaged over the batch, summed over time.

  ``logits`` [T, B, V] (time-major), ``targets`` [B, T]. This equals TF's
  ``reduce_sum(sequence_loss(..., average_across_timesteps=False,
  average_across_batch=True))``; perplexity is ``exp(sum cost / sum num_steps)``.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets.T)
  return ce.sum() / targets.shape[0]
