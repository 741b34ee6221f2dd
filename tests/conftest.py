"""Shared pytest set-up.

Eight virtual CPU devices are requested before JAX is imported, so the sharding tests
(GSPMD ``jit`` over a mesh, ``shard_map`` with an ``axis_name``) run on any machine.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


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
