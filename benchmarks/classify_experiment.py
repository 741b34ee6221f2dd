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

``--mr-cv`` runs MR's 10-fold cross-validation instead: for each fold ``F`` the command

    gradclip classify --dataset mr --data-dir DIR --workdir OUT/fold-F --mr-fold F \
        --set valid_fraction=0 --set ensemble=5

(one process per fold; ensemble members are seeds 0-4, member 0 is the single model of
seed 0), and writes ``results/mr-10fold-cv-<device>-<date>-ensemble5.json``: per-fold test
accuracy of the ensemble and of every member, mean and standard deviation over folds, the
wall time of each fold, the load average and the versions. A fold whose ``results.json``
exists is read, not rerun, so an interrupted run continues where it stopped.

    python benchmarks/classify_experiment.py --mr-cv --data-dir ../shared/data/rt-polarity \
        --out runs/mr-cv
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import subprocess
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


def _versions() -> dict:
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import gradclip_jax  # pylint: disable=import-outside-toplevel
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True,
                            cwd=pathlib.Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = None
  return {"python": platform.python_version(), "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "gradclip_jax": getattr(gradclip_jax, "__version__", None), "commit": commit,
          "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}


def mr_cross_validation(data_dir, out, *, folds=range(10), ensemble: int = 5,
                        results_dir=None, extra=()) -> dict:
  """MR's k-fold cross-validation of ``gradclip classify`` (ensemble of ``ensemble`` seeds).

  One ``gradclip classify --mr-fold F`` process per fold in ``out/fold-F``; a fold whose
  ``results.json`` exists is read instead of rerun. Returns (and, with ``results_dir``,
  writes) per-fold test accuracies of the ensemble and its members, their mean and
  standard deviation over folds, per-fold wall times, load averages and versions.
  """
  out = pathlib.Path(out)
  folds = list(folds)
  flags_ = ["--set", "valid_fraction=0", "--set", f"ensemble={ensemble}", *extra]
  per_fold, seconds, loads = {}, {}, {}
  versions = _versions()  # at the start: the commit whose trainer runs
  t_start = time.perf_counter()
  for i, fold in enumerate(folds):
    workdir = out / f"fold-{fold}"
    result_file = workdir / "results.json"
    if not result_file.exists():
      cmd = [sys.executable, "-m", "gradclip_jax.training.cli", "classify", "--dataset", "mr",
             "--data-dir", str(data_dir), "--workdir", str(workdir), "--mr-fold", str(fold),
             "--no-progress", "--overwrite", "--cache-dir", str(out / "data_cache"), *flags_]
      print(f"[mr-cv] fold {fold} ({i + 1}/{len(folds)}), "
            f"{time.perf_counter() - t_start:.0f} s so far: {' '.join(cmd[3:])}", flush=True)
      t0 = time.perf_counter()
      subprocess.run(cmd, check=True)
      seconds[fold] = time.perf_counter() - t0
      loads[fold] = os.getloadavg()
    r = json.loads(result_file.read_text())
    per_fold[fold] = r
    members = r.get("member_test_acc", [r["test_acc"]])
    print(f"[mr-cv] fold {fold}: ensemble {100 * r['test_acc']:.2f}%, members "
          + ", ".join(f"{100 * a:.2f}" for a in members)
          + (f"; {seconds[fold]:.0f} s" if fold in seconds else " (read)"), flush=True)
  ens = np.array([per_fold[f]["test_acc"] for f in folds])
  members = np.array([per_fold[f].get("member_test_acc", [per_fold[f]["test_acc"]])
                      for f in folds])
  result = {
      "protocol": (f"{len(folds)}-fold cross-validation of MR (the seeded folds of "
                   "--mr-fold); per fold: gradclip classify --dataset mr --mr-fold F "
                   + " ".join(flags_) + f" (seeds 0-{ensemble - 1} trained on the other "
                   "folds, tested on fold F; the ensemble averages the members' class "
                   "probabilities). The single model is member 0 (seed 0)."),
      "command": ("python benchmarks/classify_experiment.py --mr-cv --data-dir DIR "
                  f"--out OUT --ensemble {ensemble}"
                  + "".join(f" --set {x}" for x in extra[1::2])),
      "date": datetime.date.today().isoformat(),
      "versions": versions,
      "final": {
          "config": "mr " + " ".join(flags_),
          "folds": folds,
          "per_fold_test_acc": ens.tolist(),
          "mean": float(ens.mean()), "std": float(ens.std()),  # over folds, ddof=0
          "per_fold_member_test_acc": members.tolist(),
          "single_model_seed0_test_acc": members[:, 0].tolist(),
          "single_model_seed0_mean": float(members[:, 0].mean()),
          "single_model_seed0_std": float(members[:, 0].std()),
          "member_mean_test_acc_by_seed": members.mean(axis=0).tolist(),
          "member_mean_test_acc": float(members.mean()),
      },
      "wall_seconds_per_fold": {str(f): s for f, s in seconds.items()},
      "wall_seconds_total": float(sum(seconds.values())),
      "loadavg_after_fold": {str(f): list(l) for f, l in loads.items()},
  }
  if results_dir is not None:
    results_dir = pathlib.Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    import jax  # pylint: disable=import-outside-toplevel
    path = results_dir / (f"mr-{len(folds)}fold-cv-{jax.default_backend()}-{result['date']}"
                          f"-ensemble{ensemble}.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[mr-cv] written to {path}", flush=True)
  return result


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
  p.add_argument("--mr-cv", action="store_true",
                 help="run MR's 10-fold cross-validation (gradclip classify --mr-fold F "
                      "--set valid_fraction=0 --set ensemble=K per fold) instead")
  p.add_argument("--folds", type=int, nargs="+", default=list(range(10)),
                 help="--mr-cv: the folds to run (default 0-9)")
  p.add_argument("--ensemble", type=int, default=5, help="--mr-cv: models per fold")
  p.add_argument("--results-dir", type=pathlib.Path, default=pathlib.Path("results"),
                 help="--mr-cv: where the result file goes (default results/)")
  a = p.parse_args(argv)
  if a.mr_cv:
    extra = tuple(x for s in a.set for x in ("--set", s))
    r = mr_cross_validation(a.data_dir, a.out, folds=a.folds, ensemble=a.ensemble,
                            results_dir=a.results_dir, extra=extra)["final"]
    print(f"ensemble: {100 * r['mean']:.2f}% (std {100 * r['std']:.2f}); single model "
          f"(seed 0): {100 * r['single_model_seed0_mean']:.2f}% "
          f"(std {100 * r['single_model_seed0_std']:.2f})")
    return 0
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
