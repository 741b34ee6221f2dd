"""What a run reports: ``metrics.jsonl`` (typed :class:`Record` lines), the progress
bar, and lines on stdout.

Only process 0 of a multi-host run writes or prints (:func:`is_primary`); the others
compute the same records and keep them in memory.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from typing import Any, Iterable, Mapping

import jax
import numpy as np

__all__ = ["jsonable", "MetricsWriter", "progress_bar", "is_primary", "report", "Record",
           "optional", "flattened"]


def is_primary() -> bool:
  """True in process 0 (the only one that writes metrics and logs)."""
  return jax.process_index() == 0


def report(*parts: Any) -> None:
  """``print(*parts, flush=True)`` in process 0 only."""
  if is_primary():
    print(*parts, flush=True)


def jsonable(x: Any) -> Any:
  """``x`` with arrays and NumPy scalars turned into Python numbers and lists."""
  if isinstance(x, Record):
    return x.as_dict()
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()
  return x


class MetricsWriter:
  """Appends one JSON object per line to ``workdir/metrics.jsonl`` (process 0 only).

  ``MetricsWriter(workdir, records)`` rewrites the file with ``records`` first (pass
  the records stored in a checkpoint on resume, so a run killed between an epoch's
  metrics line and its checkpoint never duplicates or loses a line). ``records`` is also
  kept in memory as :attr:`records` (in every process).
  """

  FILENAME = "metrics.jsonl"

  def __init__(self, workdir: os.PathLike | str, records: Iterable[Mapping] = ()):
    self.path = pathlib.Path(workdir) / self.FILENAME
    self.records: list[dict] = [jsonable(r) for r in records]
    if is_primary():
      self.path.parent.mkdir(parents=True, exist_ok=True)
      with open(self.path, "w", encoding="utf-8") as f:
        for r in self.records:
          f.write(json.dumps(r) + "\n")

  def write(self, record: Mapping, *, keep: bool = True) -> None:
    """Appends ``record``; ``keep=False``: to the file only, not to :attr:`records`
    (a partial epoch's line, which a resumed run replaces)."""
    r = jsonable(record)
    if keep:
      self.records.append(r)
    if is_primary():
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())

  @staticmethod
  def read(workdir: os.PathLike | str) -> list[dict]:
    """The records of ``workdir/metrics.jsonl``."""
    path = pathlib.Path(workdir) / MetricsWriter.FILENAME
    with open(path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]


def progress_bar(total: int | None, desc: str = "", *, disable: bool = False,
                 initial: int = 0, unit: str = "step"):
  """A tqdm bar on stderr; disabled when ``disable``, off a TTY, or outside process 0."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True,
              disable=disable or not sys.stderr.isatty() or not is_primary(), leave=False)


def optional(**kwargs) -> Any:
  """A :class:`Record` field left out of the record while it is ``None``."""
  return dataclasses.field(default=None, metadata={"omit_if_none": True}, **kwargs)


def flattened(**kwargs) -> Any:
  """A :class:`Record` field whose own fields (a record or a mapping) are merged into the
  record; left out while ``None``."""
  return dataclasses.field(default=None, metadata={"flatten": True}, **kwargs)


@dataclasses.dataclass(frozen=True)
class Record:
  """A typed line of ``metrics.jsonl``: subclass with the fields; :meth:`as_dict` gives
  the JSON object (fields in order; :func:`optional` ones dropped while ``None``,
  :func:`flattened` ones merged)."""

  def as_dict(self) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if v is None and (f.metadata.get("omit_if_none") or f.metadata.get("flatten")):
        continue
      if f.metadata.get("flatten"):
        out.update(v.as_dict() if isinstance(v, Record) else dict(v))
      else:
        out[f.name] = v
    return jsonable(out)
