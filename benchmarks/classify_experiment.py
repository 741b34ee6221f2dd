"""Clipping experiment: the same LSTM classifier, four clipping rules, a high learning rate.

Trains the ``gradclip classify`` model (same config, data order and initialization) with

  * no clipping,
  * ``clip_by_value``           (element-wise, ``--value``),
  * ``clip_by_global_norm``     (``--global-norm``; Pascanu, Mikolov & Bengio 2013),
  * one adaptive rule           (``--adaptive``: zclip by default),

at a deliberately high learning rate, and writes ``classify_experiment.json`` (final test
accuracy, eval accuracy, clip fraction and the per-step global gradient norm of every run)
and, when matplotlib is installed, ``classify_experiment.png`` (the gradient-norm traces).

    python benchmarks/classify_experiment.py --data-dir ../shared/data/rt-polarity \
        --out runs/classify_experiment --max-steps 600

The notebooks import :func:`run_experiment` and :func:`plot`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

from gradclip_jax.training import checkpoints, flags
from gradclip_jax.training.classify import configs
from gradclip_jax.training.classify import train as classify_train
from gradclip_jax.training.options import RunOptions

ADAPTIVE = ("zclip", "autoclip", "adagc", "agc")


def run_experiment(data_dir, out, *, dataset: str = "mr", max_steps: int = 600,
                   optimizer: str = "sgd", learning_rate: float = 2.0,
                   global_norm: float = 1.0, value: float = 0.05, adaptive: str = "zclip",
                   seed: int = 0, config: str | None = None,
                   overrides: tuple[str, ...] = ()) -> dict:
  """Runs the four rules and returns (and writes) the JSON-able results."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  name = config or dataset
  cfg = flags.override(configs.get_config(name), overrides)
  cfg = dataclasses.replace(cfg, optimizer=optimizer, learning_rate=learning_rate,
                            lr_schedule="constant", warmup_steps=0,
                            max_epochs=10**6)  # --max-steps decides the length.
  rules = [("none", None), ("value", value), ("global_norm", global_norm), (adaptive, None)]
  results = {"dataset": dataset, "optimizer": optimizer, "learning_rate": learning_rate,
             "max_steps": max_steps, "seed": seed, "config": dataclasses.asdict(cfg),
             "runs": {}}
  for rule, threshold in rules:
    label = rule if threshold is None else f"{rule}({threshold:g})"
    print(f"[classify_experiment] {label}: training {max_steps} steps", flush=True)
    t0 = time.perf_counter()
    run = RunOptions(data_dir=data_dir, clip=rule, clip_value=threshold, seed=seed,
                     max_steps=max_steps, checkpoint_every=0, num_devices=1,
                     progress=sys.stderr.isatty())
    checkpoints.prepare_workdir(out / rule, resume=False, overwrite=True)  # a fresh run
    r = classify_train.train_and_evaluate(
        configs.TrainConfig(run=run, dataset=dataset, hparams=cfg, name=name,
                            cache_dir=out / "data_cache"), out / rule)
    trace = np.asarray(r["grad_norm_trace"], dtype=np.float64)
    results["runs"][rule] = {
        "label": label, "threshold": threshold, "test_acc": r["test_acc"],
        "best_eval_acc": r["best_eval_acc"],
        "final_train_loss": r["records"][-1]["train_loss"] if r["records"] else None,
        "clip_fraction": float(np.mean(r["clipped_trace"])) if r["clipped_trace"] else 0.0,
        "nonfinite_steps": int(np.sum(~np.isfinite(trace))),
        "seconds": time.perf_counter() - t0,
        "grad_norm_trace": [float(x) if np.isfinite(x) else None for x in trace],
    }
    run = results["runs"][rule]
    print(f"[classify_experiment] {label}: test_acc {run['test_acc']:.4f}, clip_fraction "
          f"{run['clip_fraction']:.3f}, {run['nonfinite_steps']} non-finite steps",
          flush=True)
  (out / "classify_experiment.json").write_text(json.dumps(results, indent=1) + "\n")
  return results


def plot(results: dict, path) -> bool:
  """Gradient-norm traces (log scale) with final test accuracy; False without matplotlib."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("[classify_experiment] matplotlib not installed: no plot", file=sys.stderr)
    return False
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for run in results["runs"].values():
    trace = np.array([np.nan if x is None else x for x in run["grad_norm_trace"]])
    ax.plot(trace, lw=0.8, label=f"{run['label']}: test acc {100 * run['test_acc']:.1f}%")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("global gradient norm (before clipping)")
  ax.set_title(f"{results['dataset']}: biLSTM, {results['optimizer']} "
               f"lr={results['learning_rate']:g}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data-dir", required=True, type=pathlib.Path)
  p.add_argument("--out", required=True, type=pathlib.Path)
  p.add_argument("--max-steps", type=int, default=600)
  p.add_argument("--dataset", choices=("mr", "imdb"), default="mr")
  p.add_argument("--config", choices=configs.NAMES, default=None)
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
  p.add_argument("--learning-rate", type=float, default=2.0)
  p.add_argument("--global-norm", type=float, default=1.0, help="clip_by_global_norm max_norm")
  p.add_argument("--value", type=float, default=0.05, help="clip_by_value bound")
  p.add_argument("--adaptive", choices=ADAPTIVE, default="zclip")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  results = run_experiment(a.data_dir, a.out, dataset=a.dataset, max_steps=a.max_steps,
                           optimizer=a.optimizer, learning_rate=a.learning_rate,
                           global_norm=a.global_norm, value=a.value, adaptive=a.adaptive,
                           seed=a.seed, config=a.config, overrides=tuple(a.set))
  plot(results, a.out / "classify_experiment.png")
  print(json.dumps({k: {"test_acc": v["test_acc"], "clip_fraction": v["clip_fraction"]}
                    for k, v in results["runs"].items()}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
