"""Trainer speed across two revisions: ``gradclip ptb`` and ``gradclip classify``, phase by phase.

Runs both trainers with the same command line at two revisions of this repository, one
process per run, alternating base and head processes over rounds (round 1: base then
head, round 2: head then base, ...), and reports for every phase the median over rounds
of the per-round ratio head / base:

    flock /tmp/gradclip-timing.lock python benchmarks/trainer_speed.py --base 681d205 \\
        [--head REV_OR_DIR] [--rounds 3] [--trainers ptb classify] [--quick]

``--base`` / ``--head`` take a git revision of this repository (exported with ``git
archive`` into ``~/.cache/gradclip_jax/trainer_speed/<commit>``) or a directory holding a
checkout (a git worktree, used as it is, uncommitted changes included); ``--head``
defaults to the checkout this script is in. Each run is this interpreter with
``PYTHONPATH=<that tree>``; the child checks that ``gradclip_jax.__file__`` lies in it,
so the same virtual environment (JAX, Flax, Optax) serves both revisions.

The phases are measured inside the child process, the same way at both revisions,
without relying on what a revision's trainer prints or logs (older revisions log less):

* ``compile``: the union of JAX's own tracing, lowering and XLA-compilation intervals
  (``jax.monitoring`` time spans of ``/jax/core/compile/*``), wherever they happen;
* ``load``: the calls of the trainer's data loader (``input_pipeline.load_ptb`` /
  ``load_dataset``), minus compile time inside them;
* ``steps``: from the first ``train_step`` call of an epoch to the start of what follows
  the steps (an evaluation or a checkpoint; the trainers wait for the last step's outputs
  before either), minus compile time inside (a new batch shape compiles mid-epoch), per
  step: ``make_train_step``'s returned function is wrapped to note each call, and, like
  ``make_eval_step``'s, to wait for the previous step before a call with new input
  shapes, so that no step runs during a compile that is subtracted;
* ``evaluation``: the calls of the trainer's ``evaluate`` (validation and test), minus
  compile time;
* ``checkpoint``: the calls of ``Checkpointer.save``;
* ``startup``: interpreter start-up to the trainer's ``main`` (imports), measured by the
  parent from process start; ``other``: the rest of the process (model and optimizer
  initialization, metric files, exit); ``total``: the process's wall time.

Every phase is reported twice: wall time, and the process's CPU time in the same
windows (``time.process_time`` sampled by the child at every boundary it records, all
threads; the total from the parent's ``getrusage``). On a machine shared with other jobs
the CPU time varies much less than the wall time, which counts the waits for a core.

The result goes to ``results/trainer_speed-<backend>-<date>.{json,md}`` with the
per-round seconds of every phase, the load average around every run and the versions.
The default config: PTB *small* on the first 40,400 training/valid/test tokens (100
steps, validation and test evaluation), MR's ``mr`` config on 3,000 examples per split (60
steps, validation and test); a round (four processes) takes about 2 CPU-minutes, and
``--rounds 5`` took 25 minutes at load 9 on the 2-core CPU. ``--quick`` runs tiny configs
(PTB ``test``, classify ``smoke``) for a smoke test.
Hook points the trainers must keep (a revision without one is refused with the name):
``<trainer>.train.make_train_step``, ``make_eval_step`` and ``evaluate`` looked up through
the module at call time, ``<trainer>.input_pipeline.load_ptb`` / ``load_dataset``, and
``Checkpointer.save`` in ``training.checkpoints`` (or ``training.common`` in old revisions).
"""
from __future__ import annotations

import argparse
import bisect
import datetime
import json
import os
import pathlib
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import resource
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) \
    / "gradclip_jax" / "trainer_speed"
PHASES = ("startup", "load", "compile", "steps", "evaluation", "checkpoint", "other", "total")
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
TRAINERS = ("ptb", "classify")
LOADERS = {"ptb": "load_ptb", "classify": "load_dataset"}
CHECKPOINTER_MODULES = ("gradclip_jax.training.checkpoints", "gradclip_jax.training.common")

# Trainer arguments after the data and work folders (same at both revisions).
_COMMON = ["--max-epochs", "1", "--checkpoint-every", "0", "--no-progress", "--seed", "0"]
CONFIGS = {
    "default": {
        "ptb": ["--config", "small", "--max-tokens", "40400", *_COMMON],
        "classify": ["--dataset", "mr", "--max-examples", "3000", *_COMMON],
    },
    "quick": {
        "ptb": ["--config", "test", "--max-tokens", "2000", *_COMMON],
        "classify": ["--dataset", "mr", "--config", "smoke", *_COMMON],
    },
}
DATA_SUBDIR = {"ptb": "ptb", "classify": "rt-polarity"}


# --------------------------------------------------------------------------------------
# Intervals (pure functions; the phases are computed from the child's raw record).

def union(intervals: Iterable[Sequence[float]]) -> list[tuple[float, float]]:
  """Disjoint, sorted union of ``[start, end]`` intervals."""
  out: list[tuple[float, float]] = []
  for a, b in sorted((float(a), float(b)) for a, b in intervals if b > a):
    if out and a <= out[-1][1]:
      out[-1] = (out[-1][0], max(out[-1][1], b))
    else:
      out.append((a, b))
  return out


def length(intervals: Iterable[Sequence[float]], clock: Callable[[float], float] = float
           ) -> float:
  """Total length of the union of ``intervals``, measured by ``clock`` (wall time by
  default; :func:`cpu_clock` gives the CPU time spent in them)."""
  return sum(clock(b) - clock(a) for a, b in union(intervals))


def overlap(intervals: Iterable[Sequence[float]], disjoint: Sequence[Sequence[float]],
            clock: Callable[[float], float] = float) -> float:
  """Length (by ``clock``) of ``union(intervals)`` inside the disjoint intervals ``disjoint``."""
  total = 0.0
  for a, b in union(intervals):
    for c, d in disjoint:
      lo, hi = max(a, c), min(b, d)
      if hi > lo:
        total += clock(hi) - clock(lo)
  return total


def cpu_clock(samples: Sequence[Sequence[float]]) -> Callable[[float], float]:
  """Wall time -> the process's CPU seconds so far, interpolated linearly between the
  ``(wall, cpu)`` samples (the child takes one at every boundary it records)."""
  pts = sorted((float(w), float(c)) for w, c in samples)
  walls = [w for w, _ in pts]

  def clock(t: float) -> float:
    i = bisect.bisect_left(walls, t)
    if i < len(pts) and walls[i] == t:
      return pts[i][1]
    if i == 0:
      return pts[0][1]
    if i == len(pts):
      return pts[-1][1]
    (w0, c0), (w1, c1) = pts[i - 1], pts[i]
    return c0 + (c1 - c0) * (t - w0) / (w1 - w0)
  return clock


def step_segments(step_calls: Sequence[float], events: Sequence[dict],
                  end: float) -> list[tuple[float, float]]:
  """Windows of consecutive train steps: from a step call that follows no other step call
  since the last hooked event, to the start of the next hooked event (``end`` if none)."""
  starts = sorted(e["start"] for e in events)
  segments, i = [], 0
  calls = sorted(step_calls)
  while i < len(calls):
    first = calls[i]
    stop = next((s for s in starts if s > first), end)
    while i < len(calls) and calls[i] < stop:
      i += 1
    segments.append((first, stop))
  return segments


def phases(record: dict, cpu: bool = False) -> dict[str, float]:
  """Seconds per phase of one child run (see the module docstring), wall time or (``cpu``)
  the process's CPU time; they sum to ``total``."""
  t0, t_main, t_end = record["process_start"], record["main_start"], record["main_end"]
  t_exit = record["process_end"]
  clock: Callable[[float], float] = float
  if cpu:
    clock = cpu_clock([(t0, 0.0), *record["cpu_samples"], (t_exit, record["cpu_total"])])
  compiles = [iv for iv in union(record["compiles"]) if iv[1] > t0]
  by_kind: dict[str, list] = {"load": [], "evaluation": [], "checkpoint": []}
  for e in record["events"]:
    by_kind[e["kind"]].append((e["start"], e["end"]))
  segments = step_segments(record["step_calls"], record["events"], t_end)
  out = {"startup": length([(t0, t_main)], clock) - overlap([(t0, t_main)], compiles, clock)}
  for kind, ivs in by_kind.items():
    out[kind] = length(ivs, clock) - overlap(ivs, compiles, clock)
  out["steps"] = length(segments, clock) - overlap(segments, compiles, clock)
  out["compile"] = overlap([(t0, t_exit)], compiles, clock)
  out["total"] = clock(t_exit) - clock(t0)
  out["other"] = out["total"] - sum(v for k, v in out.items() if k != "total")
  return {k: out[k] for k in PHASES}


def ratios(base_runs: Sequence[dict], head_runs: Sequence[dict], key: str = "phases"
           ) -> dict[str, dict]:
  """Per phase: the per-round ratios head / base (steps: per step), their median, min, max.

  ``*_runs[r]`` are round ``r``'s ``{key: {phase: seconds}, "steps": n}``."""
  out = {}
  for phase in PHASES:
    per_round = []
    for b, h in zip(base_runs, head_runs):
      bv, hv = b[key][phase], h[key][phase]
      if phase == "steps":
        bv, hv = bv / max(b["steps"], 1), hv / max(h["steps"], 1)
      per_round.append(hv / bv if bv > 0 else float("nan"))
    finite = [x for x in per_round if x == x]
    out[phase] = {"per_round": per_round,
                  "median": statistics.median(finite) if finite else None,
                  "min": min(finite) if finite else None, "max": max(finite) if finite else None}
  return out


# --------------------------------------------------------------------------------------
# The child: one trainer run at one revision, with the hooks.

def _hook_points(trainer: str, tree: str):
  """The modules and class the child hooks, after checking that ``gradclip_jax`` comes
  from ``tree``; ``SystemExit`` naming what is missing."""
  import importlib  # pylint: disable=import-outside-toplevel
  import gradclip_jax  # pylint: disable=import-outside-toplevel
  tree_path = pathlib.Path(tree).resolve()
  where = pathlib.Path(gradclip_jax.__file__).resolve()
  if tree_path not in where.parents:
    raise SystemExit(f"trainer_speed: gradclip_jax was imported from {where}, not from "
                     f"{tree_path} (is another copy first on sys.path?)")
  train = importlib.import_module(f"gradclip_jax.training.{trainer}.train")
  pipeline = importlib.import_module(f"gradclip_jax.training.{trainer}.input_pipeline")
  checkpointer = None
  for name in CHECKPOINTER_MODULES:
    try:
      checkpointer = getattr(importlib.import_module(name), "Checkpointer", None)
    except ImportError:
      continue
    if checkpointer is not None:
      break
  missing = [n for n, ok in [(f"{trainer}.train.make_train_step",
                              hasattr(train, "make_train_step")),
                             (f"{trainer}.train.make_eval_step",
                              hasattr(train, "make_eval_step")),
                             (f"{trainer}.train.evaluate", hasattr(train, "evaluate")),
                             (f"{trainer}.input_pipeline.{LOADERS[trainer]}",
                              hasattr(pipeline, LOADERS[trainer])),
                             ("Checkpointer.save", checkpointer is not None)] if not ok]
  if missing:
    raise SystemExit(f"trainer_speed: the revision in {tree_path} lacks the hook points "
                     f"{', '.join(missing)}")
  return train, pipeline, checkpointer, where


def _check_tree(tree: str) -> int:
  """``--check-tree``: imports both trainers from ``tree`` and checks their hook points."""
  from gradclip_jax.training import cli  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  for trainer in TRAINERS:
    _hook_points(trainer, tree)
  return 0


def _child(spec_path: str) -> int:
  """Runs one trainer in this process and writes the raw timing record to spec['out']."""
  spec = json.loads(pathlib.Path(spec_path).read_text())
  record: dict[str, Any] = {"process_start": spec["process_start"], "events": [],
                            "compiles": [], "step_calls": [], "cpu_samples": [],
                            "xla_compiles": 0}
  sample = lambda t: record["cpu_samples"].append((t, time.process_time()))
  import jax  # pylint: disable=import-outside-toplevel
  import jax.monitoring  # pylint: disable=import-outside-toplevel

  def on_start(event, start, **_):  # JAX records a compile span's start as a scalar
    if event in COMPILE_EVENTS:
      sample(start)

  def on_span(event, start, end, **_):
    if event in COMPILE_EVENTS:
      record["compiles"].append((start, end))
      sample(end)
    if event == COMPILE_EVENTS[-1]:
      record["xla_compiles"] += 1

  jax.monitoring.register_scalar_listener(on_start)
  jax.monitoring.register_event_time_span_listener(on_span)
  trainer, tree = spec["trainer"], spec["tree"]
  train, pipeline, checkpointer, where = _hook_points(trainer, tree)

  def timed(kind, fn):
    def wrapper(*args, **kwargs):
      start = time.time()
      sample(start)
      try:
        return fn(*args, **kwargs)
      finally:
        end = time.time()
        sample(end)
        record["events"].append({"kind": kind, "start": start, "end": end})
    return wrapper

  class _Step:
    """A jitted step (train or eval): notes the time of each train step call, and before a
    call with inputs it has not seen (a new shape, dtype or placement: XLA compiles)
    waits for the previous call's outputs, so that no step runs while the compile is
    timed (it would be subtracted with the compile)."""

    def __init__(self, fn, train_step: bool):
      self._fn, self._train_step, self._seen, self._last = fn, train_step, set(), None

    def __call__(self, *args, **kwargs):
      signature = tuple((type(x).__name__, getattr(x, "shape", None),
                         str(getattr(x, "dtype", None)), getattr(x, "committed", None))
                        for x in jax.tree.leaves((args, kwargs)))
      if signature not in self._seen:
        self._seen.add(signature)
        jax.block_until_ready(self._last)
      if self._train_step:
        now = time.time()
        sample(now)
        record["step_calls"].append(now)
      self._last = self._fn(*args, **kwargs)
      return self._last

    def __getattr__(self, name):
      return getattr(self._fn, name)

  make_train_step, make_eval_step = train.make_train_step, train.make_eval_step
  train.make_train_step = lambda *a, **k: _Step(make_train_step(*a, **k), True)
  train.make_eval_step = lambda *a, **k: _Step(make_eval_step(*a, **k), False)
  train.evaluate = timed("evaluation", train.evaluate)
  setattr(pipeline, LOADERS[trainer], timed("load", getattr(pipeline, LOADERS[trainer])))
  checkpointer.save = timed("checkpoint", checkpointer.save)

  from gradclip_jax.training import cli  # pylint: disable=import-outside-toplevel
  record["main_start"] = time.time()
  sample(record["main_start"])
  rc = cli.main(spec["argv"])
  record["main_end"] = time.time()
  sample(record["main_end"])
  import importlib  # pylint: disable=import-outside-toplevel
  versions = {"python": platform.python_version(), "jax": jax.__version__}
  for mod in ("jaxlib", "flax", "optax", "numpy", "orbax.checkpoint"):
    try:
      versions[mod] = importlib.import_module(mod).__version__
    except (ImportError, AttributeError):
      versions[mod] = None
  record.update(rc=rc, gradclip_jax_file=str(where), backend=jax.default_backend(),
                devices=[str(d) for d in jax.devices()], versions=versions)
  pathlib.Path(spec["out"]).write_text(json.dumps(record))
  return int(rc or 0)


# --------------------------------------------------------------------------------------
# The parent.

def _git(*args: str, cwd=REPO) -> str:
  return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                        check=True).stdout.strip()


def resolve_side(spec: str | None) -> dict:
  """A revision or a directory -> {"tree": path, "label": ..., "commit": ..., "dirty": ...}."""
  if spec is None or pathlib.Path(spec).is_dir():
    tree = REPO if spec is None else pathlib.Path(spec).resolve()
    if not (tree / "gradclip_jax" / "__init__.py").exists():
      raise SystemExit(f"{tree} holds no gradclip_jax checkout")
    try:
      commit = _git("rev-parse", "HEAD", cwd=tree)
      dirty = bool(_git("status", "--porcelain", "--untracked-files=no", cwd=tree))
    except (OSError, subprocess.CalledProcessError):
      commit, dirty = None, None
    label = f"{tree} ({(commit or '?')[:9]}{' + uncommitted changes' if dirty else ''})"
    return {"tree": str(tree), "label": label, "commit": commit, "dirty": dirty,
            "subject": _git("log", "-1", "--format=%s", commit)[:100] if commit else None}
  try:
    commit = _git("rev-parse", "--verify", f"{spec}^{{commit}}")
  except subprocess.CalledProcessError:
    raise SystemExit(f"--base/--head {spec!r}: not a directory nor a revision of {REPO}") \
        from None
  tree = CACHE / commit
  if not (tree / ".complete").exists():
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    (tree / ".complete").write_text(commit + "\n")
  return {"tree": str(tree), "label": f"{spec} ({commit[:9]})", "commit": commit,
          "dirty": False, "subject": _git("log", "-1", "--format=%s", commit)[:100]}


def _child_env(tree: str, compile_cache: bool = False) -> dict:
  """This environment with ``PYTHONPATH=tree``; without ``compile_cache``, JAX's
  persistent compilation cache is off, so that every run compiles (a phase we time)."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = tree
  if not compile_cache:
    env = {k: v for k, v in env.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  return env


def warm_up(side: dict) -> None:
  """Imports the trainers once (untimed): writes the tree's .pyc files, warms the page
  cache, checks that this tree's gradclip_jax is the one imported and that every
  trainer has the hook points."""
  proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()),
                         "--check-tree", side["tree"]], cwd=tempfile.gettempdir(),
                        env=_child_env(side["tree"]), capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"trainer_speed: importing the trainers from {side['label']} failed:\n"
                     f"{proc.stdout}{proc.stderr}")


def run_once(side: dict, trainer: str, argv: list[str], data_dir: pathlib.Path,
             scratch: pathlib.Path, tag: str, compile_cache: bool = False) -> dict:
  """One timed child run; returns its phases, step count, load average and versions."""
  workdir = scratch / f"{tag}-work"
  shutil.rmtree(workdir, ignore_errors=True)
  full = [trainer, "--data-dir", str(data_dir / DATA_SUBDIR[trainer]), "--workdir",
          str(workdir), *argv]
  spec = scratch / f"{tag}-spec.json"
  out = scratch / f"{tag}-record.json"
  log = scratch / f"{tag}.log"
  load_before = os.getloadavg()
  start = time.time()
  spec.write_text(json.dumps({"tree": side["tree"], "trainer": trainer, "argv": full,
                              "out": str(out), "process_start": start}))
  cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
  with open(log, "w") as f:
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--child",
                           str(spec)], cwd=scratch,
                          env=_child_env(side["tree"], compile_cache), stdout=f,
                          stderr=subprocess.STDOUT)
  end = time.time()
  cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode != 0 or not out.exists():
    tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
    raise SystemExit(f"trainer_speed: {trainer} at {side['label']} failed (exit status "
                     f"{proc.returncode}); command: gradclip {shlex.join(full)}\n{tail}")
  record = json.loads(out.read_text())
  record["process_end"] = end
  record["cpu_total"] = (cpu_after.ru_utime + cpu_after.ru_stime
                         - cpu_before.ru_utime - cpu_before.ru_stime)
  shutil.rmtree(workdir, ignore_errors=True)
  return {"phases": phases(record), "cpu": phases(record, cpu=True),
          "steps": len(record["step_calls"]), "xla_compiles": record["xla_compiles"],
          "evaluations": sum(e["kind"] == "evaluation" for e in record["events"]),
          "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
          "backend": record["backend"], "versions": record["versions"],
          "gradclip_jax_file": record["gradclip_jax_file"]}


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def _progress(total: int):
  try:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
  except ImportError:
    return None


def markdown(result: dict) -> str:
  """The result as a Markdown report."""
  s = result["sides"]
  lines = [f"# Trainer speed: head / base, {result['date']}", "",
           f"- base: {s['base']['label']}" + (f" \"{s['base']['subject']}\""
                                              if s['base']['subject'] else ""),
           f"- head: {s['head']['label']}" + (f" \"{s['head']['subject']}\""
                                              if s['head']['subject'] else ""),
           f"- command: `{result['command']}`",
           f"- machine: {result['machine']}; backend {result['backend']}",
           f"- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
           f"- {result['rounds']} rounds of base and head processes (base first in odd "
           f"rounds, head first in even ones); load average "
           f"(1 min) {result['loadavg_1min']['min']:.2f} to "
           f"{result['loadavg_1min']['max']:.2f} (median "
           f"{result['loadavg_1min']['median']:.2f})"]
  if result["compile_cache"]:
    lines.append("- **--compile-cache**: JAX's persistent cache served the compiles, so "
                 "'compile' timed cache reads (a smoke test, not a measurement)")
  lines.append("")
  for trainer, t in result["trainers"].items():
    lines += [f"## {trainer}: `gradclip {shlex.join(t['argv'])}`", "",
              f"{t['steps']['base']} steps at base, {t['steps']['head']} at head; "
              f"{t['evaluations']['base']} / {t['evaluations']['head']} evaluations; "
              f"{statistics.median(t['xla_compiles']['base']):g} / "
              f"{statistics.median(t['xla_compiles']['head']):g} XLA compiles (median).", "",
              "Wall time, then the process's CPU time (all threads; less sensitive to "
              "other jobs on a shared machine). Seconds are medians over rounds; a ratio "
              "is head / base, the median of the per-round ratios, with their range.", "",
              "| phase | base s | head s | wall ratio | range | base CPU s | head CPU s "
              "| CPU ratio | range |", "|---|---:|---:|---:|---|---:|---:|---:|---|"]
    per = {"base": max(t["steps"]["base"], 1), "head": max(t["steps"]["head"], 1)}
    for phase in PHASES:
      cells = []
      for secs, rat in (("median_seconds", "ratios"), ("median_cpu_seconds", "cpu_ratios")):
        b, h = t[secs]["base"][phase], t[secs]["head"][phase]
        if phase == "steps":
          b, h = b / per["base"], h / per["head"]
        r = t[rat][phase]
        cells += [f"{b:.3f}", f"{h:.3f}",
                  "-" if r["median"] is None else f"{r['median']:.3f}",
                  "-" if r["median"] is None else f"{r['min']:.2f} to {r['max']:.2f}"]
      name = "steps (per step)" if phase == "steps" else phase
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--child", help=argparse.SUPPRESS)
  p.add_argument("--check-tree", help=argparse.SUPPRESS)
  p.add_argument("--base", help="base revision or checkout directory (e.g. 681d205)")
  p.add_argument("--head", default=None,
                 help="head revision or checkout directory (default: this checkout)")
  p.add_argument("--rounds", type=int, default=3, help="base/head pairs per trainer (default 3)")
  p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
  p.add_argument("--quick", action="store_true", help="tiny configs (a smoke test)")
  p.add_argument("--compile-cache", action="store_true",
                 help="keep the environment's JAX persistent compilation cache (then "
                      "'compile' times cache reads; for smoke tests, not measurements)")
  p.add_argument("--ptb-args", default=None,
                 help="replace the PTB arguments (after --data-dir/--workdir), one string")
  p.add_argument("--classify-args", default=None, help="the same for classify")
  p.add_argument("--data-dir", type=pathlib.Path,
                 default=pathlib.Path(os.environ.get("GRADCLIP_DATA_DIR",
                                                     REPO.parent / "shared" / "data")),
                 help="folder with ptb/ and rt-polarity/ (default $GRADCLIP_DATA_DIR or "
                      "../shared/data)")
  p.add_argument("--out", type=pathlib.Path, default=REPO / "results",
                 help="where trainer_speed-<backend>-<date>.{json,md} go (default results/)")
  a = p.parse_args(argv)
  if a.child:
    return _child(a.child)
  if a.check_tree:
    return _check_tree(a.check_tree)
  if not a.base:
    p.error("--base is required")
  if a.rounds < 1:
    p.error("--rounds must be at least 1")
  config = dict(CONFIGS["quick" if a.quick else "default"])
  for trainer, given in (("ptb", a.ptb_args), ("classify", a.classify_args)):
    if given is not None:
      config[trainer] = shlex.split(given)
  sides = {"base": resolve_side(a.base), "head": resolve_side(a.head)}
  warmed = set()
  for side in sides.values():
    if side["tree"] not in warmed:
      warm_up(side)
      warmed.add(side["tree"])
  print(f"[trainer_speed] base: {sides['base']['label']}\n[trainer_speed] head: "
        f"{sides['head']['label']}", file=sys.stderr, flush=True)

  runs = {t: {"base": [], "head": []} for t in a.trainers}
  bar = _progress(a.rounds * len(a.trainers) * 2)
  with tempfile.TemporaryDirectory(prefix="trainer_speed-") as scratch:
    for r in range(a.rounds):
      for trainer in a.trainers:
        for name in ("base", "head") if r % 2 == 0 else ("head", "base"):
          label = f"round {r + 1}/{a.rounds} {trainer} {name}"
          if bar is not None:
            bar.set_description(label)
          else:
            print(f"[trainer_speed] {label}", file=sys.stderr, flush=True)
          run = run_once(sides[name], trainer, config[trainer], a.data_dir,
                         pathlib.Path(scratch), f"r{r}-{trainer}-{name}", a.compile_cache)
          runs[trainer][name].append(run)
          if bar is not None:
            bar.update(1)
            if len(runs[trainer]["base"]) == len(runs[trainer]["head"]):
              ph = lambda s, k: runs[trainer][s][-1]["phases"][k]
              bar.set_postfix_str(f"{trainer} head/base: total "
                                  f"{ph('head', 'total') / ph('base', 'total'):.2f}, steps "
                                  f"{ph('head', 'steps') / max(ph('base', 'steps'), 1e-9):.2f}")
  if bar is not None:
    bar.close()

  first = runs[a.trainers[0]]["head"][0]
  loads = [x for t in runs.values() for s in t.values() for run in s
           for x in (run["loadavg_before"][0], run["loadavg_after"][0])]
  versions = first["versions"]
  if any(run["versions"] != versions for t in runs.values() for s in t.values() for run in s):
    raise SystemExit("trainer_speed: the children ran with different library versions")
  result = {
      "benchmark": "trainer_speed",
      "date": datetime.date.today().isoformat(),
      "command": "python benchmarks/trainer_speed.py " + shlex.join(
          list(sys.argv[1:] if argv is None else argv)),
      "machine": _machine(), "backend": first["backend"], "versions": versions,
      "rounds": a.rounds, "compile_cache": a.compile_cache,
      "sides": sides,
      "gradclip_jax_files": {n: runs[a.trainers[0]][n][0]["gradclip_jax_file"]
                             for n in ("base", "head")},
      "loadavg_1min": {"min": min(loads), "max": max(loads),
                       "median": statistics.median(loads)},
      "trainers": {},
  }
  for trainer, t in runs.items():
    result["trainers"][trainer] = {
        "argv": [trainer, "--data-dir", str(a.data_dir / DATA_SUBDIR[trainer]),
                 "--workdir", "WORKDIR", *config[trainer]],
        "steps": {n: t[n][0]["steps"] for n in ("base", "head")},
        "evaluations": {n: t[n][0]["evaluations"] for n in ("base", "head")},
        "ratios": ratios(t["base"], t["head"]),
        "cpu_ratios": ratios(t["base"], t["head"], key="cpu"),
        "median_seconds": {n: {ph: statistics.median(run["phases"][ph] for run in t[n])
                               for ph in PHASES} for n in ("base", "head")},
        "median_cpu_seconds": {n: {ph: statistics.median(run["cpu"][ph] for run in t[n])
                                   for ph in PHASES} for n in ("base", "head")},
        "xla_compiles": {n: [run["xla_compiles"] for run in t[n]] for n in ("base", "head")},
        "runs": {n: [{k: run[k] for k in ("phases", "cpu", "steps", "evaluations",
                                          "loadavg_before", "loadavg_after")}
                     for run in t[n]] for n in ("base", "head")},
    }
  a.out.mkdir(parents=True, exist_ok=True)
  stem = a.out / f"trainer_speed-{first['backend']}-{result['date']}"
  stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
  report = markdown(result)
  stem.with_suffix(".md").write_text(report + "\n")
  print(report)
  print(f"[trainer_speed] written to {stem}.json and .md", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
