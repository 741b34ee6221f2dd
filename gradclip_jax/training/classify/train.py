"""Sentiment classification with a (bi)LSTM, trained with gradient clipping.

``gradclip classify --dataset {imdb,mr} --data-dir DIR --workdir OUT [--clip RULE] ...``

The optimizer is ``optax.chain(<clipping rule from --clip>, adam | sgd)``. Outputs in
``--workdir``: ``metrics.jsonl`` (one line per epoch: ``epoch, train_loss, train_acc,
eval_acc, grad_norm_mean, clip_fraction, examples_per_s``), ``checkpoints/`` (orbax; exact
``--resume``), ``data_cache/`` (tokenized corpus), ``results.json`` (final test accuracy
of the parameters with the best ``eval_acc``; with ``--set ema_decay=D`` the parameters
evaluated and tested are their exponential moving average, see ``ema_update``) and
``predictions.npz`` (their class probabilities on the test split, and its labels).
``--set ensemble=K`` trains K models with seeds ``--seed`` to ``--seed + K - 1`` (each in
``member-k/``, laid out as above) and tests the mean of their probabilities.

DP-SGD (``--dp``, privacy unit: one training example): every step's batch is
Poisson-sampled (``training.sampling.PoissonSampler``: each example with probability
``q = B / N``, an epoch ``N // B`` steps) and padded to the sampler's capacity with rows of
weight 0; the gradient is ``gradclip_jax.clipped_grad`` of the per-example losses (each
clipped to ``--dp-max-norm``, summed), and the optimizer is ``optax.chain(add_noise(sigma,
C), scale(1 / B), adam | sgd)``; every line of metrics.jsonl adds ``epsilon,
noise_multiplier, dp_max_norm, delta, dp_sampling, batch_size_min, batch_size_max,
batch_size_mean``, ``grad_norm_mean`` / ``clip_fraction`` are then the mean per-example
norm and the fraction of examples clipped, and ``results.json`` records the sampler and
the accountant (``dp.sampler``, ``dp.accountant``). See ``training.dp.add_dp_arguments``.

The Python entry point is :func:`train_and_evaluate` ``(config, workdir)`` with a
``configs.TrainConfig``; it resumes from the latest checkpoint in ``workdir`` when there
is one (the command line asks for ``--resume`` then).

Data: IMDB (Maas et al. 2011) and MR (Pang & Lee 2005); see ``input_pipeline``.
Model: Hochreiter & Schmidhuber (1997) LSTM; see ``models``.

Quality runs (2-core CPU)::

    gradclip classify --dataset imdb --data-dir ../shared/data/imdb --workdir runs/imdb
    gradclip classify --dataset mr --data-dir ../shared/data/rt-polarity --workdir runs/mr \
        --set valid_fraction=0 [--set ensemble=5]
    gradclip classify --dataset imdb --config imdb_dp --data-dir ../shared/data/imdb \
        --workdir runs/imdb_dp_eps8 --dp --target-epsilon 8 --delta 1e-5
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradclip_jax.training import checkpoints, flags, mesh as mesh_lib, steps
from gradclip_jax.training import dp as dp_lib
from gradclip_jax.training.classify import configs
from gradclip_jax.training.classify import input_pipeline
from gradclip_jax.training.classify import models
from gradclip_jax.training.errors import UsageError
from gradclip_jax.training.loop import Task, TrainLoop, per_second
from gradclip_jax.training.metrics import Record, flattened, is_primary, report
from gradclip_jax.training.sampling import PoissonSampler
from gradclip_jax.training.state import TrainState, distinct_buffers


# -----------------------------------------------------------------------------------------
# Command line.
# -----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags of ``gradclip classify`` (the shared ones: ``training.flags``)."""
  parser.add_argument("--dataset", required=True, choices=input_pipeline.DATASETS,
                      help="imdb (Maas et al. 2011) or mr (Pang & Lee 2005)")
  flags.add_common_arguments(parser, default_clip="global_norm")
  g = parser.add_argument_group("classify options")
  g.add_argument("--config", choices=configs.NAMES, default=None,
                 help="named config (default: the one named like --dataset); --set "
                 "FIELD=VALUE changes one of its fields")
  g.add_argument("--optimizer", choices=("adam", "sgd"), default=None)
  g.add_argument("--learning-rate", type=flags.positive_float, default=None)
  g.add_argument("--batch-size", type=flags.positive_int, default=None)
  g.add_argument("--mr-fold", type=flags.nonnegative_int, default=None,
                 help="MR: test fold 0-9 of the seeded 10-fold split (default 0)")
  g.add_argument("--max-examples", type=flags.positive_int, default=None,
                 help="use at most this many examples per split (smoke runs)")
  g.add_argument("--cache-dir", type=pathlib.Path, default=None,
                 help="tokenized-data cache (default: WORKDIR/data_cache)")
  dp_lib.add_dp_arguments(parser, unit="one training example (review or sentence)")


def config_from_args(args: argparse.Namespace) -> configs.TrainConfig:
  """The run's config from the parsed flags (``UsageError`` for a bad one)."""
  name = args.config or args.dataset
  cfg = flags.override(configs.get_config(name), args.set)
  fields = {"optimizer": args.optimizer, "learning_rate": args.learning_rate,
            "batch_size": args.batch_size, "mr_fold": args.mr_fold,
            "max_examples": args.max_examples}
  cfg = dataclasses.replace(cfg, **{k: v for k, v in fields.items() if v is not None})
  return configs.TrainConfig(run=flags.run_options(args), dataset=args.dataset,
                             hparams=cfg, name=name, cache_dir=args.cache_dir)


def summary(result: dict[str, Any], workdir: pathlib.Path) -> str:
  """The last line of ``gradclip classify``: the test accuracy and what was tested."""
  where = f"written to {workdir / 'results.json'}"
  if "member_test_acc" in result:
    accs = ", ".join(f"{100 * a:.2f}" for a in result["member_test_acc"])
    return (f"test accuracy: {100 * result['test_acc']:.2f}% (ensemble of "
            f"{result['ensemble']}; members {accs}%); {where}")
  if result["selected_epoch"] is None:
    how = (f"the final parameters; no evaluation ran: --max-steps {result['steps']} "
           f"stopped before the end of the first epoch ({result['steps_per_epoch']} "
           "steps)")
  elif result["best_eval_acc"] is None:
    how = (f"epoch {result['selected_epoch']}, the last: valid_fraction=0 leaves no "
           "validation split to select on")
  else:
    how = (f"epoch {result['selected_epoch']}, best eval_acc "
           f"{100 * result['best_eval_acc']:.2f}%")
  return f"test accuracy: {100 * result['test_acc']:.2f}% ({how}); {where}"


def main(args: argparse.Namespace) -> int:
  """``gradclip classify``: checks the flags and the workdir, trains, tests."""
  config = config_from_args(args)
  checkpoints.prepare_workdir(args.workdir, resume=args.resume, overwrite=args.overwrite)
  result = train_and_evaluate(config, args.workdir)
  report(summary(result, pathlib.Path(args.workdir)))
  return 0


# -----------------------------------------------------------------------------------------
# Model, optimizer and the jitted steps.
# -----------------------------------------------------------------------------------------


@flax.struct.dataclass
class ClassifyState(TrainState):
  """The train state plus ``ema_params``, the parameters' moving average (``None``
  without ``ema_decay``)."""

  ema_params: Any = None


def make_model(cfg: configs.ClassifyConfig, vocab_size: int,
               num_classes: int = 2) -> models.LSTMClassifier:
  return models.LSTMClassifier(
      vocab_size=vocab_size, num_classes=num_classes, embed_dim=cfg.embed_dim,
      hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
      bidirectional=cfg.bidirectional, pooling=tuple(cfg.pooling),
      embed_dropout=cfg.embed_dropout, word_dropout=cfg.word_dropout, dropout=cfg.dropout,
      unroll=cfg.unroll)


def make_schedule(cfg: configs.ClassifyConfig, total_steps: int) -> optax.Schedule:
  if cfg.lr_schedule == "constant":
    warm = max(cfg.warmup_steps, 1)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, warm),
         optax.constant_schedule(cfg.learning_rate)], [warm]) if cfg.warmup_steps else \
        optax.constant_schedule(cfg.learning_rate)
  if cfg.lr_schedule == "cosine":
    warm = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warm,
                                              max(total_steps, warm + 1), end_value=0.0)
  raise ValueError(f"lr_schedule must be 'cosine' or 'constant'; got {cfg.lr_schedule!r}")


def make_optimizer(cfg: configs.ClassifyConfig, clip: optax.GradientTransformation,
                   total_steps: int) -> optax.GradientTransformation:
  """``optax.chain(clip, adam | sgd)``: the rule sees the raw gradient."""
  schedule = make_schedule(cfg, total_steps)
  if cfg.optimizer == "adam":
    opt = optax.adam(schedule)
  elif cfg.optimizer == "sgd":
    opt = optax.sgd(schedule, momentum=cfg.momentum or None)
  else:
    raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {cfg.optimizer!r}")
  return optax.chain(clip, opt)


def _example_losses(logits, labels, weights):
  """Per example: (cross-entropy, 1 if the argmax is right), each times its weight.

  A weight of 0 marks an example that only fills a batch: its loss, accuracy and
  gradient are then exactly zero.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * weights
  return losses, correct


def _weighted_loss(logits, labels, weights):
  losses, correct = _example_losses(logits, labels, weights)
  return jnp.sum(losses), jnp.sum(correct), jnp.sum(weights)


def per_example_loss_fn(model: models.LSTMClassifier, key: jax.Array) -> Callable:
  """``(params, tokens, mask, labels, weights) -> (losses [B], (losses, correct))``.

  Each example's cross-entropy times its weight (0 for an example that only fills a
  batch, whose gradient is then exactly zero): the loss ``clipped_grad`` needs for DP-SGD.
  """

  def loss_fn(params, tokens, mask, labels, weights):
    logits = model.apply({"params": params}, tokens, mask, train=True, rngs={"dropout": key})
    losses, correct = _example_losses(logits, labels, weights)
    return losses, (losses, correct)

  return loss_fn


def ema_update(ema, params, step, decay: float):
  """Polyak averaging (Polyak & Juditsky 1992) with a warm-up of the decay.

  ``ema <- d * ema + (1 - d) * params`` with ``d = min(decay, (1 + step) / (10 + step))``
  (the ``num_updates`` rule of TensorFlow's ``ExponentialMovingAverage``), so the first
  steps do not keep the random initialisation in the average for long. Accumulates in the
  parameters' dtype.
  """
  t = step.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(p.dtype), ema, params)


def init_state(model: models.LSTMClassifier, tx: optax.GradientTransformation,
               cfg: configs.ClassifyConfig, seed: int) -> ClassifyState:
  """The initial state: parameters from ``seed``, dropout keys from ``seed`` too."""
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  dummy = jnp.zeros((1, cfg.pad_multiple), jnp.int32)
  params = model.init(init_key, dummy, dummy > -1)["params"]
  state = ClassifyState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=tx.init(params), rng=jax.random.key_data(dropout_key),
                        ema_params=params if cfg.ema_decay > 0 else None)
  return distinct_buffers(state)


def make_train_step(model: models.LSTMClassifier, tx: optax.GradientTransformation,
                    dp: dp_lib.DPSettings | None = None, ema_decay: float = 0.0) -> Callable:
  """One jitted update ``(state, batch) -> (state, metrics)``; the state is donated.

  With ``ema_decay > 0`` the state's ``ema_params`` are updated by ``ema_update`` after
  every step.

  Without ``dp`` the gradient is that of the batch-mean loss. With ``dp`` it is the sum
  of the per-example gradients clipped to ``dp.max_norm`` (``dp.dp_clipped_grad``);
  ``tx`` must then start with ``dp.dp_transform(dp, seed)`` (noise, ``1/B``). The
  metrics ``grad_norm`` and ``clipped`` are then the sum of the per-example norms and the
  number of examples clipped (of the real examples: weight > 0).
  """

  def train_step(state: ClassifyState, batch):
    per_example = per_example_loss_fn(model, state.step_key())
    inputs = (batch["tokens"], batch["mask"], batch["labels"], batch["weights"])
    count = jnp.sum(batch["weights"])

    def batch_loss(params):
      losses, (_, correct) = per_example(params, *inputs)
      loss_sum = jnp.sum(losses)
      return loss_sum / jnp.maximum(count, 1.0), (loss_sum, jnp.sum(correct))

    params, opt_state, (losses, correct), stats = steps.gradient_update(
        tx, state.params, state.opt_state, dp=dp, batch_loss=batch_loss,
        per_example_loss=per_example, inputs=inputs, weights=batch["weights"])
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if ema_decay > 0:
      new_state = new_state.replace(
          ema_params=ema_update(state.ema_params, params, state.step, ema_decay))
    # Sums over the batch (with dp the aux is per example; else already summed).
    metrics = {"loss_sum": jnp.sum(losses), "correct": jnp.sum(correct), "count": count,
               "grad_norm": stats["grad_norm"], "clipped": stats["clipped"]}
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(model: models.LSTMClassifier) -> Callable:
  """``(params, batch) -> ((loss sum, correct, count), class probabilities [B, C])``."""
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["tokens"], batch["mask"], train=False)
    probs = jax.nn.softmax(logits.astype(jnp.float32))
    return _weighted_loss(logits, batch["labels"], batch["weights"]), probs
  return jax.jit(eval_step)


def evaluate(eval_step, params, split: input_pipeline.Split, cfg: configs.ClassifyConfig,
             mesh) -> dict[str, Any]:
  """Accuracy, loss and class probabilities ``probs`` ``[N, C]`` (in the split's order)."""
  totals = np.zeros(3)
  batches = input_pipeline.eval_batches(split.lengths, cfg.eval_batch_size)
  probs = None
  # At most mesh.MAX_AHEAD batches in flight: each chunk is fetched before the next.
  for start in range(0, len(batches), mesh_lib.MAX_AHEAD):
    chunk, pending = batches[start:start + mesh_lib.MAX_AHEAD], []
    for idx in chunk:
      batch = input_pipeline.make_batch(split, idx, pad_multiple=cfg.pad_multiple,
                                        batch_size=cfg.eval_batch_size)
      pending.append(eval_step(params, mesh_lib.shard_batch(batch, mesh)))
    for idx, (sums, p) in zip(chunk, mesh_lib.to_host(pending)):
      totals += np.asarray(sums, dtype=np.float64)
      if probs is None:
        probs = np.zeros((len(split), p.shape[-1]), np.float32)
      probs[idx] = p[:len(idx)]  # Rows past len(idx) only fill the batch.
  loss_sum, correct, count = totals
  return {"acc": correct / max(count, 1), "loss": loss_sum / max(count, 1),
          "probs": probs if probs is not None else np.zeros((0, 0), np.float32)}


# -----------------------------------------------------------------------------------------
# The training loop.
# -----------------------------------------------------------------------------------------


#: A copy of a pytree of arrays as one program (not one eager copy per leaf; see ``mesh``).
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


@dataclasses.dataclass
class Totals:
  """An epoch's training metrics, summed on the host from the steps' outputs."""

  loss_sum: float = 0.0
  correct: float = 0.0
  count: float = 0.0
  grad_norm_sum: float = 0.0
  clipped: float = 0.0
  steps: int = 0

  def add(self, m: Mapping[str, Any]) -> None:
    self.loss_sum += float(m["loss_sum"])
    self.correct += float(m["correct"])
    self.count += float(m["count"])
    self.grad_norm_sum += float(m["grad_norm"])
    self.clipped += float(m["clipped"])
    self.steps += 1


@dataclasses.dataclass(frozen=True)
class EpochRecord(Record):
  """A line of metrics.jsonl per epoch: ``eval_acc`` is ``None`` without a validation
  split (or in the record of an epoch that ``--max-steps`` cut); ``grad_norm_mean`` and
  ``clip_fraction`` are per step, with DP-SGD per example; the DP fields only with DP."""

  epoch: int
  step: int
  train_loss: float
  train_acc: float
  eval_acc: float | None
  grad_norm_mean: float
  clip_fraction: float
  examples_per_s: float | None
  dp: dp_lib.DPRecord | None = flattened()


class _Task(Task):
  """The classification epochs for :class:`~gradclip_jax.training.loop.TrainLoop`:
  length-bucketed batches (with DP-SGD the padded Poisson batches of ``sampler``),
  per-step metrics summed on the host every few steps, the parameters with the best
  ``eval_acc`` kept (in the checkpoint too)."""

  def __init__(self, config: configs.TrainConfig, data, train_step, eval_step,
               dp: dp_lib.DPSettings | None, sampler: PoissonSampler | None, mesh, state):
    self.config, self.cfg, self.data, self.dp, self.mesh = (config, config.hparams, data,
                                                           dp, mesh)
    self.sampler = sampler
    self.steps_per_epoch = len(data.train) // config.hparams.batch_size
    self.step_fn, self.eval_step = train_step, eval_step
    self.eval_key = "ema_params" if self.cfg.ema_decay > 0 else "params"  # evaluated/tested
    self.best_params = _copy(getattr(state, self.eval_key))  # replaced by a checkpoint's
    self.best_eval_acc, self.best_epoch = None, None
    self.totals, self.pending = Totals(), []
    self.run_count = 0.0  # this call's examples
    self.grad_trace: list[float] = []
    self.clip_trace: list[bool] = []

  def begin_epoch(self, state, epoch):
    self.totals = Totals()
    if self.sampler is not None:
      self.sampler.begin_epoch()
    return state

  def batches(self, epoch, start):
    cfg, train = self.cfg, self.data.train
    if self.sampler is None:
      for idx in input_pipeline.bucketed_batches(
          train.lengths, cfg.batch_size, seed=self.config.run.seed, epoch=epoch,
          chunk_batches=cfg.bucket_chunk_batches)[start:]:
        batch = input_pipeline.make_batch(train, idx, pad_multiple=cfg.pad_multiple)
        yield mesh_lib.shard_batch(batch, self.mesh)
      return
    for step in range(epoch * self.steps_per_epoch + start,
                      (epoch + 1) * self.steps_per_epoch):
      idx, rows = self.sampler.draw(step)
      batch = input_pipeline.padded_batch(train, idx, rows, pad_multiple=cfg.pad_multiple)
      yield mesh_lib.shard_batch(batch, self.mesh)

  def train_step(self, state, batch):
    state, m = self.step_fn(state, batch)
    self.pending.append(m)
    return state

  def sync(self, state):
    for m in mesh_lib.to_host(self.pending):
      self.totals.add(m)
      count = float(m["count"])
      self.run_count += count
      if self.dp is None:
        self.grad_trace.append(float(m["grad_norm"]))
        self.clip_trace.append(bool(m["clipped"]))
      else:  # The mean per-example norm; some example clipped.
        self.grad_trace.append(float(m["grad_norm"]) / max(count, 1.0))
        self.clip_trace.append(bool(m["clipped"] > 0))
    self.pending.clear()

  def postfix(self, steps_done, seconds):
    t = self.totals
    return {"loss": f"{t.loss_sum / t.count:.3f}", "acc": f"{t.correct / t.count:.3f}"} \
        if t.count else {}

  def _record(self, epoch, eval_acc, seconds, step) -> EpochRecord:
    t = self.totals
    n, steps_done = max(t.count, 1.0), max(t.steps, 1)
    per = steps_done if self.dp is None else n  # DP: per example, else per step.
    return EpochRecord(
        epoch=epoch, step=step, train_loss=t.loss_sum / n, train_acc=t.correct / n,
        eval_acc=eval_acc, grad_norm_mean=t.grad_norm_sum / per,
        clip_fraction=t.clipped / per, examples_per_s=per_second(t.count, seconds),
        dp=None if self.dp is None else self.dp.record(step, self.sampler.record()))

  def epoch_record(self, state, epoch, seconds, step):
    params = getattr(state, self.eval_key)
    eval_acc = evaluate(self.eval_step, params, self.data.valid, self.cfg,
                        self.mesh)["acc"] if len(self.data.valid) else None
    r = self._record(epoch, eval_acc, seconds, step)
    # Select on eval_acc; without a validation split, the last epoch.
    if eval_acc is None or self.best_eval_acc is None or eval_acc > self.best_eval_acc:
      self.best_eval_acc, self.best_epoch = eval_acc, epoch
      self.best_params = _copy(params)
    shown = "none (no validation split)" if eval_acc is None else f"{eval_acc:.4f}"
    eps = (f" epsilon {r.dp.epsilon:.3f} batch size {r.dp.batch_size_min}-"
           f"{r.dp.batch_size_max} (mean {r.dp.batch_size_mean:.1f})" if r.dp else "")
    rate = f"{r.examples_per_s:.0f}" if r.examples_per_s is not None else "-"
    report(f"epoch {epoch}: train_loss {r.train_loss:.4f} train_acc {r.train_acc:.4f} "
           f"eval_acc {shown} grad_norm {r.grad_norm_mean:.3f} clip "
           f"{r.clip_fraction:.3f} {rate} ex/s{eps}")
    return r

  def partial_record(self, state, epoch, steps_done, seconds, step):
    return self._record(epoch, None, seconds, step)

  def host_state(self):
    return {"totals": dataclasses.asdict(self.totals), "best_eval_acc": self.best_eval_acc,
            "best_epoch": self.best_epoch,
            "sampler": None if self.sampler is None else self.sampler.state_dict()}

  def load_host_state(self, saved):
    self.totals = Totals(**saved["totals"])
    self.best_eval_acc, self.best_epoch = saved["best_eval_acc"], saved["best_epoch"]
    if self.sampler is not None:
      self.sampler.load_state_dict(saved["sampler"])

  def checkpoint_tree(self, state):
    return {"train": state, "best_params": self.best_params}

  def from_checkpoint_tree(self, tree):
    self.best_params = tree["best_params"]
    return tree["train"]


def load_data(config: configs.TrainConfig, workdir: pathlib.Path) -> input_pipeline.ClassificationData:
  """The dataset's splits (``UsageError`` naming the problem and how to get the data)."""
  h = config.hparams
  with flags.data_errors(config.dataset, config.run.data_dir):
    return input_pipeline.load_dataset(
        config.dataset, config.run.data_dir, vocab_size=h.vocab_size,
        min_count=h.min_count, max_len=h.max_len, truncate=h.truncate,
        valid_fraction=h.valid_fraction, split_seed=h.split_seed, mr_fold=h.mr_fold,
        max_examples=h.max_examples,
        cache_dir=config.cache_dir if config.cache_dir is not None
        else workdir / "data_cache")


def train_and_evaluate(config: configs.TrainConfig,
                       workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains, evaluating each epoch, and tests the parameters with the best ``eval_acc``.

  Resumes from the latest checkpoint in ``workdir`` if there is one (refused, with a
  ``UsageError``, if it was written with another config). SIGINT / SIGTERM stop the run
  after the current step with a checkpoint and raise
  :class:`~gradclip_jax.training.errors.Interrupted`. The loop is
  :class:`~gradclip_jax.training.loop.TrainLoop`'s.

  Returns a dict with what ``results.json`` holds (``test_acc``, ``selected_epoch`` --
  ``None`` if no epoch finished, then the final parameters are tested --,
  ``best_eval_acc`` -- ``None`` without an evaluation --, ``examples_per_s`` -- ``None``
  if no step ran in this call --, ...) plus ``records`` (the metrics.jsonl lines),
  ``grad_norm_trace`` and ``clipped_trace`` (per step of this call), ``test_probs`` and
  ``test_labels``. With ``run.dp`` the noise multiplier is derived over ``max_epochs``
  full epochs (``max_steps`` does not change it), and every record adds the epsilon
  spent so far. ``hparams.ensemble > 1`` trains that many models and tests their mean
  probabilities (see ``_train_ensemble``).
  """
  workdir = pathlib.Path(workdir)
  if config.hparams.ensemble != 1:
    return _train_ensemble(config, workdir)
  run, cfg = config.run, config.hparams
  checkpoints.check_saved_config(workdir, config.describe())  # before reading the data
  if is_primary():
    workdir.mkdir(parents=True, exist_ok=True)
  t_load = time.perf_counter()
  data = load_data(config, workdir)
  load_seconds = time.perf_counter() - t_load
  if len(data.train) < cfg.batch_size:
    raise UsageError(f"{len(data.train)} training examples < batch size {cfg.batch_size}")
  report(f"{config.dataset}: train {len(data.train)}, valid {len(data.valid)}, test "
         f"{len(data.test)}, vocab {len(data.vocab)}; loaded in {load_seconds:.1f}s")

  steps_per_epoch = len(data.train) // cfg.batch_size
  planned_steps = steps_per_epoch * config.max_epochs
  num_devices = mesh_lib.num_data_devices(cfg.batch_size, run.num_devices)
  mesh = mesh_lib.make_mesh(num_devices)
  if mesh is not None and cfg.eval_batch_size % mesh.size:
    raise UsageError(f"eval_batch_size {cfg.eval_batch_size} is not divisible by the "
                     f"{mesh.size} data-parallel devices")
  sampler = None if run.dp is None else PoissonSampler(
      len(data.train), cfg.batch_size, run.seed, multiple=num_devices)
  model = make_model(cfg, len(data.vocab), data.num_classes)
  clip, dp = steps.clip_or_dp(run, cfg.max_grad_norm, batch_size=cfg.batch_size,
                              dataset_size=len(data.train), planned_steps=planned_steps)
  tx = make_optimizer(cfg, clip, planned_steps)
  state = mesh_lib.replicate(init_state(model, tx, cfg, run.seed), mesh)
  eval_step = make_eval_step(model)
  task = _Task(config, data, make_train_step(model, tx, dp, cfg.ema_decay), eval_step, dp,
               sampler, mesh, state)
  if sampler is not None:
    report(f"Poisson batches of {cfg.batch_size} expected, padded to {sampler.capacity} "
           "rows (more in the rare steps that draw more)")

  described = {**config.describe(), "dp_settings": None if dp is None else dp.as_meta()}
  loop = TrainLoop(workdir, described, run, steps_per_epoch=steps_per_epoch,
                   max_epochs=config.max_epochs)
  try:
    state = loop.restore(task, state)
    state = loop.run(task, state)
  finally:
    loop.close()

  # Test the parameters with the best eval_acc (the final ones if no epoch finished).
  test = evaluate(eval_step, task.best_params if task.best_epoch else
                  getattr(state, task.eval_key), data.test, cfg, mesh)
  result = {"dataset": config.dataset, "clip": run.clip, "clip_value": run.clip_value,
            "seed": run.seed, "steps": loop.step, "steps_per_epoch": steps_per_epoch,
            "test_acc": test["acc"], "test_loss": test["loss"],
            "selected_epoch": task.best_epoch, "best_eval_acc": task.best_eval_acc,
            "load_seconds": load_seconds,
            "examples_per_s": per_second(task.run_count, loop.run_seconds),
            "config": dataclasses.asdict(dataclasses.replace(cfg,
                                                             max_epochs=config.max_epochs))}
  if dp is not None:
    result["dp"] = dp.results(loop.step, sampler)
  if is_primary():
    (workdir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    np.savez(workdir / "predictions.npz", test_probs=test["probs"],
             test_labels=data.test.labels)
  return {**result, "records": loop.records, "grad_norm_trace": task.grad_trace,
          "clipped_trace": task.clip_trace, "test_probs": test["probs"],
          "test_labels": data.test.labels}


def _train_ensemble(config: configs.TrainConfig, workdir: pathlib.Path) -> dict[str, Any]:
  """Trains ``hparams.ensemble`` models and tests the mean of their class probabilities.

  Member ``k`` is an ordinary run with seed ``seed + k`` (its own initialisation, dropout
  and batch order; the same data split and vocabulary) in ``WORKDIR/member-k``, with
  its own checkpoints, so a resumed run picks up where the ensemble stopped. The ensemble
  predicts the class with the highest mean probability: an ensemble of independently
  trained networks (Hansen & Salamon 1990, "Neural network ensembles";
  Lakshminarayanan et al. 2017, "Simple and scalable predictive uncertainty estimation
  using deep ensembles"). ``results.json`` has the ensemble's ``test_acc`` and
  ``test_loss`` (cross-entropy of the mean probabilities) and every member's accuracy.
  """
  members, seed = config.hparams.ensemble, config.run.seed
  cache_dir = config.cache_dir if config.cache_dir is not None else workdir / "data_cache"
  runs = []
  for k in range(members):
    report(f"ensemble member {k + 1}/{members} (seed {seed + k})")
    member = dataclasses.replace(
        config, hparams=dataclasses.replace(config.hparams, ensemble=1),
        run=dataclasses.replace(config.run, seed=seed + k), cache_dir=cache_dir)
    runs.append(train_and_evaluate(member, workdir / f"member-{k}"))
  labels = runs[0]["test_labels"]
  probs = np.mean([r["test_probs"] for r in runs], axis=0)
  true_probs = probs[np.arange(len(labels)), labels]
  member_accs = [r["test_acc"] for r in runs]
  result = {"dataset": config.dataset, "clip": config.run.clip,
            "clip_value": config.run.clip_value, "seed": seed, "ensemble": members,
            "test_acc": float(np.mean(np.argmax(probs, -1) == labels)),
            "test_loss": float(-np.mean(np.log(np.maximum(true_probs, 1e-12)))),
            "member_test_acc": member_accs,
            "member_test_acc_mean": float(np.mean(member_accs)),
            "member_workdirs": [f"member-{k}" for k in range(members)],
            "config": dataclasses.asdict(
                dataclasses.replace(config.hparams, max_epochs=config.max_epochs))}
  if is_primary():
    (workdir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    np.savez(workdir / "predictions.npz", test_probs=probs, test_labels=labels)
  return {**result, "members": runs, "test_probs": probs, "test_labels": labels}
