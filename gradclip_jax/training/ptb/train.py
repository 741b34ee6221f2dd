"""``gradclip ptb``: train the PTB LSTM language model with a gradient clipping rule.

The recipe of TensorFlow's ``ptb_word_lm.py`` / Zaremba et al. (2014): SGD through
``optax.chain(<clip rule>, optax.sgd(lr))`` (by default
``gradclip_jax.clip_by_global_norm(max_grad_norm)``), learning rate
``lr * lr_decay ** max(epoch - max_epoch, 0)`` for 1-based ``epoch``, truncated
back-propagation over windows of ``num_steps`` with the LSTM state carried across
windows (reset at the start of every epoch), cost = batch-mean cross-entropy summed
over the window.

One jitted, buffer-donating train step per window; per-epoch metrics go to
``WORKDIR/metrics.jsonl``, orbax checkpoints to ``WORKDIR/checkpoints``. With several
devices the batch is sharded over a 1-D mesh and parameters are replicated.

DP-SGD (``--dp``; see ``common.add_dp_arguments``): the privacy unit is one sequence
window, i.e. one row of a batch (``num_steps`` inputs and their ``num_steps`` targets, so
``num_steps + 1`` tokens; neighbouring windows share one token).
So that a window's gradient depends on that window alone, every window starts from the
zero LSTM state (no state carried across windows) and the windows of an epoch are
shuffled (seeded by ``--seed`` and the epoch) before they are cut into batches. Each
window's loss is its cross-entropy summed over time (the tutorial's cost is their batch
mean); the sum of the per-window gradients clipped to ``--dp-max-norm`` gets the noise
and is divided by ``batch_size``, then SGD as usual. The per-example norms come from
``clipped_grad(method="vmap")`` by default: this model reads its embedding and softmax
weights directly and runs its LSTM layers time-major, so no ghost rule covers it (and the
layer-local rule would take the time axis for the batch axis when ``num_steps`` equals
``batch_size``, as in the small config). With ``vmap`` every window of a step sees the
same dropout mask (``keep_prob < 1``: medium, large), since each is run as a batch of one
with the step's key.
Records add ``epsilon, noise_multiplier, dp_max_norm, delta``; ``grad_norm_*`` and
``clip_fraction`` then describe the per-window gradients.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from gradclip_jax.training import common
from gradclip_jax.training.ptb import configs, input_pipeline, models

log = logging.getLogger(__name__)

# Window length used to evaluate the test set with batch size 1; since the LSTM state is
# carried across windows this equals the tutorial's batch_size=1, num_steps=1 evaluation.
TEST_WINDOW = 1000


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags of ``gradclip ptb``."""
  parser.add_argument("--config", choices=sorted(configs.CONFIGS), default="small",
                      help="tutorial configuration (default small)")
  common.add_common_arguments(parser, default_clip="global_norm")
  parser.add_argument("--max-tokens", type=int, default=None,
                      help="use only the first N tokens of each split (smoke runs)")
  parser.add_argument("--matmul-dtype", choices=MATMUL_DTYPES, default="float32",
                      help="input dtype of the large matmuls (input projections, softmax; "
                      "forward and backward), accumulated in float32; bfloat16 is mixed "
                      "precision: parameters, recurrence, loss and optimizer stay float32 "
                      "(default float32, the tutorial's)")
  common.add_dp_arguments(parser, unit="one sequence window (one row of a batch)",
                          default_method="vmap")


def main(args: argparse.Namespace) -> int:
  records = train_and_evaluate(args)
  return 0 if records else 1


# ---------------------------------------------------------------------------
# State, steps.
# ---------------------------------------------------------------------------


MATMUL_DTYPES = ("float32", "bfloat16")


def build_model(config: configs.Config, matmul_dtype: str = "float32") -> models.PTBModel:
  """The tutorial's model; ``matmul_dtype`` is ``models.PTBModel.matmul_dtype``."""
  if matmul_dtype not in MATMUL_DTYPES:
    raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}; got {matmul_dtype!r}")
  return models.PTBModel(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                         num_layers=config.num_layers, init_scale=config.init_scale,
                         keep_prob=config.keep_prob,
                         matmul_dtype=None if matmul_dtype == "float32" else matmul_dtype)


def build_optimizer(config: configs.Config, clip: optax.GradientTransformation,
                    epoch_size: int) -> optax.GradientTransformation:
  """``chain(clip, sgd(lr))`` with the tutorial's per-epoch learning-rate decay."""

  def schedule(count):
    epoch = count // epoch_size  # 0-based
    exponent = jnp.maximum(epoch + 1 - config.max_epoch, 0).astype(jnp.float32)
    return config.learning_rate * jnp.float32(config.lr_decay) ** exponent

  return optax.chain(clip, optax.sgd(schedule))


def zero_accumulators() -> dict[str, jax.Array]:
  """Per-epoch training metrics, accumulated on device inside the train step."""
  return {"cost": jnp.zeros((), jnp.float32), "words": jnp.zeros((), jnp.float32),
          "grad_norm_sum": jnp.zeros((), jnp.float32),
          "grad_norm_max": jnp.zeros((), jnp.float32),
          "clipped": jnp.zeros((), jnp.int32), "steps": jnp.zeros((), jnp.int32)}


def init_state(model: models.PTBModel, tx: optax.GradientTransformation,
               config: configs.Config, seed: int) -> dict[str, Any]:
  """Everything the train step updates (and a checkpoint stores)."""
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  carry = model.initial_carry(config.batch_size)
  tokens = jnp.zeros((config.batch_size, config.num_steps), jnp.int32)
  params = jax.jit(model.init)(init_key, carry, tokens)["params"]
  state = {"params": params, "opt_state": tx.init(params), "carry": carry,
           "key": jax.random.key_data(dropout_key), "step": jnp.zeros((), jnp.int32),
           "acc": zero_accumulators()}
  # Distinct buffers for every leaf (an optimizer state may share one array between
  # fields), since the train step donates them all.
  return jax.tree.map(jnp.copy, state)


def state_shardings(state: dict[str, Any], mesh) -> Any:
  """Batch-sharded LSTM carry, everything else replicated."""
  rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(common.DATA_AXIS))
  out = jax.tree.map(lambda _: rep, state)
  out["carry"] = jax.tree.map(lambda _: batch, state["carry"])
  return out


def place_state(state: dict[str, Any], mesh) -> dict[str, Any]:
  if mesh is None:
    return jax.device_put(state)
  return jax.device_put(state, state_shardings(state, mesh))


def per_window_loss_fn(model: models.PTBModel, key: jax.Array):
  """``(params, x [B, T], y [B, T]) -> (losses [B], losses)``: DP-SGD's per-window loss.

  Every window starts from the zero state; its loss is the cross-entropy summed over
  its ``T`` targets (their batch mean is the tutorial's cost).
  """

  def loss_fn(p, x, y):
    # Plain zeros rather than model.initial_carry, which would be a module call that
    # clipped_grad's method interception sees.
    zeros = jnp.zeros((x.shape[0], model.hidden_size), jnp.float32)
    carry = tuple((zeros, zeros) for _ in range(model.num_layers))
    _, logits = model.apply({"params": p}, carry, x, train=True, rngs={"dropout": key})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y.T).sum(axis=0)
    return losses, losses

  return loss_fn


def make_train_step(model: models.PTBModel, tx: optax.GradientTransformation,
                    state_sharding=None, batch_sharding=None,
                    dp: common.DPSettings | None = None):
  """The jitted train step ``state, x, y -> state`` (state donated).

  With ``dp``: DP-SGD on per-window losses (``per_window_loss_fn``), ``tx`` starting with
  ``common.dp_transform``; the carry stays zero, and the accumulators ``grad_norm_sum`` /
  ``grad_norm_max`` / ``clipped`` hold the per-window norms' sum and max and the number of
  windows clipped.
  """

  def train_step(state, x, y):
    params = state["params"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])

    if dp is None:
      def loss_fn(p):
        carry, logits = model.apply({"params": p}, state["carry"], x, train=True,
                                    rngs={"dropout": key})
        return models.sequence_cost(logits, y), carry

      (cost, carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    else:
      grads, norms, losses = common.dp_clipped_grad(per_window_loss_fn(model, key), dp)(
          params, x, y)
      cost, carry = jnp.sum(losses) / x.shape[0], state["carry"]
      stats = common.dp_example_stats(norms, jnp.ones(norms.shape), dp.max_norm)
    if dp is None:
      updates, opt_state, grad_norm = common.update_with_norm(tx, grads, state["opt_state"],
                                                              params)
      grad_max = grad_norm
      clipped = common.clipped_this_step(state["opt_state"], opt_state).astype(jnp.int32)
    else:
      updates, opt_state = tx.update(grads, state["opt_state"], params)
      grad_norm, grad_max = stats["norm_sum"], stats["norm_max"]
      clipped = stats["num_clipped"].astype(jnp.int32)
    params = optax.apply_updates(params, updates)
    acc = state["acc"]
    acc = {"cost": acc["cost"] + cost,
           "words": acc["words"] + y.shape[1],
           "grad_norm_sum": acc["grad_norm_sum"] + grad_norm,
           "grad_norm_max": jnp.maximum(acc["grad_norm_max"], grad_max),
           "clipped": acc["clipped"] + clipped,
           "steps": acc["steps"] + 1}
    return {"params": params, "opt_state": opt_state, "carry": carry, "key": state["key"],
            "step": state["step"] + 1, "acc": acc}

  if state_sharding is None:
    return jax.jit(train_step, donate_argnums=0)
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(state_sharding, batch_sharding, batch_sharding),
                 out_shardings=state_sharding)


def make_eval_step(model: models.PTBModel):
  """The jitted ``params, carry, x, y, mask -> carry, summed cross-entropy``."""

  def eval_step(params, carry, x, y, mask):
    carry, logits = model.apply({"params": params}, carry, x, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y.T)
    return carry, jnp.sum(ce * mask.T)

  return jax.jit(eval_step, donate_argnums=1)


def evaluate(model, eval_step, params, ids: np.ndarray, batch_size: int, num_steps: int,
             mesh=None, *, full: bool = False) -> float:
  """Perplexity ``exp(mean cross-entropy)`` of ``ids``, state carried across windows.

  ``full=False``: the tutorial's validation (``batch_size`` rows, windows of
  ``num_steps``, the incomplete last window dropped). ``full=True``: every token of the
  stream predicted from all previous ones, as the tutorial's test run with
  ``batch_size=1, num_steps=1`` (here batch 1 in windows of ``num_steps``, padded).
  """
  if full:
    x = np.asarray(ids[:-1], np.int32)
    y = np.asarray(ids[1:], np.int32)
    n = len(x)
    windows = -(-n // num_steps)
    pad = windows * num_steps - n
    xs = np.pad(x, (0, pad)).reshape(windows, 1, num_steps)
    ys = np.pad(y, (0, pad)).reshape(windows, 1, num_steps)
    masks = (np.arange(windows * num_steps) < n).astype(np.float32).reshape(xs.shape)
    place = lambda a: common.replicate(a, mesh)
    batch_size, count = 1, n
  else:
    xs, ys = input_pipeline.batchify(ids, batch_size, num_steps)
    masks = np.ones(xs.shape[1:], np.float32)
    masks = np.broadcast_to(masks, xs.shape)
    place = lambda a: common.shard_batch(a, mesh)
    count = xs.size
  carry = model.initial_carry(batch_size)
  carry = place(carry)
  total = jnp.zeros((), jnp.float32)
  for x, y, m in zip(xs, ys, masks):
    carry, ce = eval_step(params, carry, place(x), place(y), place(m))
    total = total + ce
  return math.exp(float(total) / count)


# ---------------------------------------------------------------------------
# Training loop.
# ---------------------------------------------------------------------------


def _zeros_like(tree):
  """Zeros with the shapes, dtypes and shardings of ``tree``."""
  return jax.tree.map(
      lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding), tree)


def _epoch_record(epoch: int, lr: float, acc: dict, wps: float,
                  dp: common.DPSettings | None = None, global_step: int = 0
                  ) -> dict[str, Any]:
  acc = jax.device_get(acc)
  steps = max(int(acc["steps"]), 1)
  per = steps if dp is None else steps * dp.batch_size  # DP: per window
  record = {"epoch": epoch, "lr": lr,
            "train_ppl": math.exp(float(acc["cost"]) / max(float(acc["words"]), 1.0)),
            "wps": wps,
            "grad_norm_mean": float(acc["grad_norm_sum"]) / per,
            "grad_norm_max": float(acc["grad_norm_max"]),
            "clip_fraction": int(acc["clipped"]) / per}
  if dp is not None:
    record["step"] = global_step
    record.update(dp.record(global_step))
  return record


def dp_epoch_windows(xs: np.ndarray, ys: np.ndarray, seed: int, epoch: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """DP-SGD: the epoch's windows (rows of every batch) shuffled, then re-batched.

  Seeded by ``seed`` and ``epoch`` (so ``--resume`` sees the same order); the shapes
  ``[epoch_size, batch_size, num_steps]`` are kept.
  """
  e, b, t = xs.shape
  perm = np.random.default_rng([seed, epoch, 0x50544244]).permutation(e * b)
  shuffle = lambda a: np.ascontiguousarray(a.reshape(e * b, t)[perm].reshape(e, b, t))
  return shuffle(xs), shuffle(ys)


def load_data(args: argparse.Namespace, config: configs.Config) -> input_pipeline.PTBData:
  data = input_pipeline.load_ptb(args.data_dir, vocab_size=config.vocab_size)
  if args.max_tokens:
    n = args.max_tokens
    data = data._replace(train=data.train[:n], valid=data.valid[:n], test=data.test[:n])
  return data


def train_and_evaluate(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Runs ``gradclip ptb``; returns the records written to ``metrics.jsonl``."""
  dp_flags = common.dp_flags_from_args(args)
  config = configs.get_config(args.config)
  max_epochs = args.max_epochs or config.max_max_epoch
  data = load_data(args, config)
  xs, ys = input_pipeline.batchify(data.train, config.batch_size, config.num_steps)
  epoch_size = len(xs)

  num_devices = common.num_data_devices(config.batch_size, args.num_devices)
  mesh = common.make_mesh(num_devices)
  model = build_model(config, args.matmul_dtype)
  dp = None
  if dp_flags is None:
    clip = common.build_clip(args.clip, args.clip_value, config.max_grad_norm)
  else:
    dp = dp_flags.resolve(batch_size=config.batch_size,
                          dataset_size=epoch_size * config.batch_size,
                          planned_steps=epoch_size * max_epochs,
                          default_max_norm=config.max_grad_norm)
    print(dp.describe(), flush=True)
    clip = common.dp_transform(dp, args.seed)
  tx = build_optimizer(config, clip, epoch_size)
  state = place_state(init_state(model, tx, config, args.seed), mesh)
  if mesh is None:
    train_step = make_train_step(model, tx, dp=dp)
  else:
    train_step = make_train_step(model, tx, state_shardings(state, mesh),
                                 NamedSharding(mesh, P(common.DATA_AXIS)), dp=dp)
  eval_step = make_eval_step(model)
  shard = lambda a: common.shard_batch(a, mesh)

  ckpt = common.Checkpointer(args.workdir)
  dp_meta = None if dp is None else dp.as_meta()
  meta = {"epoch": 0, "pos": 0, "global_step": 0, "elapsed": 0.0, "records": []}
  if args.resume and ckpt.latest_step() is not None:
    common.check_dp_resume(ckpt.restore_meta()[1].get("dp"), dp)
    state, meta = ckpt.restore(state)
    log.info("resumed from step %d (epoch %d, window %d)", meta["global_step"],
             meta["epoch"] + 1, meta["pos"])
  elif args.resume:
    log.info("--resume: no checkpoint in %s, starting afresh", ckpt.directory)
  writer = common.MetricsWriter(args.workdir, meta["records"])
  if meta.get("done"):
    ckpt.close()
    return writer.records

  print(f"PTB {args.config}: {len(data.train):,} train tokens, {epoch_size} windows/epoch, "
        f"{max_epochs} epochs, clip={'dp' if dp else args.clip}, {num_devices} device(s)",
        flush=True)
  epoch, pos, global_step = meta["epoch"], meta["pos"], meta["global_step"]
  elapsed = meta["elapsed"]  # seconds spent in the current epoch before a resume

  def save(done=False):
    ckpt.save(global_step, state, {"epoch": epoch, "pos": pos, "global_step": global_step,
                                   "elapsed": elapsed, "records": writer.records,
                                   "done": done, "dp": dp_meta})

  stopped = False
  while epoch < max_epochs:
    if args.max_steps is not None and global_step >= args.max_steps:
      stopped = True
      break
    if pos == 0:  # the tutorial resets the LSTM state at the start of every epoch
      state["carry"] = _zeros_like(state["carry"])
      state["acc"] = _zeros_like(state["acc"])
      elapsed = 0.0
    lr = config.lr_at(epoch)
    ex, ey = (xs, ys) if dp is None else dp_epoch_windows(xs, ys, args.seed, epoch)
    bar = common.progress_bar(epoch_size, f"epoch {epoch + 1}/{max_epochs}",
                              initial=pos, disable=args.no_progress)
    t0 = time.perf_counter()
    words_per_step = config.batch_size * config.num_steps
    while pos < epoch_size:
      if args.max_steps is not None and global_step >= args.max_steps:
        stopped = True
        break
      state = train_step(state, shard(ex[pos]), shard(ey[pos]))
      pos += 1
      global_step += 1
      bar.update(1)
      if pos % 20 == 0 or pos == epoch_size:
        jax.block_until_ready(state["step"])
        dt = elapsed + time.perf_counter() - t0
        bar.set_postfix(wps=f"{pos * words_per_step / dt:,.0f}" if dt else "-",
                        refresh=False)
      if args.checkpoint_every and global_step % args.checkpoint_every == 0 \
          and pos < epoch_size:
        jax.block_until_ready(state)
        elapsed += time.perf_counter() - t0
        t0 = time.perf_counter()
        save()
    jax.block_until_ready(state)
    elapsed += time.perf_counter() - t0
    bar.close()
    wps = pos * words_per_step / elapsed if elapsed > 0 else 0.0
    record = _epoch_record(epoch + 1, lr, state["acc"], wps, dp, global_step)
    if stopped and pos < epoch_size:
      save()  # mid-epoch stop: resumable; the partial record is not kept on resume
      record["partial"] = True
      record["steps"] = pos
      record["valid_ppl"] = evaluate(model, eval_step, state["params"], data.valid,
                                     config.batch_size, config.num_steps, mesh)
      writer.write(record)
      writer.records.pop()  # not part of the resumable history (see save() above)
      print(f"Stopped at --max-steps {args.max_steps} (epoch {epoch + 1}, window {pos}): "
            f"train ppl {record['train_ppl']:.2f}, valid ppl {record['valid_ppl']:.2f}",
            flush=True)
      ckpt.close()
      return writer.records + [record]
    record["valid_ppl"] = evaluate(model, eval_step, state["params"], data.valid,
                                   config.batch_size, config.num_steps, mesh)
    print(f"Epoch {epoch + 1}: lr {lr:.4g}  train ppl {record['train_ppl']:.3f}  "
          f"valid ppl {record['valid_ppl']:.3f}  {wps:,.0f} wps  "
          f"grad norm mean {record['grad_norm_mean']:.3f} max {record['grad_norm_max']:.3f}  "
          f"clipped {record['clip_fraction']:.1%}"
          + (f"  epsilon {record['epsilon']:.3f}" if dp else ""), flush=True)
    writer.write(record)
    epoch, pos, elapsed = epoch + 1, 0, 0.0
    save()

  if stopped:
    print(f"Stopped at --max-steps {args.max_steps} after epoch {epoch}", flush=True)
  else:
    test_ppl = evaluate(model, eval_step, state["params"], data.test, 1, TEST_WINDOW, mesh,
                        full=True)
    print(f"Test ppl {test_ppl:.3f}", flush=True)
    writer.write({"epoch": epoch, "test_ppl": test_ppl})
    save(done=True)
  ckpt.close()
  return writer.records
