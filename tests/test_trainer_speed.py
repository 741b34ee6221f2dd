"""benchmarks/trainer_speed.py: the phase bookkeeping (hand-computed cases) and one quick run."""

import json
import os
import pathlib
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
ts = pytest.importorskip("trainer_speed")

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_union_length_and_overlap():
  assert ts.union([(5, 6), (0, 2), (1, 3), (4, 4)]) == [(0, 3), (5, 6)]
  assert ts.length([(0, 2), (1, 3), (5, 6)]) == 4
  # [0, 3] u [5, 6] inside [2, 5.5]: 1 + 0.5.
  assert ts.overlap([(0, 2), (1, 3), (5, 6)], [(2, 5.5)]) == pytest.approx(1.5)


def test_step_segments_end_at_the_next_hooked_event():
  events = [{"kind": "load", "start": 1, "end": 2},
            {"kind": "evaluation", "start": 10, "end": 11},
            {"kind": "checkpoint", "start": 11, "end": 12},
            {"kind": "evaluation", "start": 20, "end": 21}]
  # Two epochs of steps: 3..9 then 13..19; the second ends at the evaluation at 20.
  calls = [3, 5, 9, 13, 15, 19]
  assert ts.step_segments(calls, events, end=30) == [(3, 10), (13, 20)]
  # Steps after the last event run to the end of main.
  assert ts.step_segments([22, 25], events, end=30) == [(22, 30)]


def test_phases_partition_the_process_net_of_compile():
  record = {"process_start": 0.0, "main_start": 4.0, "main_end": 40.0, "process_end": 41.0,
            "events": [{"kind": "load", "start": 5, "end": 7},
                       {"kind": "evaluation", "start": 30, "end": 34},
                       {"kind": "checkpoint", "start": 34, "end": 35}],
            "step_calls": [10, 20, 25],
            # init compiles at 8-9, the first step's at 10-15 (nested spans), the eval's
            # at 30-31.
            "compiles": [(8, 9), (10, 15), (11, 12), (30, 31)]}
  p = ts.phases(record)
  assert p["startup"] == 4
  assert p["load"] == 2
  assert p["compile"] == 1 + 5 + 1
  assert p["steps"] == (30 - 10) - 5
  assert p["evaluation"] == 4 - 1
  assert p["checkpoint"] == 1
  assert p["total"] == 41
  # The rest: 4-5 (before the load), 7-8 and 9-10 (init), 35-41 (after the run, exit).
  assert p["other"] == pytest.approx(1 + 1 + 1 + 6)
  assert sum(v for k, v in p.items() if k != "total") == pytest.approx(p["total"])
  # CPU time: a process that used half a core throughout has half of every phase.
  record["cpu_samples"] = [(t, t / 2) for t in (4, 5, 7, 8, 9, 10, 11, 12, 15, 20, 25, 30,
                                                31, 34, 35, 40)]
  record["cpu_total"] = 41 / 2
  assert ts.phases(record, cpu=True) == pytest.approx({k: v / 2 for k, v in p.items()})


def test_cpu_clock_interpolates_between_samples():
  clock = ts.cpu_clock([(10, 5), (0, 0), (20, 5)])
  assert [clock(t) for t in (0, 5, 10, 15, 20, 25, -1)] == [0, 2.5, 5, 5, 5, 5, 0]
  # CPU seconds spent in [5, 15]: 2.5 in the first half, none in the second.
  assert ts.length([(5, 15)], clock) == 2.5


def test_ratios_are_medians_of_per_round_ratios_and_steps_per_step():
  def run(total, steps_s, n):
    return {"phases": {**{k: 1.0 for k in ts.PHASES}, "total": total, "steps": steps_s},
            "steps": n}
  base = [run(10, 4, 100), run(10, 4, 100), run(20, 4, 100)]
  head = [run(12, 2, 50), run(9, 2, 50), run(30, 6, 100)]
  r = ts.ratios(base, head)
  assert r["total"]["per_round"] == pytest.approx([1.2, 0.9, 1.5])
  assert r["total"]["median"] == pytest.approx(1.2)
  assert (r["total"]["min"], r["total"]["max"]) == pytest.approx((0.9, 1.5))
  # Per step: 2/50 against 4/100 is 1.0, then 1.5.
  assert r["steps"]["per_round"] == pytest.approx([1.0, 1.0, 1.5])


def test_quick_run_at_this_checkout(shared_data_dir, tmp_path):
  """The real thing on PTB's tiny config, base = head = this checkout: the children
  imported this tree's gradclip_jax, the warm-up found both trainers' hook points, and the
  files hold a row per phase. The session's compile cache (conftest) serves the children:
  this checks the plumbing, not the numbers. (Both trainers: about four times as long.)"""
  rc = ts.main(["--base", str(REPO), "--head", str(REPO), "--quick", "--rounds", "1",
                "--trainers", "ptb", "--compile-cache", "--data-dir", str(shared_data_dir),
                "--out", str(tmp_path)])
  assert rc == 0
  (path,) = tmp_path.glob("trainer_speed-*.json")
  result = json.loads(path.read_text())
  assert all(pathlib.Path(f).resolve().parent.parent == REPO
             for f in result["gradclip_jax_files"].values())
  for trainer in ("ptb",):
    t = result["trainers"][trainer]
    assert t["steps"]["base"] == t["steps"]["head"] > 0
    assert t["evaluations"]["base"] >= 1
    for side in ("base", "head"):
      (p,) = (run["phases"] for run in t["runs"][side])
      assert p["steps"] > 0 and p["compile"] > 0 and p["load"] > 0 and p["evaluation"] > 0
      assert sum(v for k, v in p.items() if k != "total") == pytest.approx(p["total"])
      assert min(p.values()) >= 0
      (c,) = (run["cpu"] for run in t["runs"][side])
      assert 0 < c["steps"] and 0 < c["total"] < 2 * p["total"] * os.cpu_count()
      assert sum(v for k, v in c.items() if k != "total") == pytest.approx(c["total"])
    assert t["ratios"]["total"]["median"] > 0
  md = path.with_suffix(".md").read_text()
  assert "| steps (per step) |" in md and "## ptb" in md


def test_a_tree_without_the_hook_points_is_refused(tmp_path, monkeypatch):
  fake = tmp_path / "tree"
  for pkg in ("gradclip_jax", "gradclip_jax/training", "gradclip_jax/training/ptb",
              "gradclip_jax/training/classify"):
    (fake / pkg).mkdir(parents=True)
    (fake / pkg / "__init__.py").write_text("")
  (fake / "gradclip_jax/training/cli.py").write_text("")
  (fake / "gradclip_jax/training/checkpoints.py").write_text("class Checkpointer:\n  pass\n")
  for trainer, loader in (("ptb", "load_ptb"), ("classify", "load_dataset")):
    (fake / f"gradclip_jax/training/{trainer}/train.py").write_text(
        "def make_train_step():\n  pass\ndef make_eval_step():\n  pass\n")  # no evaluate
    (fake / f"gradclip_jax/training/{trainer}/input_pipeline.py").write_text(
        f"def {loader}():\n  pass\n")
  with pytest.raises(SystemExit, match=r"lacks the hook points ptb\.train\.evaluate"):
    ts.warm_up({"tree": str(fake), "label": "fake"})
