"""The ``gradclip`` command line as a user meets it: exit codes, messages, files untouched.

Runs on the real data (``../shared/data``): tiny PTB runs (``--config test``, 10k tokens)
and MR / IMDB smoke runs; a failure that is a user mistake must happen before any work.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gradclip_jax.training import cli
from gradclip_jax.training.classify import train as classify_train
from gradclip_jax.training.metrics import MetricsWriter

from conftest import PTB_TOKENS, mr_resume_argv, ptb_argv  # pylint: disable=C0411

REPO = pathlib.Path(__file__).resolve().parents[1]


def _ptb_args(data_dir, workdir, *extra):
  return ["ptb", "--config", "test", "--data-dir", str(data_dir / "ptb"), "--workdir",
          str(workdir), "--max-tokens", str(PTB_TOKENS), "--no-progress", "--num-devices",
          "1", *extra]


def _mr_args(data_dir, workdir, cache_dir, *extra):
  return ["classify", "--dataset", "mr", "--config", "smoke", "--data-dir",
          str(data_dir / "rt-polarity"), "--cache-dir", str(cache_dir), "--workdir",
          str(workdir), "--no-progress", "--num-devices", "1", "--set", "max_examples=64",
          "--set", "num_layers=0", "--set", "pooling=mean,max",  # compiles fastest
          *extra]


def _snapshot(workdir: pathlib.Path) -> dict[str, bytes]:
  """Every file under ``workdir`` with its bytes (to show that nothing was touched)."""
  return {str(p.relative_to(workdir)): p.read_bytes()
          for p in sorted(workdir.rglob("*")) if p.is_file()}


def _without_timing(records):
  return [{k: v for k, v in r.items() if k not in ("wps", "examples_per_s")}
          for r in records]


def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="", JAX_PLATFORMS="cpu")


def _env_of_this_process():
  """``_env()`` with this process's devices (conftest's 8 virtual CPUs): the programs a
  ``--num-devices 1`` run compiles are then those of the in-process runs, which the
  session's compilation cache (conftest) already holds."""
  return dict(_env(), XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))


# ---------------------------------------------------------------------------
# Mistakes: exit 2, one line, no traceback, nothing written.
# ---------------------------------------------------------------------------


def _fails(capsys, argv, *expected, workdir=None):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  for text in expected:
    assert text in err, err
  assert "Traceback" not in err
  if workdir is not None:
    assert not workdir.exists()
  return err


def test_mistyped_flag_shows_the_subcommand_usage_and_a_suggestion(tmp_path, capsys):
  base = ["ptb", "--data-dir", str(tmp_path), "--workdir", str(tmp_path / "w")]
  err = _fails(capsys, base + ["--max-stpes", "10"], "usage: gradclip ptb",
               "unrecognized arguments: --max-stpes 10", "did you mean --max-steps?",
               workdir=tmp_path / "w")
  assert err.strip().splitlines()[-1].startswith("gradclip ptb: error: unrecognized")
  # No silent abbreviation either: --max-step is not --max-steps.
  _fails(capsys, base + ["--max-step", "10"], "usage: gradclip ptb",
         "did you mean --max-steps?", workdir=tmp_path / "w")
  _fails(capsys, ["classify", "--dataset", "mr", "--data-dir", str(tmp_path), "--workdir",
                  str(tmp_path / "w"), "--lerning-rate", "1"], "usage: gradclip classify",
         "did you mean --learning-rate?", workdir=tmp_path / "w")


@pytest.mark.parametrize("extra,message", [
    (["--clip-value", "-1"], "--clip-value: must be positive and finite, got -1"),
    (["--max-steps", "0"], "--max-steps: must be >= 1, got 0"),
    (["--checkpoint-every", "-5"], "--checkpoint-every: must be >= 0"),
    (["--clip", "bogus"], "invalid choice: 'bogus'"),
    (["--config", "huge"], "invalid choice: 'huge'"),
    (["--set", "hiden_size=3"], "no config field 'hiden_size' (did you mean hidden_size?)"),
    (["--set", "hidden_size=x"], "--set 'hidden_size=x': invalid literal for int()"),
    (["--resume", "--overwrite"], "give one of them"),
    (["--dp", "--noise-multiplier", "1", "--clip", "value"], "in place of --clip"),
    (["--process-id", "1"], "--process-id only applies with --distributed"),
])
def test_bad_flag_values_exit_2_before_any_work(extra, message, shared_data_dir, tmp_path,
                                                capsys):
  _fails(capsys, _ptb_args(shared_data_dir, tmp_path / "w", *extra), message,
         workdir=tmp_path / "w")


@pytest.mark.parametrize("command,dataset", [("ptb", "ptb"), ("imdb", "imdb"),
                                             ("mr", "mr")])
def test_missing_data_dir_says_how_to_fetch_it(command, dataset, tmp_path, capsys):
  missing = tmp_path / "nowhere"
  argv = (["ptb"] if command == "ptb" else ["classify", "--dataset", dataset]) + [
      "--data-dir", str(missing), "--workdir", str(tmp_path / "w"), "--no-progress"]
  err = _fails(capsys, argv, f"--data-dir {missing} does not exist",
               f"gradclip data fetch {dataset} {missing}")
  assert len(err.strip().splitlines()) == 1


def test_wrong_data_dir_names_the_missing_file(shared_data_dir, tmp_path, capsys):
  # The IMDB folder holds no PTB files: the message names the file and the fetch command.
  _fails(capsys, ["ptb", "--data-dir", str(shared_data_dir / "imdb"), "--workdir",
                  str(tmp_path / "w")],
         "ptb.train.txt(.gz) not found", "gradclip data fetch ptb")


def test_debug_shows_the_traceback(tmp_path, capsys):
  assert cli.main(["ptb", "--data-dir", str(tmp_path / "nowhere"), "--workdir",
                   str(tmp_path / "w"), "--debug"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and "UsageError" in err


def test_missing_train_extra_names_it_and_does_nothing(monkeypatch, tmp_path, capsys):
  monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
  for argv in (["ptb", "--data-dir", str(tmp_path), "--workdir", str(tmp_path / "w")],
               ["classify", "--help"]):
    err = _fails(capsys, argv, 'pip install "gradclip_jax[train]"', "tqdm not installed",
                 workdir=tmp_path / "w")
    assert len(err.strip().splitlines()) == 1
  assert cli.missing_train_extra() == ["tqdm"]


def test_missing_train_extra_in_a_fresh_process(tmp_path):
  """Without flax (the first thing a trainer imports) the command stops at once."""
  code = ("import sys; sys.modules['flax'] = None; "
          "from gradclip_jax.training import cli; sys.exit(cli.main(sys.argv[1:]))")
  proc = subprocess.run([sys.executable, "-c", code, "ptb", "--data-dir", str(tmp_path),
                         "--workdir", str(tmp_path / "w")], env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert 'flax not installed): pip install "gradclip_jax[train]"' in proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------
# A workdir belongs to one run.
# ---------------------------------------------------------------------------


def test_reused_workdir_needs_resume_or_overwrite(shared_data_dir, tmp_path, capsys):
  w = tmp_path / "run"
  assert cli.main(_ptb_args(shared_data_dir, w, "--max-steps", "5")) == 0
  before = _snapshot(w)
  assert any(k.startswith("checkpoints/5/") for k in before)
  capsys.readouterr()
  err = _fails(capsys, _ptb_args(shared_data_dir, w, "--max-steps", "3"),
               f"--workdir {w} holds a run (checkpoints, metrics.jsonl)", "--resume",
               "--overwrite")
  assert len(err.strip().splitlines()) == 1
  assert _snapshot(w) == before  # nothing touched
  # --overwrite: the old run's files are gone, the new run is alone.
  assert cli.main(_ptb_args(shared_data_dir, w, "--max-steps", "3", "--overwrite")) == 0
  assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["3"]
  (record,) = MetricsWriter.read(w)
  assert record["partial"] and record["steps"] == 3 and np.isfinite(record["valid_ppl"])
  # A short run says why there is no test perplexity, and records none.
  assert "no test perplexity (the run did not finish)" in capsys.readouterr().out
  assert "test_ppl" not in record
  # --resume with another config is refused, nothing touched.
  before = _snapshot(w)
  _fails(capsys, _ptb_args(shared_data_dir, w, "--resume", "--seed", "1"),
         "--resume: the run in this workdir has another config (seed: 0 in the "
         "checkpoint, 1 now)")
  _fails(capsys, _ptb_args(shared_data_dir, w, "--resume", "--set", "hidden_size=3"),
         "another config (hparams.hidden_size: 2 in the checkpoint, 3 now)")
  assert _snapshot(w) == before


def test_reused_workdir_is_refused_for_imdb_before_loading(shared_data_dir, tmp_path,
                                                           capsys):
  w = tmp_path / "imdb"
  (w / "checkpoints" / "7").mkdir(parents=True)
  (w / "metrics.jsonl").write_text('{"epoch": 1}\n')
  before = _snapshot(w)
  t = time.perf_counter()
  _fails(capsys, ["classify", "--dataset", "imdb", "--data-dir",
                  str(shared_data_dir / "imdb"), "--workdir", str(w)],
         "holds a run", "--resume", "--overwrite")
  assert time.perf_counter() - t < 10  # refused before reading 50,000 reviews
  assert _snapshot(w) == before and not (w / "data_cache").exists()


# ---------------------------------------------------------------------------
# SIGINT / SIGTERM.
# ---------------------------------------------------------------------------


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(ptb_reference, tmp_path):
  """SIGTERM after the first step: a checkpoint, exit 143, and ``--resume`` ends with the
  records of conftest's uninterrupted reference run (the same two epochs; its checkpoints
  every 100 steps leave no trace in the records)."""
  data_dir, reference = ptb_reference
  cut = tmp_path / "cut"
  argv = ptb_argv(data_dir, cut, "--max-epochs", "2", "--checkpoint-every", "0")
  proc = subprocess.Popen([sys.executable, "-m", "gradclip_jax.training.cli", *argv],
                          env=_env_of_this_process(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:  # "step 1: compiled and ran in ...": a step is done
    if line.startswith("step "):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err
  assert "Traceback" not in err
  saved = [p.name for p in (cut / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and 1 <= int(saved[0]) < 249  # inside the first epoch
  assert err.strip().splitlines()[-1] == (
      f"gradclip ptb: SIGTERM: checkpoint saved at step {saved[0]} in {cut}; continue "
      f"with: gradclip {' '.join(argv)} --resume")
  assert "Test ppl" not in out
  assert cli.main(argv + ["--resume"]) == 0
  resumed = MetricsWriter.read(cut)
  assert [set(r) for r in resumed] == [set(r) for r in reference]
  assert _without_timing(resumed) == _without_timing(reference)
  assert "test_ppl" in resumed[-1]


def test_second_signal_exits_at_once(shared_data_dir, tmp_path):
  # SIGINT then SIGTERM: two identical signals sent back to back could be merged into one.
  proc = subprocess.Popen(
      [sys.executable, "-m", "gradclip_jax.training.cli",
       *_ptb_args(shared_data_dir, tmp_path, "--max-epochs", "50")],
      env=_env_of_this_process(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  for line in proc.stdout:
    if line.startswith("step "):
      proc.send_signal(signal.SIGINT)
      proc.send_signal(signal.SIGTERM)
      break
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err
  assert "SIGTERM, a second signal: exiting at once, without a checkpoint" in err
  assert "Traceback" not in err and "checkpoint saved" not in err


def test_sigint_in_classify_then_resume_matches(shared_data_dir, tmp_path, cache_dir,
                                                mr_reference, monkeypatch, capsys):
  """Ctrl-C (SIGINT to this process) after the 6th of 8 steps: saved at 6, resumed to
  the records of conftest's uninterrupted run of the same flags (``MR_RESUME_FLAGS``)."""
  cut = tmp_path / "cut"
  make = classify_train.make_train_step

  def make_interrupting(*args, **kwargs):
    step = make(*args, **kwargs)
    calls = []

    def wrapped(state, batch):
      out = step(state, batch)
      calls.append(1)
      if len(calls) == 6:
        os.kill(os.getpid(), signal.SIGINT)
      return out

    return wrapped

  monkeypatch.setattr(classify_train, "make_train_step", make_interrupting)
  capsys.readouterr()
  assert cli.main(mr_resume_argv(shared_data_dir, cache_dir, cut)) == 130
  err = capsys.readouterr().err
  assert "SIGINT: checkpoint saved at step 6" in err and "--resume" in err
  monkeypatch.setattr(classify_train, "make_train_step", make)
  assert cli.main(mr_resume_argv(shared_data_dir, cache_dir, cut, "--resume")) == 0
  assert _without_timing(MetricsWriter.read(cut)) == _without_timing(
      MetricsWriter.read(mr_reference))
  result = lambda d: json.loads((d / "results.json").read_text())
  assert result(cut)["test_acc"] == result(mr_reference)["test_acc"]


# ---------------------------------------------------------------------------
# Honest records of a short run.
# ---------------------------------------------------------------------------


def test_short_classify_run_has_no_sentinels(shared_data_dir, tmp_path, cache_dir, capsys):
  w = tmp_path / "short"
  assert cli.main(_mr_args(shared_data_dir, w, cache_dir, "--max-steps", "2")) == 0
  out = capsys.readouterr().out
  assert ("no evaluation ran: --max-steps 2 stopped before the end of the first epoch "
          "(4 steps)") in out
  result = json.loads((w / "results.json").read_text())
  assert result["best_eval_acc"] is None and result["selected_epoch"] is None
  assert result["examples_per_s"] > 0 and 0 <= result["test_acc"] <= 1
  assert -1.0 not in result.values()
  (partial,) = MetricsWriter.read(w)
  assert partial["partial"] and partial["eval_acc"] is None and partial["step"] == 2
  # Without a validation split the last epoch is tested, and the line says so.
  w = tmp_path / "novalid"
  assert cli.main(_mr_args(shared_data_dir, w, cache_dir, "--max-epochs", "1", "--set",
                           "valid_fraction=0")) == 0
  assert "epoch 1, the last: valid_fraction=0 leaves no validation split" in \
      capsys.readouterr().out
  assert json.loads((w / "results.json").read_text())["best_eval_acc"] is None


# ---------------------------------------------------------------------------
# Sub-commands.
# ---------------------------------------------------------------------------


def test_data_subcommand_is_registered(capsys):
  assert "data" in cli.SUBCOMMANDS
  assert cli.SUBCOMMANDS["data"][0] == "gradclip_jax.training.fetch"
  assert cli.main(["--help"]) == 0
  assert "Download and verify the data sets" in capsys.readouterr().out
  assert "data" not in cli.TRAINERS  # works without the [train] extra


def test_data_fetch_needs_no_train_extra(monkeypatch, capsys):
  for module in ("flax", "tqdm", "orbax.checkpoint"):
    monkeypatch.setitem(sys.modules, module, None)
  assert cli.main(["data", "fetch", "--help"]) == 0
  assert "ptb" in capsys.readouterr().out


def test_resume_command_drops_overwrite():
  assert cli.resume_command(["ptb", "--workdir", "a b", "--overwrite"]) == \
      "gradclip ptb --workdir 'a b' --resume"
  assert cli.resume_command(["ptb", "--resume"]) == "gradclip ptb --resume"


# ---------------------------------------------------------------------------
# Multi-host.
# ---------------------------------------------------------------------------


def _two_processes(argv, tmp_path, timeout=300):
  """Runs ``gradclip ARGV --distributed`` in 2 processes of 2 CPU devices each (gloo
  all-reduce); returns their ``(stdout, stderr)``. A hang fails after ``timeout`` s
  with both processes killed (their stacks are not kept: see docs/guides/trainers.md)."""
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  logs = [(tmp_path / f"out{i}", tmp_path / f"err{i}") for i in range(2)]
  procs = []
  for i, (out, err) in enumerate(logs):  # files, not pipes: a full pipe would block a
    with open(out, "w") as o, open(err, "w") as e:  # process inside a collective
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "gradclip_jax.training.cli", *argv, "--distributed",
           "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
           "--process-id", str(i)], env=env, stdout=o, stderr=e))
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pytest.fail(f"the two processes did not finish in {timeout} s (a deadlock?)")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = [(out.read_text(), err.read_text()) for out, err in logs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err
  assert "process 1 of 2, 2 local / 4 global devices" in outs[1][1]
  return outs


def test_two_processes_train_like_one(shared_data_dir, tmp_path):
  """``gradclip ptb --distributed``: the mesh spans the 4 devices of the 2 processes, each
  process feeds its rows, only process 0 writes and prints, and the run matches a
  single-device run (training, checkpoint at the stop, then the validation run of 249
  windows, which hung in 2 of 6 and 3 of 12 runs before the evaluation was paced)."""
  argv = [a for a in _ptb_args(shared_data_dir, tmp_path / "multi", "--max-steps", "12")
          if a not in ("--num-devices", "1")]
  outs = _two_processes(argv, tmp_path)
  assert "4 device(s)" in outs[0][0] and "Stopped at --max-steps 12" in outs[0][0]
  assert "PTB" not in outs[1][0] and "Stopped" not in outs[1][0]  # process 1 is quiet
  assert cli.main(_ptb_args(shared_data_dir, tmp_path / "single", "--max-steps", "12")) == 0
  (multi,), (single,) = MetricsWriter.read(tmp_path / "multi"), MetricsWriter.read(
      tmp_path / "single")
  for key in ("train_ppl", "valid_ppl", "grad_norm_mean", "grad_norm_max"):
    np.testing.assert_allclose(multi[key], single[key], rtol=1e-4, err_msg=key)
  assert [p.name for p in (tmp_path / "multi" / "checkpoints").iterdir()] == ["12"]


def test_two_processes_classify_like_one(shared_data_dir, tmp_path, cache_dir):
  """``gradclip classify --distributed``: 2 epochs of MR with evaluations of many small
  batches (24 of 4 examples: more than ``mesh.MAX_AHEAD`` per evaluation), the same
  records, selection and test predictions as one device; only process 0 writes."""
  extra = ("--max-epochs", "2", "--set", "max_examples=96", "--set", "eval_batch_size=4",
           "--set", "ema_decay=0.9")
  argv = [a for a in _mr_args(shared_data_dir, tmp_path / "multi", cache_dir, *extra)
          if a not in ("--num-devices", "1")]
  outs = _two_processes(argv, tmp_path)
  assert "test accuracy" in outs[0][0] and "test accuracy" not in outs[1][0]
  assert cli.main(_mr_args(shared_data_dir, tmp_path / "single", cache_dir, *extra)) == 0
  multi, single = (MetricsWriter.read(tmp_path / d) for d in ("multi", "single"))
  assert [r["epoch"] for r in multi] == [r["epoch"] for r in single] == [1, 2]
  for m, s in zip(multi, single):
    for key in ("train_loss", "train_acc", "eval_acc", "grad_norm_mean", "clip_fraction"):
      np.testing.assert_allclose(m[key], s[key], rtol=1e-4, err_msg=key)
  result = lambda d: json.loads((tmp_path / d / "results.json").read_text())
  assert result("multi")["test_acc"] == result("single")["test_acc"]
  assert result("multi")["selected_epoch"] == result("single")["selected_epoch"]
  probs = lambda d: np.load(tmp_path / d / "predictions.npz")["test_probs"]
  np.testing.assert_allclose(probs("multi"), probs("single"), rtol=1e-4, atol=1e-6)
