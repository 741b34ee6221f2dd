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

DP-SGD (``--dp``, privacy unit: one training example): the gradient is
``gradclip_jax.clipped_grad`` of the per-example losses (each clipped to ``--dp-max-norm``,
summed), and the optimizer is ``optax.chain(add_noise(sigma, C), scale(1 / B), adam | sgd)``;
every line of metrics.jsonl adds ``epsilon, noise_multiplier, dp_max_norm, delta``, and
``grad_norm_mean`` / ``clip_fraction`` are then the mean per-example norm and the fraction
of examples clipped. See ``common.add_dp_arguments``.

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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradclip_jax.training import common
from gradclip_jax.training.classify import configs
from gradclip_jax.training.classify import input_pipeline
from gradclip_jax.training.classify import models

_METRIC_FLUSH_EVERY = 20  # Steps between host syncs of the per-step metrics.


# -----------------------------------------------------------------------------------------
# Command line.
# -----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags of ``gradclip classify`` (the shared ones come from ``common``)."""
  parser.add_argument("--dataset", required=True, choices=input_pipeline.DATASETS,
                      help="imdb (Maas et al. 2011) or mr (Pang & Lee 2005)")
  common.add_common_arguments(parser, default_clip="global_norm")
  g = parser.add_argument_group("classify options")
  g.add_argument("--config", choices=configs.NAMES, default=None,
                 help="named config (default: the one named like --dataset)")
  g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a config field, e.g. --set hidden_size=64 (repeatable)")
  g.add_argument("--optimizer", choices=("adam", "sgd"), default=None)
  g.add_argument("--learning-rate", type=float, default=None)
  g.add_argument("--batch-size", type=int, default=None)
  g.add_argument("--mr-fold", type=int, default=None,
                 help="MR: test fold 0-9 of the seeded 10-fold split (default 0)")
  g.add_argument("--max-examples", type=int, default=None,
                 help="use at most this many examples per split (smoke runs)")
  g.add_argument("--cache-dir", type=pathlib.Path, default=None,
                 help="tokenized-data cache (default: WORKDIR/data_cache)")
  common.add_dp_arguments(parser, unit="one training example (review or sentence)")


def config_from_args(args: argparse.Namespace) -> configs.ClassifyConfig:
  cfg = configs.override(configs.get_config(args.config or args.dataset), args.set)
  flags = {"optimizer": args.optimizer, "learning_rate": args.learning_rate,
           "batch_size": args.batch_size, "mr_fold": args.mr_fold,
           "max_examples": args.max_examples, "max_epochs": args.max_epochs}
  return dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})


def main(args: argparse.Namespace) -> int:
  dp = common.dp_flags_from_args(args)
  cfg = config_from_args(args)
  result = train_and_evaluate(
      cfg, dataset=args.dataset, data_dir=args.data_dir, workdir=args.workdir,
      clip=args.clip, clip_value=args.clip_value, seed=args.seed, max_steps=args.max_steps,
      resume=args.resume, cache_dir=args.cache_dir, checkpoint_every=args.checkpoint_every,
      num_devices=args.num_devices, progress=not args.no_progress, dp=dp)
  if cfg.ensemble != 1:
    accs = ", ".join(f"{100 * a:.2f}" for a in result["member_test_acc"])
    print(f"test accuracy: {100 * result['test_acc']:.2f}% (ensemble of {cfg.ensemble}; "
          f"members {accs}%); written to {args.workdir / 'results.json'}")
    return 0
  how = ("best eval_acc" if result["best_eval_acc"] >= 0 else "last epoch, no valid split")
  print(f"test accuracy: {100 * result['test_acc']:.2f}% (epoch {result['selected_epoch']}, "
        f"{how}); written to {args.workdir / 'results.json'}")
  return 0


# -----------------------------------------------------------------------------------------
# Model, optimizer and the jitted steps.
# -----------------------------------------------------------------------------------------


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


def make_train_step(model: models.LSTMClassifier, tx: optax.GradientTransformation,
                    base_key: jax.Array, dp: common.DPSettings | None = None,
                    ema_decay: float = 0.0) -> Callable:
  """One jitted update; the state (params, opt_state, step[, ema_params]) is donated.

  With ``ema_decay > 0`` the state also holds ``ema_params``, updated by ``ema_update``
  after every step.

  Without ``dp`` the gradient is that of the batch-mean loss. With ``dp`` it is the sum
  of the per-example gradients clipped to ``dp.max_norm`` (``common.dp_clipped_grad``);
  ``tx`` must then start with ``common.dp_transform(dp, seed)`` (noise, ``1/B``). The
  metrics ``grad_norm`` and ``clipped`` are then the sum of the per-example norms and the
  number of examples clipped (of the real examples: weight > 0).
  """

  def train_step(state, batch):
    key = jax.random.fold_in(base_key, state["step"])
    per_example = per_example_loss_fn(model, key)
    inputs = (batch["tokens"], batch["mask"], batch["labels"], batch["weights"])
    count = jnp.sum(batch["weights"])

    if dp is None:
      def loss_fn(params):
        losses, (_, correct) = per_example(params, *inputs)
        loss_sum = jnp.sum(losses)
        return loss_sum / jnp.maximum(count, 1.0), (loss_sum, jnp.sum(correct))

      grads, (loss_sum, correct) = jax.grad(loss_fn, has_aux=True)(state["params"])
    else:
      grads, norms, (losses, correct) = common.dp_clipped_grad(per_example, dp)(
          state["params"], *inputs)
      loss_sum, correct = jnp.sum(losses), jnp.sum(correct)
      stats = common.dp_example_stats(norms, batch["weights"], dp.max_norm)
    if dp is None:
      updates, opt_state, grad_norm = common.update_with_norm(
          tx, grads, state["opt_state"], state["params"])
      clipped = common.clipped_this_step(state["opt_state"], opt_state).astype(jnp.float32)
    else:
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      grad_norm, clipped = stats["norm_sum"], stats["num_clipped"]
    new_state = {"params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "step": state["step"] + 1}
    if ema_decay > 0:
      new_state["ema_params"] = ema_update(state["ema_params"], new_state["params"],
                                           state["step"], ema_decay)
    metrics = {"loss_sum": loss_sum, "correct": correct, "count": count,
               "grad_norm": grad_norm, "clipped": clipped}
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
  batches, pending = input_pipeline.eval_batches(split.lengths, cfg.eval_batch_size), []
  for idx in batches:
    batch = input_pipeline.make_batch(split, idx, pad_multiple=cfg.pad_multiple,
                                      batch_size=cfg.eval_batch_size)
    pending.append(eval_step(params, common.shard_batch(batch, mesh)))
  probs = None
  for idx, (sums, p) in zip(batches, jax.device_get(pending)):
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


def _new_accumulators() -> dict[str, float]:
  return {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "grad_norm_sum": 0.0,
          "clipped": 0.0, "steps": 0.0, "seconds": 0.0}


def train_and_evaluate(cfg: configs.ClassifyConfig, *, dataset: str, data_dir, workdir,
                       clip: str = "global_norm", clip_value: float | None = None,
                       seed: int = 0, max_steps: int | None = None, resume: bool = False,
                       cache_dir=None, checkpoint_every: int = 500,
                       num_devices: int | None = None, progress: bool = True,
                       clip_transform: optax.GradientTransformation | None = None,
                       dp: common.DPFlags | None = None,
                       ) -> dict[str, Any]:
  """Trains, evaluating each epoch, and tests the parameters with the best ``eval_acc``.

  Returns a dict with ``test_acc``, ``selected_epoch``, ``records`` (the metrics.jsonl
  lines), ``grad_norm_trace`` and ``clipped_trace`` (per step, this process only) and
  ``examples_per_s``. ``clip_transform`` overrides ``clip``/``clip_value`` (benchmarks).
  ``dp`` (from ``common.dp_flags_from_args``) trains with DP-SGD instead of ``clip``: the
  noise multiplier is derived over ``max_epochs`` full epochs (``max_steps`` does not
  change it), and every record adds the epsilon spent so far. ``cfg.ensemble > 1``
  trains that many models and tests their mean probabilities (see ``_train_ensemble``).
  """
  workdir = pathlib.Path(workdir)
  if cfg.ensemble != 1:
    return _train_ensemble(
        cfg, dataset=dataset, data_dir=data_dir, workdir=workdir, clip=clip,
        clip_value=clip_value, seed=seed, max_steps=max_steps, resume=resume,
        cache_dir=cache_dir, checkpoint_every=checkpoint_every, num_devices=num_devices,
        progress=progress, clip_transform=clip_transform, dp=dp)
  workdir.mkdir(parents=True, exist_ok=True)
  t_load = time.perf_counter()
  data = input_pipeline.load_dataset(
      dataset, data_dir, vocab_size=cfg.vocab_size, min_count=cfg.min_count,
      max_len=cfg.max_len, truncate=cfg.truncate, valid_fraction=cfg.valid_fraction,
      split_seed=cfg.split_seed, mr_fold=cfg.mr_fold, max_examples=cfg.max_examples,
      cache_dir=cache_dir if cache_dir is not None else workdir / "data_cache")
  load_seconds = time.perf_counter() - t_load
  if len(data.train) < cfg.batch_size:
    raise ValueError(f"{len(data.train)} training examples < batch size {cfg.batch_size}")
  print(f"{dataset}: train {len(data.train)}, valid {len(data.valid)}, test "
        f"{len(data.test)}, vocab {len(data.vocab)}; loaded in {load_seconds:.1f}s")

  steps_per_epoch = len(data.train) // cfg.batch_size
  total_steps = steps_per_epoch * cfg.max_epochs
  if max_steps is not None:
    total_steps = min(total_steps, max_steps)

  mesh = common.make_mesh(common.num_data_devices(cfg.batch_size, num_devices))
  if mesh is not None and cfg.eval_batch_size % mesh.size:
    raise ValueError(f"eval_batch_size {cfg.eval_batch_size} is not divisible by the "
                     f"{mesh.size} data-parallel devices")
  model = make_model(cfg, len(data.vocab), data.num_classes)
  dp_settings = None
  if dp is not None:
    if clip_transform is not None:
      raise ValueError("dp and clip_transform exclude each other")
    dp_settings = dp.resolve(batch_size=cfg.batch_size, dataset_size=len(data.train),
                             planned_steps=steps_per_epoch * cfg.max_epochs,
                             default_max_norm=cfg.max_grad_norm)
    print(dp_settings.describe())
    clip, clip_value = "dp", None
    clip_transform = common.dp_transform(dp_settings, seed)
  if clip_transform is None:
    clip_transform = common.build_clip(clip, clip_value, cfg.max_grad_norm)
  tx = make_optimizer(cfg, clip_transform, steps_per_epoch * cfg.max_epochs)

  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  dummy = jnp.zeros((1, cfg.pad_multiple), jnp.int32)
  params = model.init(init_key, dummy, dummy > -1)["params"]
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  if not 0.0 <= cfg.ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1); got {cfg.ema_decay}")
  if cfg.ema_decay > 0:
    state["ema_params"] = params
  # Distinct buffers for every leaf: a rule's init may reuse one array in two fields, and
  # the train step donates its state.
  state = common.replicate(jax.tree.map(jnp.copy, state), mesh)
  best_params = jax.tree.map(jnp.copy, state["params"])

  ckpt = common.Checkpointer(workdir)
  meta = {"acc": _new_accumulators(), "records": [], "best_eval_acc": -1.0,
          "best_epoch": 0, "dp": None if dp_settings is None else dp_settings.as_meta()}
  if resume:
    if ckpt.latest_step() is not None:
      _, saved = ckpt.restore_meta()
      common.check_dp_resume(saved.get("dp"), dp_settings)
    restored = ckpt.restore({"train": state, "best_params": best_params})
    if restored is None:
      print(f"--resume: no checkpoint in {ckpt.directory}; starting from scratch")
    else:
      tree, meta = restored
      state, best_params = tree["train"], tree["best_params"]
      print(f"resumed from step {int(state['step'])}")
  metrics_writer = common.MetricsWriter(workdir, meta["records"])

  train_step = make_train_step(model, tx, dropout_key, dp_settings, cfg.ema_decay)
  eval_key = "ema_params" if cfg.ema_decay > 0 else "params"  # What is evaluated/tested.
  eval_step = make_eval_step(model)
  step = int(state["step"])
  acc = meta["acc"]
  grad_trace: list[float] = []
  clip_trace: list[bool] = []
  bar = common.progress_bar(total_steps, f"classify {dataset}", initial=step,
                            disable=not progress)

  def save():
    meta["acc"] = acc
    ckpt.save(step, {"train": state, "best_params": best_params}, meta)

  def flush(pending):
    for m in jax.device_get(pending):
      acc["loss_sum"] += float(m["loss_sum"])
      acc["correct"] += float(m["correct"])
      acc["count"] += float(m["count"])
      acc["grad_norm_sum"] += float(m["grad_norm"])
      acc["clipped"] += float(m["clipped"])
      acc["steps"] += 1
      if dp_settings is None:
        grad_trace.append(float(m["grad_norm"]))
        clip_trace.append(bool(m["clipped"]))
      else:  # The mean per-example norm; some example clipped.
        grad_trace.append(float(m["grad_norm"]) / max(float(m["count"]), 1.0))
        clip_trace.append(bool(m["clipped"] > 0))
    pending.clear()
    if acc["count"]:
      bar.set_postfix(loss=f"{acc['loss_sum'] / acc['count']:.3f}",
                      acc=f"{acc['correct'] / acc['count']:.3f}")

  def epoch_record(epoch: int, eval_acc: float | None) -> dict:
    n, steps = max(acc["count"], 1.0), max(acc["steps"], 1.0)
    per = steps if dp_settings is None else n  # DP: per example, else per step.
    record = {"epoch": epoch, "step": step, "train_loss": acc["loss_sum"] / n,
              "train_acc": acc["correct"] / n, "eval_acc": eval_acc,
              "grad_norm_mean": acc["grad_norm_sum"] / per,
              "clip_fraction": acc["clipped"] / per,
              "examples_per_s": acc["count"] / max(acc["seconds"], 1e-9)}
    if dp_settings is not None:
      record.update(dp_settings.record(step))
    return record

  while step < total_steps:
    epoch, pos = divmod(step, steps_per_epoch)
    batches = input_pipeline.bucketed_batches(
        data.train.lengths, cfg.batch_size, seed=seed, epoch=epoch,
        chunk_batches=cfg.bucket_chunk_batches)
    t0, pending = time.perf_counter(), []
    for idx in batches[pos:]:
      batch = input_pipeline.make_batch(data.train, idx, pad_multiple=cfg.pad_multiple)
      state, m = train_step(state, common.shard_batch(batch, mesh))
      pending.append(m)
      step += 1
      bar.update(1)
      if len(pending) >= _METRIC_FLUSH_EVERY:
        flush(pending)
      if step >= total_steps or (checkpoint_every and step % checkpoint_every == 0):
        break
    flush(pending)
    acc["seconds"] += time.perf_counter() - t0
    if step % steps_per_epoch == 0:  # End of an epoch.
      eval_acc = evaluate(eval_step, state[eval_key], data.valid, cfg, mesh)["acc"] \
          if len(data.valid) else None
      record = epoch_record(epoch + 1, eval_acc)
      metrics_writer.write(record)
      meta["records"] = metrics_writer.records
      score = -1.0 if eval_acc is None else eval_acc
      if eval_acc is None or score > meta["best_eval_acc"]:  # No valid split: the last.
        meta["best_eval_acc"], meta["best_epoch"] = score, epoch + 1
        best_params = jax.tree.map(jnp.copy, state[eval_key])
      eps = f" epsilon {record['epsilon']:.3f}" if dp_settings is not None else ""
      bar.write(f"epoch {epoch + 1}: train_loss {record['train_loss']:.4f} train_acc "
                f"{record['train_acc']:.4f} eval_acc {eval_acc if eval_acc is None else round(eval_acc, 4)} "
                f"grad_norm {record['grad_norm_mean']:.3f} clip {record['clip_fraction']:.3f} "
                f"{record['examples_per_s']:.0f} ex/s{eps}")
      acc = _new_accumulators()
      save()
    elif step >= total_steps:  # Stopped inside an epoch: report it, keep it resumable.
      metrics_writer.write({**epoch_record(epoch + 1, None), "partial": True})
      metrics_writer.records.pop()  # Not part of the resumable record list.
      save()
    else:
      save()
  bar.close()
  ckpt.close()

  # Test the parameters with the best eval_acc (the final ones if no epoch finished).
  selected = meta["best_epoch"]
  test_params = best_params if selected else state[eval_key]
  test = evaluate(eval_step, test_params, data.test, cfg, mesh)
  records = metrics_writer.records
  eps = [r["examples_per_s"] for r in records]
  result = {"dataset": dataset, "clip": clip, "clip_value": clip_value, "seed": seed,
            "steps": step, "test_acc": test["acc"], "test_loss": test["loss"],
            "selected_epoch": selected, "best_eval_acc": meta["best_eval_acc"],
            "load_seconds": load_seconds,
            "examples_per_s": float(np.mean(eps)) if eps else None,
            "config": dataclasses.asdict(cfg)}
  if dp_settings is not None:
    result["dp"] = {**dataclasses.asdict(dp_settings), **dp_settings.record(step)}
  (workdir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
  np.savez(workdir / "predictions.npz", test_probs=test["probs"], test_labels=data.test.labels)
  return {**result, "records": records, "grad_norm_trace": grad_trace,
          "clipped_trace": clip_trace, "test_probs": test["probs"],
          "test_labels": data.test.labels}


def _train_ensemble(cfg: configs.ClassifyConfig, *, workdir: pathlib.Path, seed: int,
                    dp: common.DPFlags | None, cache_dir, **kwargs) -> dict[str, Any]:
  """Trains ``cfg.ensemble`` models and tests the mean of their class probabilities.

  Member ``k`` is an ordinary run with seed ``seed + k`` (its own initialisation, dropout
  and batch order; the same data split and vocabulary) in ``WORKDIR/member-k``, with
  its own checkpoints, so ``--resume`` picks up where the ensemble stopped. The ensemble
  predicts the class with the highest mean probability: an ensemble of independently
  trained networks (Hansen & Salamon 1990, "Neural network ensembles";
  Lakshminarayanan et al. 2017, "Simple and scalable predictive uncertainty estimation
  using deep ensembles"). ``results.json`` has the ensemble's ``test_acc`` and
  ``test_loss`` (cross-entropy of the mean probabilities) and every member's accuracy.
  """
  members = cfg.ensemble
  if not isinstance(members, int) or members < 1:
    raise ValueError(f"ensemble must be an integer >= 1; got {members!r}")
  if dp is not None:
    raise ValueError("ensemble > 1 with --dp: every member would spend the privacy "
                     "budget again; train one DP model instead")
  single = dataclasses.replace(cfg, ensemble=1)
  cache_dir = cache_dir if cache_dir is not None else workdir / "data_cache"
  runs = []
  for k in range(members):
    print(f"ensemble member {k + 1}/{members} (seed {seed + k})")
    runs.append(train_and_evaluate(single, workdir=workdir / f"member-{k}", seed=seed + k,
                                   dp=None, cache_dir=cache_dir, **kwargs))
  labels = runs[0]["test_labels"]
  probs = np.mean([r["test_probs"] for r in runs], axis=0)
  true_probs = probs[np.arange(len(labels)), labels] if len(labels) else probs[:0, 0]
  member_accs = [r["test_acc"] for r in runs]
  result = {"dataset": runs[0]["dataset"], "clip": runs[0]["clip"],
            "clip_value": runs[0]["clip_value"], "seed": seed, "ensemble": members,
            "test_acc": float(np.mean(np.argmax(probs, -1) == labels)) if len(labels) else 0.0,
            "test_loss": float(-np.mean(np.log(np.maximum(true_probs, 1e-12))))
            if len(labels) else 0.0,
            "member_test_acc": member_accs,
            "member_test_acc_mean": float(np.mean(member_accs)),
            "member_workdirs": [f"member-{k}" for k in range(members)],
            "config": dataclasses.asdict(cfg)}
  (workdir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
  np.savez(workdir / "predictions.npz", test_probs=probs, test_labels=labels)
  return {**result, "members": runs, "test_probs": probs, "test_labels": labels}
