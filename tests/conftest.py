"""Shared pytest set-up.

Eight virtual CPU devices are requested before JAX is imported, so the sharding tests
(GSPMD ``jit`` over a mesh, ``shard_map`` with an ``axis_name``) run on any machine.

JAX's persistent compilation cache is on, in a temporary folder of this session (removed
at its end; the subprocesses that tests start inherit it): the trainer runs recompile the
same programs many times (each run builds its steps anew, and each subprocess starts
cold), and XLA's compile is most of a tiny run's time. A cached executable is the one XLA
built for the same program, so no check changes. ``GRADCLIP_TEST_COMPILE_CACHE=0`` turns
it off; a ``JAX_COMPILATION_CACHE_DIR`` set by the caller is used as it is.
"""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_COMPILE_CACHE = None
if (os.environ.get("GRADCLIP_TEST_COMPILE_CACHE", "1") != "0"
    and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
  _COMPILE_CACHE = tempfile.mkdtemp(prefix="gradclip-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILE_CACHE
  # Every program, however quick to compile or small (the defaults skip those).
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _COMPILE_CACHE is not None:
    shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)


def _data_root() -> pathlib.Path:
  env = os.environ.get("GRADCLIP_DATA_DIR")
  return pathlib.Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """The real data sets (../shared/data, or $GRADCLIP_DATA_DIR).

  Skips the test where the folder is absent on a developer machine; under CI (CI=true)
  a missing folder is a failure, so the smoke runs can never be skipped silently there.
  """
  root = _data_root()
  if not root.is_dir():
    msg = f"data directory {root} not found (set GRADCLIP_DATA_DIR)"
    if os.environ.get("CI"):
      pytest.fail(msg)
    pytest.skip(msg)
  return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> pathlib.Path:
  """One token cache (``--cache-dir``) for every trainer test of the session: each data
  set is tokenized once (IMDB's 50,000 reviews take ~20 s)."""
  return tmp_path_factory.mktemp("corpus_cache")


# ---------------------------------------------------------------------------
# PTB: one uninterrupted reference run for the resume tests of test_ptb and test_cli.
# ---------------------------------------------------------------------------

PTB_TOKENS = 10000  # 249 windows per epoch with the test config
PTB_REFERENCE_FLAGS = ("--max-epochs", "2", "--checkpoint-every", "100")


def ptb_argv(data_dir, workdir, *extra):
  """``gradclip ptb`` on the first ``PTB_TOKENS`` tokens of each split (test config).

  One device unless ``extra`` asks for more: XLA's in-process all-reduce needs every
  virtual device's thread at the rendezvous, and with 5 of them on a 2-core machine a
  starved thread can hit XLA's 40 s rendezvous timeout, which aborts the process.
  """
  devices = [] if "--num-devices" in extra else ["--num-devices", "1"]
  return ["ptb", "--config", "test", "--data-dir", str(data_dir / "ptb"), "--workdir",
          str(workdir), "--max-tokens", str(PTB_TOKENS), "--no-progress", *devices,
          *extra]


@pytest.fixture(scope="session")
def ptb_reference(shared_data_dir, tmp_path_factory):
  """``(data_dir, records)`` of two uninterrupted epochs of the test config
  (``PTB_REFERENCE_FLAGS``: a checkpoint every 100 steps)."""
  from gradclip_jax.training import cli  # pylint: disable=C0415
  from gradclip_jax.training.metrics import MetricsWriter  # pylint: disable=C0415
  workdir = tmp_path_factory.mktemp("ptb_reference")
  assert cli.main(ptb_argv(shared_data_dir, workdir, *PTB_REFERENCE_FLAGS)) == 0
  return shared_data_dir, MetricsWriter.read(workdir)


# ---------------------------------------------------------------------------
# MR: one uninterrupted reference run for the resume tests of test_classify and test_cli.
# ---------------------------------------------------------------------------

# Smoke config (LSTM), 64 examples per split: 4 steps of 16 per epoch, 8 in all; dropout,
# an active clipping rule and the parameter average, all of which a resume must restore.
MR_RESUME_FLAGS = ("--dataset", "mr", "--config", "smoke", "--max-epochs", "2",
                   "--num-devices", "1", "--set", "max_examples=64", "--set", "dropout=0.2",
                   "--clip", "value", "--clip-value", "0.01", "--set", "ema_decay=0.9")


def mr_resume_argv(data_dir, cache_dir, workdir, *extra):
  return ["classify", "--no-progress", "--data-dir", str(data_dir / "rt-polarity"),
          "--cache-dir", str(cache_dir), "--workdir", str(workdir), *MR_RESUME_FLAGS,
          *extra]


@pytest.fixture(scope="session")
def mr_reference(shared_data_dir, cache_dir, tmp_path_factory) -> pathlib.Path:
  """The workdir of an uninterrupted run of ``MR_RESUME_FLAGS`` (metrics.jsonl,
  results.json)."""
  from gradclip_jax.training import cli  # pylint: disable=C0415
  workdir = tmp_path_factory.mktemp("mr_reference")
  assert cli.main(mr_resume_argv(shared_data_dir, cache_dir, workdir)) == 0
  return workdir
