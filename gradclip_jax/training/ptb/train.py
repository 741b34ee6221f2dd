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

The Python entry point is :func:`train_and_evaluate` ``(config, workdir)`` with a
``configs.TrainConfig``; it resumes from the latest checkpoint in ``workdir`` when there
is one (the command line asks for ``--resume`` then).

DP-SGD (``--dp``; see ``training.dp.add_dp_arguments``): the privacy unit is one window
of ``num_steps + 1`` consecutive tokens (``num_steps`` inputs and their ``num_steps``
targets). The training stream is cut into disjoint windows
(``input_pipeline.windows``), so every token belongs to exactly one of them: the
guarantee covers any span of text inside one window, and a span that touches ``k``
windows (a sentence across a window boundary) gets the group-privacy bound of ``k``
units. So that a window's gradient depends on that window alone, every window starts from
the zero LSTM state (no state carried across windows). Each step's windows are
Poisson-sampled (``training.sampling.PoissonSampler``: each window with probability
``batch_size / N`` for ``N`` windows; an epoch is ``N // batch_size`` steps) and padded
to the sampler's capacity with windows of weight 0. Each window's loss is its
cross-entropy summed over time (the tutorial's cost is their batch mean); the sum of the
per-window gradients clipped to ``--dp-max-norm`` gets the noise and is divided by
``batch_size`` (the expected batch size), then SGD as usual. The per-example norms come from
``clipped_grad(method="vmap")`` by default: this model reads its embedding and softmax
weights directly and runs its LSTM layers time-major, so no ghost rule covers it (and the
layer-local rule would take the time axis for the batch axis when ``num_steps`` equals
``batch_size``, as in the small config). With ``vmap`` every window of a step sees the
same dropout mask (``keep_prob < 1``: medium, large), since each is run as a batch of one
with the step's key.
Records add ``step, epsilon, noise_multiplier, dp_max_norm, delta, dp_sampling,
batch_size_min, batch_size_max, batch_size_mean``; ``grad_norm_*`` and ``clip_fraction``
then describe the per-window gradients, ``train_ppl`` and ``wps`` the sampled windows.
A finished run writes ``results.json`` (test perplexity; with DP-SGD the sampler and the
accountant).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from gradclip_jax.training import checkpoints, flags, mesh as mesh_lib, steps
from gradclip_jax.training import dp as dp_lib
from gradclip_jax.training.errors import UsageError
from gradclip_jax.training.loop import Task, TrainLoop
from gradclip_jax.training.metrics import (Record, flattened, is_primary, jsonable,
                                           optional, report)
from gradclip_jax.training.ptb import configs, input_pipeline, models
from gradclip_jax.training.sampling import PoissonSampler
from gradclip_jax.training.state import TrainState, distinct_buffers

# Window length used to evaluate the test set with batch size 1; since the LSTM state is
# carried across windows this equals the tutorial's batch_size=1, num_steps=1 evaluation.
TEST_WINDOW = 1000
MATMUL_DTYPES = configs.MATMUL_DTYPES


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags of ``gradclip ptb``."""
  parser.add_argument("--config", choices=sorted(configs.CONFIGS), default="small",
                      help="tutorial configuration (default small); --set FIELD=VALUE "
                      "changes one of its fields")
  flags.add_common_arguments(parser, default_clip="global_norm")
  g = parser.add_argument_group("ptb options")
  g.add_argument("--max-tokens", type=flags.positive_int, default=None,
                 help="use only the first N tokens of each split (smoke runs)")
  g.add_argument("--matmul-dtype", choices=MATMUL_DTYPES, default="float32",
                 help="input dtype of the large matmuls (input projections, softmax; "
                 "forward and backward), accumulated in float32; bfloat16 is mixed "
                 "precision: parameters, recurrence, loss and optimizer stay float32 "
                 "(default float32, the tutorial's)")
  dp_lib.add_dp_arguments(parser, unit="one sequence window (one row of a batch)",
                          default_method="vmap")


def config_from_args(args: argparse.Namespace) -> configs.TrainConfig:
  """The run's config from the parsed flags (``UsageError`` for a bad one)."""
  hparams = flags.override(configs.get_config(args.config), args.set)
  return configs.TrainConfig(run=flags.run_options(args), hparams=hparams,
                             name=args.config, matmul_dtype=args.matmul_dtype,
                             max_tokens=args.max_tokens)


def main(args: argparse.Namespace) -> int:
  """``gradclip ptb``: checks the flags and the workdir, trains, tests."""
  config = config_from_args(args)
  checkpoints.prepare_workdir(args.workdir, resume=args.resume, overwrite=args.overwrite)
  train_and_evaluate(config, args.workdir)
  return 0


# ---------------------------------------------------------------------------
# State, steps.
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class PTBState(TrainState):
  """The train state plus the LSTM ``carry`` (carried across the windows of an epoch)
  and ``acc``, the epoch's metric accumulators (summed on device by the step)."""

  carry: Any = None
  acc: Any = None


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
          "clipped": jnp.zeros((), jnp.int32), "steps": jnp.zeros((), jnp.int32),
          "examples": jnp.zeros((), jnp.float32)}


def init_state(model: models.PTBModel, tx: optax.GradientTransformation,
               config: configs.Config, seed: int) -> PTBState:
  """Everything the train step updates (and a checkpoint stores)."""
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  carry = model.initial_carry(config.batch_size)
  tokens = jnp.zeros((config.batch_size, config.num_steps), jnp.int32)
  params = jax.jit(model.init)(init_key, carry, tokens)["params"]
  state = PTBState(step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=tx.init(params), rng=jax.random.key_data(dropout_key),
                   carry=carry, acc=zero_accumulators())
  return distinct_buffers(state)


def state_shardings(state: PTBState, mesh) -> PTBState:
  """Batch-sharded LSTM carry, everything else replicated."""
  rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(mesh_lib.DATA_AXIS))
  out = jax.tree.map(lambda _: rep, state)
  return out.replace(carry=jax.tree.map(lambda _: batch, state.carry))


def place_state(state: PTBState, mesh) -> PTBState:
  if mesh is None:
    return mesh_lib.on_one_device(state)
  return mesh_lib.put(state, state_shardings(state, mesh))


def per_window_loss_fn(model: models.PTBModel, key: jax.Array):
  """``(params, x [B, T], y [B, T], w [B]) -> (losses [B], losses)``: DP-SGD's per-window
  loss.

  Every window starts from the zero state; its loss is the cross-entropy summed over
  its ``T`` targets (their batch mean is the tutorial's cost), times its weight ``w``
  (0 for a row that only pads the batch: its loss and gradient are then exactly 0).
  """

  def loss_fn(p, x, y, w):
    # Plain zeros rather than model.initial_carry, which would be a module call that
    # clipped_grad's method interception sees.
    zeros = jnp.zeros((x.shape[0], model.hidden_size), jnp.float32)
    carry = tuple((zeros, zeros) for _ in range(model.num_layers))
    _, logits = model.apply({"params": p}, carry, x, train=True, rngs={"dropout": key})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y.T).sum(axis=0) * w
    return losses, losses

  return loss_fn


def make_train_step(model: models.PTBModel, tx: optax.GradientTransformation,
                    state_sharding=None, batch_sharding=None,
                    dp: dp_lib.DPSettings | None = None):
  """The jitted train step ``state, x, y -> state`` (state donated).

  With ``dp``: ``state, x, y, w -> state``, DP-SGD on the per-window losses
  (``per_window_loss_fn``) of a padded Poisson batch whose rows of weight ``w = 0`` only
  pad it; ``tx`` starts with ``dp.dp_transform``; the carry stays zero, the accumulators
  ``cost`` / ``words`` / ``examples`` count the real windows only, and ``grad_norm_sum`` /
  ``grad_norm_max`` / ``clipped`` hold their norms' sum and max and the number clipped.
  """

  def train_step(state: PTBState, x, y, w=None) -> PTBState:
    key = state.step_key()

    def batch_loss(p):
      carry, logits = model.apply({"params": p}, state.carry, x, train=True,
                                  rngs={"dropout": key})
      cost = models.sequence_cost(logits, y)
      return cost, (cost, carry)

    w = jnp.ones(x.shape[0]) if w is None else w
    params, opt_state, aux, stats = steps.gradient_update(
        tx, state.params, state.opt_state, dp=dp, batch_loss=batch_loss,
        per_example_loss=per_window_loss_fn(model, key), inputs=(x, y, w), weights=w)
    count = jnp.sum(w)
    if dp is None:  # the batch-mean cost, per step
      (cost, carry), words = aux, y.shape[1]
    else:  # summed over the real windows, which all started (and stay) at zero
      cost, carry, words = jnp.sum(aux), state.carry, count * y.shape[1]
    acc = state.acc
    acc = {"cost": acc["cost"] + cost,
           "words": acc["words"] + words,
           "grad_norm_sum": acc["grad_norm_sum"] + stats["grad_norm"],
           "grad_norm_max": jnp.maximum(acc["grad_norm_max"], stats["grad_norm_max"]),
           "clipped": acc["clipped"] + stats["clipped"].astype(jnp.int32),
           "steps": acc["steps"] + 1, "examples": acc["examples"] + count}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         carry=carry, acc=acc)

  if state_sharding is None:
    return jax.jit(train_step, donate_argnums=0)
  batch_args = 2 if dp is None else 3
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(state_sharding,) + (batch_sharding,) * batch_args,
                 out_shardings=state_sharding)


def make_eval_step(model: models.PTBModel):
  """The jitted ``params, carry, total, x, y, mask -> carry, total + summed
  cross-entropy`` (``carry`` and ``total`` donated): the running total is summed inside
  the step, so that a window is one program (see ``mesh``)."""

  def eval_step(params, carry, total, x, y, mask):
    carry, logits = model.apply({"params": params}, carry, x, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y.T)
    return carry, total + jnp.sum(ce * mask.T)

  return jax.jit(eval_step, donate_argnums=(1, 2))


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
    place = lambda a: mesh_lib.replicate(a, mesh)
    batch_size, count = 1, n
  else:
    xs, ys = input_pipeline.batchify(ids, batch_size, num_steps)
    masks = np.ones(xs.shape[1:], np.float32)
    masks = np.broadcast_to(masks, xs.shape)
    place = lambda a: mesh_lib.shard_batch(a, mesh)
    count = xs.size
  carry = place(model.initial_carry(batch_size))
  total = mesh_lib.replicate(np.zeros((), np.float32), mesh)
  for i, (x, y, m) in enumerate(zip(xs, ys, masks), 1):
    carry, total = eval_step(params, carry, total, place(x), place(y), place(m))
    mesh_lib.pace(i, total)
  return math.exp(float(total) / count)


# ---------------------------------------------------------------------------
# Training loop.
# ---------------------------------------------------------------------------


def _zeros_like(tree):
  """Zeros with the shapes, dtypes and shardings of ``tree`` (placed from the host: no
  program, no collective)."""
  return mesh_lib.put(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree),
                      jax.tree.map(lambda a: a.sharding, tree))


@dataclasses.dataclass(frozen=True)
class EpochRecord(Record):
  """A line of metrics.jsonl per epoch. ``grad_norm_*`` and ``clip_fraction`` are per step
  (with DP-SGD per window); ``step`` and the DP fields only with DP-SGD; ``steps`` (the
  steps done) only in the record of an epoch that ``--max-steps`` cut."""

  epoch: int
  lr: float
  train_ppl: float
  wps: float
  grad_norm_mean: float
  grad_norm_max: float
  clip_fraction: float
  valid_ppl: float | None = optional()
  step: int | None = optional()
  steps: int | None = optional()
  dp: dp_lib.DPRecord | None = flattened()


@dataclasses.dataclass(frozen=True)
class TestRecord(Record):
  """The last line of a finished run."""

  epoch: int
  test_ppl: float


class _Task(Task):
  """The PTB epochs for :class:`~gradclip_jax.training.loop.TrainLoop`: the windows of
  ``xs, ys`` in order, or with DP-SGD the padded Poisson batches of ``sampler``; the LSTM
  carry and the epoch's accumulators reset at every epoch start; the validation
  perplexity in every record."""

  def __init__(self, config: configs.TrainConfig, xs, ys, train_step, evaluate_valid,
               dp: dp_lib.DPSettings | None, sampler: PoissonSampler | None,
               steps_per_epoch: int, mesh):
    self.config, self.xs, self.ys, self.dp, self.sampler = config, xs, ys, dp, sampler
    self.step_fn, self.evaluate_valid = train_step, evaluate_valid
    self.steps_per_epoch = steps_per_epoch
    self.shard = lambda a: mesh_lib.shard_batch(a, mesh)
    self.words_per_step = config.hparams.batch_size * config.hparams.num_steps

  def begin_epoch(self, state, epoch):
    if self.sampler is not None:
      self.sampler.begin_epoch()
    # The tutorial resets the LSTM state at the start of every epoch.
    return state.replace(carry=_zeros_like(state.carry), acc=_zeros_like(state.acc))

  def batches(self, epoch, start):
    for i in range(start, self.steps_per_epoch):
      if self.sampler is None:
        yield self.shard(self.xs[i]), self.shard(self.ys[i])
        continue
      idx, rows = self.sampler.draw(epoch * self.steps_per_epoch + i)
      x, y = (np.zeros((rows, a.shape[1]), a.dtype) for a in (self.xs, self.ys))
      x[:len(idx)], y[:len(idx)] = self.xs[idx], self.ys[idx]
      w = (np.arange(rows) < len(idx)).astype(np.float32)
      yield self.shard(x), self.shard(y), self.shard(w)

  def train_step(self, state, batch):
    return self.step_fn(state, *batch)

  def postfix(self, steps_done, seconds):
    return {"wps": f"{steps_done * self.words_per_step / seconds:,.0f}" if seconds else "-"}

  def _record(self, state, epoch, steps_done, seconds, step, **extra) -> EpochRecord:
    acc = jax.device_get(state.acc)
    steps_run = max(int(acc["steps"]), 1)
    words = steps_done * self.words_per_step
    if self.dp is None:
      per, dp = steps_run, None
    else:  # per sampled window
      per, words = max(float(acc["examples"]), 1.0), float(acc["words"])
      dp = self.dp.record(step, self.sampler.record())
    return EpochRecord(
        epoch=epoch, lr=self.config.hparams.lr_at(epoch - 1),
        train_ppl=math.exp(float(acc["cost"]) / max(float(acc["words"]), 1.0)),
        wps=words / seconds if seconds > 0 else 0.0,
        grad_norm_mean=float(acc["grad_norm_sum"]) / per,
        grad_norm_max=float(acc["grad_norm_max"]), clip_fraction=int(acc["clipped"]) / per,
        valid_ppl=self.evaluate_valid(state.params),
        step=None if self.dp is None else step, dp=dp, **extra)

  def epoch_record(self, state, epoch, seconds, step):
    r = self._record(state, epoch, self.steps_per_epoch, seconds, step)
    report(f"Epoch {epoch}: lr {r.lr:.4g}  train ppl {r.train_ppl:.3f}  valid ppl "
           f"{r.valid_ppl:.3f}  {r.wps:,.0f} wps  grad norm mean {r.grad_norm_mean:.3f} "
           f"max {r.grad_norm_max:.3f}  clipped {r.clip_fraction:.1%}"
           + (f"  epsilon {r.dp.epsilon:.3f}  batch size {r.dp.batch_size_min}-"
              f"{r.dp.batch_size_max} (mean {r.dp.batch_size_mean:.1f})" if r.dp else ""))
    return r

  def partial_record(self, state, epoch, steps_done, seconds, step):
    r = self._record(state, epoch, steps_done, seconds, step, steps=steps_done)
    report(f"Stopped at --max-steps {self.config.run.max_steps} (epoch {epoch}, window "
           f"{steps_done} of {self.steps_per_epoch}): train ppl {r.train_ppl:.2f}, valid "
           f"ppl {r.valid_ppl:.2f}; no test perplexity (the run did not finish)")
    return r

  def host_state(self):
    return {} if self.sampler is None else {"sampler": self.sampler.state_dict()}

  def load_host_state(self, saved):
    if self.sampler is not None:
      self.sampler.load_state_dict(saved["sampler"])


def load_data(config: configs.TrainConfig) -> input_pipeline.PTBData:
  """The PTB splits of ``config.run.data_dir`` (cut to ``max_tokens``); ``UsageError``
  naming the problem and how to get the data."""
  with flags.data_errors("ptb", config.run.data_dir):
    data = input_pipeline.load_ptb(config.run.data_dir, vocab_size=config.hparams.vocab_size)
  if config.max_tokens:
    n = config.max_tokens
    data = data._replace(train=data.train[:n], valid=data.valid[:n], test=data.test[:n])
  return data


def train_and_evaluate(config: configs.TrainConfig,
                       workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """Trains and tests the PTB model of ``config``; returns the metrics.jsonl records.

  Resumes from the latest checkpoint in ``workdir`` if there is one (refused, with a
  ``UsageError``, if it was written with another config); a finished run returns its
  records at once. SIGINT / SIGTERM stop the run after the current step with a
  checkpoint and raise :class:`~gradclip_jax.training.errors.Interrupted`. The loop is
  :class:`~gradclip_jax.training.loop.TrainLoop`'s. A finished run also writes
  ``results.json``.
  """
  run, hp, max_epochs = config.run, config.hparams, config.max_epochs
  workdir = pathlib.Path(workdir)
  checkpoints.check_saved_config(workdir, config.describe())  # before reading the data
  data = load_data(config)
  try:  # the tutorial's rows of windows; with DP-SGD the disjoint windows to sample
    xs, ys = (input_pipeline.batchify(data.train, hp.batch_size, hp.num_steps)
              if run.dp is None else input_pipeline.windows(data.train, hp.num_steps))
  except ValueError as e:
    raise UsageError(f"--max-tokens {config.max_tokens}: {e}") from None
  num_devices = mesh_lib.num_data_devices(hp.batch_size, run.num_devices)
  mesh = mesh_lib.make_mesh(num_devices)
  sampler = None
  if run.dp is not None:
    if len(xs) < hp.batch_size:
      raise UsageError(f"--max-tokens {config.max_tokens}: {len(xs)} windows are fewer "
                       f"than the batch size {hp.batch_size}")
    sampler = PoissonSampler(len(xs), hp.batch_size, run.seed, multiple=num_devices)
  epoch_size = len(xs) if sampler is None else sampler.steps_per_epoch

  model = build_model(hp, config.matmul_dtype)
  clip, dp = steps.clip_or_dp(run, hp.max_grad_norm, batch_size=hp.batch_size,
                              dataset_size=epoch_size * hp.batch_size if sampler is None
                              else sampler.dataset_size,
                              planned_steps=epoch_size * max_epochs)
  tx = build_optimizer(hp, clip, epoch_size)
  state = place_state(init_state(model, tx, hp, run.seed), mesh)
  if mesh is None:
    train_step = make_train_step(model, tx, dp=dp)
  else:
    train_step = make_train_step(model, tx, state_shardings(state, mesh),
                                 NamedSharding(mesh, P(mesh_lib.DATA_AXIS)), dp=dp)
  eval_step = make_eval_step(model)
  evaluate_valid = lambda params: evaluate(model, eval_step, params, data.valid,
                                           hp.batch_size, hp.num_steps, mesh)
  task = _Task(config, xs, ys, train_step, evaluate_valid, dp, sampler, epoch_size, mesh)

  described = {**config.describe(), "dp_settings": None if dp is None else dp.as_meta()}
  loop = TrainLoop(workdir, described, run, steps_per_epoch=epoch_size,
                   max_epochs=max_epochs)
  try:
    state = loop.restore(task, state)
    if loop.done:
      return loop.records
    report(f"PTB {config.name}: {len(data.train):,} train tokens, {epoch_size} "
           f"{'windows' if dp is None else 'steps'}/epoch, {max_epochs} epochs, "
           f"clip={run.clip}, {num_devices} device(s)"
           + ("" if sampler is None else f"; {sampler.dataset_size:,} windows of "
              f"{hp.num_steps + 1} tokens, Poisson batches of {hp.batch_size} expected, "
              f"padded to {sampler.capacity}"))
    state = loop.run(task, state)
    if loop.partial is not None:
      return loop.records + [loop.partial]
    if not loop.finished:
      report(f"Stopped at --max-steps {run.max_steps} after epoch "
             f"{loop.step // epoch_size}; no test perplexity (the run did not finish)")
      return loop.records
    test_ppl = evaluate(model, eval_step, state.params, data.test, 1, TEST_WINDOW, mesh,
                        full=True)
    report(f"Test ppl {test_ppl:.3f}")
    loop.finish(task, state, TestRecord(epoch=max_epochs, test_ppl=test_ppl))
    _write_results(workdir, config, test_ppl, loop.step, dp, sampler)
    return loop.records
  finally:
    loop.close()


def _write_results(workdir: pathlib.Path, config: configs.TrainConfig, test_ppl: float,
                   step: int, dp: dp_lib.DPSettings | None,
                   sampler: PoissonSampler | None) -> None:
  """``results.json`` of a finished run: the test perplexity and, with DP-SGD, the
  privacy spent, the sampler and the accountant."""
  result = {"test_ppl": test_ppl, "steps": step, "config": config.describe()}
  if dp is not None:
    result["dp"] = dp.results(step, sampler)
  if is_primary():
    (workdir / "results.json").write_text(json.dumps(jsonable(result), indent=2) + "\n")
