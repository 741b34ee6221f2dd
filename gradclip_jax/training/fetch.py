"""``gradclip data fetch {ptb,imdb,mr} DIR``: download a data set the trainers read.

Each data set is downloaded as its original archive from its canonical source, checked
against the published contents, and only the files the loaders read are unpacked into
``DIR``, so that ``gradclip ptb --data-dir DIR`` or
``gradclip classify --dataset {imdb,mr} --data-dir DIR`` reads it directly.

* ``ptb``: Mikolov's ``simple-examples.tgz`` (the archive the TensorFlow PTB tutorial uses);
  its ``simple-examples/data/ptb.{train,valid,test}.txt`` become ``DIR/ptb.*.txt``. Data:
  Marcus, Santorini & Marcinkiewicz (1993), "Building a Large Annotated Corpus of English:
  The Penn Treebank"; preprocessing: Mikolov et al. (2010), "Recurrent neural network based
  language model".
* ``imdb``: the Large Movie Review Dataset v1.0, ``aclImdb_v1.tar.gz``; its labelled reviews
  ``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`` become ``DIR/aclImdb/...``; the
  unlabelled ``train/unsup/`` reviews, the ``*.feat`` files and the rest are skipped. Data: Maas et al. (2011), "Learning Word Vectors for Sentiment Analysis".
* ``mr``: the sentence polarity data set v1.0, ``rt-polaritydata.tar.gz``; its
  ``rt-polaritydata/rt-polarity.{pos,neg}`` become ``DIR/rt-polarity.{pos,neg}`` (Latin-1
  text). Data: Pang & Lee (2005), "Seeing stars: Exploiting class relationships for sentiment
  categorization with respect to rating scales".

What is verified before anything appears in ``DIR``: for PTB and MR, every file's size,
SHA-256, line count and whitespace word count; for IMDB, 12,500 reviews in each of
``{train,test}/{pos,neg}`` with ids exactly 0..12499, ratings of 7-10 (pos) and 1-4 (neg),
valid UTF-8, and the whitespace word count of each of the four folders. Archive members
with an absolute path or a ``..`` component make the whole archive refused.

The archive is downloaded into a temporary folder next to ``DIR`` and unpacked there; the
result is renamed into place only after every check passed, so a failed, truncated,
corrupted or interrupted fetch leaves nothing behind. Only the standard library is used (no
``[train]`` extra needed).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import os
import pathlib
import re
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from typing import IO

__all__ = ["DATASETS", "SOURCES", "FetchError", "add_arguments", "command", "fetch", "main"]

DATASETS = ("ptb", "imdb", "mr")

# Seconds without any data from the server after which a download is abandoned.
_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class FetchError(RuntimeError):
  """A fetch failed: download error, corrupt or unexpected archive, or an occupied target."""


@dataclasses.dataclass(frozen=True)
class _File:
  """A file unpacked verbatim from an archive, with its published size, hash and counts."""

  member: str   # member name in the archive, without a leading "./"
  dest: str     # file name in the target folder
  size: int
  sha256: str
  lines: int    # number of b"\n" (as `wc -l`)
  words: int    # words as `LC_ALL=C wc -w` counts them (see _wc_words)


@dataclasses.dataclass(frozen=True)
class _Source:
  name: str
  title: str
  url: str
  archive: str  # file name the archive is downloaded to
  citation: str
  train_command: str  # with {dir} for the target folder
  files: tuple[_File, ...] = ()


def _files(folder: str, *specs: tuple[str, int, str, int, int]) -> tuple[_File, ...]:
  """``_File``s of the archive folder ``folder``, each unpacked under its own name:
  ``(name, size, sha256, lines, words)`` per file."""
  return tuple(_File(f"{folder}/{name}", name, *spec) for name, *spec in specs)


SOURCES = {
    "ptb": _Source(
        name="ptb",
        title="Penn Treebank (Mikolov's language-modelling version)",
        url="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
        archive="simple-examples.tgz",
        citation=("Marcus, Santorini & Marcinkiewicz (1993), Computational Linguistics 19(2); "
                  "preprocessing Mikolov et al. (2010), Interspeech"),
        train_command="gradclip ptb --data-dir {dir}",
        files=_files(
            "simple-examples/data",
            ("ptb.train.txt", 5_101_618,
             "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
             42_068, 887_521),
            ("ptb.valid.txt", 399_782,
             "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
             3_370, 70_390),
            ("ptb.test.txt", 449_945,
             "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
             3_761, 78_669))),
    "imdb": _Source(
        name="imdb",
        title="Large Movie Review Dataset v1.0 (aclImdb), labelled reviews",
        url="https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
        archive="aclImdb_v1.tar.gz",
        citation="Maas, Daly, Pham, Huang, Ng & Potts (2011), ACL",
        train_command="gradclip classify --dataset imdb --data-dir {dir}"),
    "mr": _Source(
        name="mr",
        title="Movie Review sentence polarity data set v1.0 (Pang & Lee)",
        url="https://www.cs.cornell.edu/people/pabo/movie-review-data/rt-polaritydata.tar.gz",
        archive="rt-polaritydata.tar.gz",
        citation="Pang & Lee (2005), ACL",
        train_command="gradclip classify --dataset mr --data-dir {dir}",
        files=_files(
            "rt-polaritydata",
            ("rt-polarity.pos", 626_139,
             "2da124ec187a9d5a29c9f04e91c540e02baed5af8868f550a26bd6fd4dbf8bf0",
             5_331, 112_404),
            ("rt-polarity.neg", 612_256,
             "4ace77d558c3714723843f1d65b60c01e3417b208180f0728808d76ad0eeeaca",
             5_331, 111_597))),
}

# IMDB: reviews per split and class, and their whitespace word counts (str.split of the
# UTF-8 text, summed over the folder).
_IMDB_REVIEWS_PER_FOLDER = 12_500
_IMDB_WORDS = {("train", "pos"): 2_958_832, ("train", "neg"): 2_885_848,
               ("test", "pos"): 2_862_401, ("test", "neg"): 2_850_766}
_IMDB_RATINGS = {"pos": range(7, 11), "neg": range(1, 5)}
_IMDB_REVIEW_RE = re.compile(r"^(?:[^/]+/)?(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
_IMDB_MAX_MEMBER = 1 << 20  # the longest review has 13,704 bytes; 1 MiB is no review


# -----------------------------------------------------------------------------------------
# Progress bar.
# -----------------------------------------------------------------------------------------


def _megabytes(n: float) -> str:
  return f"{n / 1e6:.1f} MB"


class _Progress:
  """Bytes done / total, percentage and rate on ``stream``.

  On a terminal the line is redrawn in place (at most ten times a second); otherwise (a log
  file, a pipe) one line is written per 10% (or every 30 s when the size is unknown).
  """

  def __init__(self, label: str, total: int | None, stream: IO[str]):
    self.label, self.total, self.stream = label, total, stream
    self.tty = bool(getattr(stream, "isatty", lambda: False)())
    self.done = 0
    self.start = self.last = time.monotonic()
    self.last_decile = 0

  def _line(self, now: float) -> str:
    rate = self.done / max(now - self.start, 1e-9)
    if self.total:
      pct = 100.0 * self.done / self.total
      return (f"{self.label}: {_megabytes(self.done)} / {_megabytes(self.total)} "
              f"({pct:3.0f}%), {_megabytes(rate)}/s")
    return f"{self.label}: {_megabytes(self.done)}, {_megabytes(rate)}/s"

  def update(self, n: int) -> None:
    self.done += n
    now = time.monotonic()
    if self.tty:
      if now - self.last >= 0.1:
        self.stream.write("\r" + self._line(now).ljust(72))
        self.stream.flush()
        self.last = now
    elif self.total:
      decile = 10 * self.done // self.total
      if decile > self.last_decile and self.done < self.total:
        self.stream.write(self._line(now) + "\n")
        self.last_decile = decile
    elif now - self.last >= 30.0:
      self.stream.write(self._line(now) + "\n")
      self.last = now

  def close(self) -> None:
    now = time.monotonic()
    end = f" in {now - self.start:.1f} s"
    self.stream.write(("\r" if self.tty else "") + (self._line(now) + end).ljust(72) + "\n")
    self.stream.flush()


# -----------------------------------------------------------------------------------------
# Download.
# -----------------------------------------------------------------------------------------


def _as_url(url_or_path: str) -> str:
  """A URL for urllib: http(s) and file URLs as given, a local path as a file URL."""
  if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url_or_path):
    scheme = urllib.parse.urlsplit(url_or_path).scheme.lower()
    if scheme not in ("http", "https", "file"):
      raise FetchError(f"unsupported URL scheme {scheme!r} in {url_or_path} "
                       "(use http, https, file or a local path)")
    return url_or_path
  path = pathlib.Path(url_or_path).expanduser()
  if not path.is_file():
    raise FetchError(f"{url_or_path} is neither a URL nor an existing archive file")
  return path.resolve().as_uri()


def _download(url: str, dest: pathlib.Path, *, label: str, stream: IO[str] | None) -> int:
  """Streams ``url`` into ``dest``; returns the number of bytes. ``stream=None``: no bar.

  Network failures raise FetchError; a failure to write ``dest`` stays an OSError.
  """
  request = urllib.request.Request(url, headers={"User-Agent": "gradclip_jax-data-fetch"})
  done = 0
  with open(dest, "wb") as out:
    try:
      response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
      raise FetchError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
      raise FetchError(f"cannot download {url}: {e.reason}") from e
    except (http.client.HTTPException, OSError, ValueError) as e:
      raise FetchError(f"cannot download {url}: {e or type(e).__name__}") from e
    with response:
      length = response.headers.get("Content-Length")
      total = int(length) if length and length.isdigit() else None
      bar = _Progress(label, total, stream) if stream is not None else None
      while True:
        try:
          chunk = response.read(_CHUNK)
        except http.client.IncompleteRead as e:
          got = done + len(e.partial)
          of = f" of {total:,}" if total is not None else ""
          raise FetchError(f"download of {url} is truncated: the connection closed after "
                           f"{got:,}{of} bytes") from e
        except (http.client.HTTPException, OSError) as e:
          raise FetchError(f"download of {url} was interrupted after {done:,} bytes: "
                           f"{e or type(e).__name__}") from e
        if not chunk:
          break
        out.write(chunk)
        done += len(chunk)
        if bar is not None:
          bar.update(len(chunk))
      if bar is not None:
        bar.close()
  if total is not None and done != total:
    raise FetchError(f"download of {url} is truncated: got {done:,} of {total:,} bytes")
  if done == 0:
    raise FetchError(f"download of {url} is empty")
  return done


# -----------------------------------------------------------------------------------------
# Unpacking and verification.
# -----------------------------------------------------------------------------------------


def _member_name(member: tarfile.TarInfo, archive: str) -> str:
  """The member's name without leading ``./``; refuses absolute paths and ``..``."""
  name = member.name.replace("\\", "/")
  if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
    raise FetchError(f"{archive} has a member with an absolute path ({member.name!r}); "
                     "refusing the archive")
  parts = [p for p in name.split("/") if p not in ("", ".")]
  if ".." in parts:
    raise FetchError(f"{archive} has a member that points outside its folder "
                     f"({member.name!r}); refusing the archive")
  return "/".join(parts)


class _Archive:
  """Reader of a (compressed) tar archive, turning read errors into FetchError.

  Members are read in archive order. The archive is opened with ``mode="r:*"`` (not the
  stream mode), so a gzip file of several concatenated members is read whole, as ``gzip``
  and the loaders read it.
  """

  def __init__(self, path: pathlib.Path, label: str):
    self.path, self.label = path, label
    try:
      self.tar = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
      raise self._error(e) from e

  def _error(self, e: BaseException) -> FetchError:
    reason = " ".join(str(e).split()) or type(e).__name__
    if "could not be opened successfully" in reason:  # tarfile tried every compression
      reason = "neither a gzip, bzip2 or xz compressed nor a plain tar file"
    return FetchError(f"{self.label} is not a readable tar archive (corrupt or truncated "
                      f"download?): {reason}")

  def __iter__(self):
    iterator = iter(self.tar)
    while True:
      try:
        member = next(iterator)
      except StopIteration:
        return
      except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise self._error(e) from e
      yield _member_name(member, self.label), member

  def read(self, member: tarfile.TarInfo) -> bytes:
    try:
      f = self.tar.extractfile(member)
      if f is None:
        raise FetchError(f"{self.label}: member {member.name!r} is not a regular file")
      data = f.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
      raise self._error(e) from e
    if len(data) != member.size:
      raise self._error(EOFError(f"member {member.name!r} ends after {len(data)} of "
                                 f"{member.size} bytes"))
    return data

  def close(self) -> None:
    self.tar.close()


def _regular(member: tarfile.TarInfo, name: str, label: str) -> None:
  if not member.isfile():
    raise FetchError(f"{label}: {name} is not a regular file (a link or a device); "
                     "refusing the archive")


_PRINTABLE = frozenset(range(0x21, 0x7F))


def _wc_words(data: bytes) -> int:
  """Words as GNU ``wc -w`` counts them in the C locale.

  A word is a maximal run of non-whitespace bytes that holds at least one printable ASCII
  character; a run of only non-ASCII bytes (in MR, a lone Latin-1 dash such as ``\\x96``)
  is not counted.
  """
  return sum(1 for w in data.split() if not _PRINTABLE.isdisjoint(w))


def _check_file(spec: _File, data: bytes, label: str) -> None:
  digest = hashlib.sha256(data).hexdigest()
  if digest == spec.sha256:
    return
  lines, words = data.count(b"\n"), _wc_words(data)
  counts = (f"{lines:,} lines (expected {spec.lines:,}), {words:,} words "
            f"(expected {spec.words:,})")
  raise FetchError(f"{label}: {spec.member} does not match the published file: sha256 "
                   f"{digest}, expected {spec.sha256}; {counts}")


def _unpack_files(archive: _Archive, files: tuple[_File, ...], out: pathlib.Path) -> None:
  """Unpacks exactly ``files`` (verifying each) from the archive into ``out``."""
  wanted = {f.member: f for f in files}
  seen: set[str] = set()
  for name, member in archive:
    spec = wanted.get(name)
    if spec is None:
      continue
    if name in seen:
      raise FetchError(f"{archive.label} holds {name} twice; refusing the archive")
    _regular(member, name, archive.label)
    if member.size != spec.size:
      raise FetchError(f"{archive.label}: {name} has {member.size:,} bytes, expected "
                       f"{spec.size:,} (not the published file)")
    data = archive.read(member)
    _check_file(spec, data, archive.label)
    if data.count(b"\n") != spec.lines or _wc_words(data) != spec.words:
      raise FetchError(f"{archive.label}: {name} has the published sha256 but not the "
                       "published line or word count")  # only if the constants disagree
    (out / spec.dest).write_bytes(data)
    seen.add(name)
  missing = [m for m in wanted if m not in seen]
  if missing:
    raise FetchError(f"{archive.label} lacks {', '.join(missing)}: not the "
                     "expected archive")


def _unpack_imdb(archive: _Archive, out: pathlib.Path) -> None:
  """Unpacks and verifies the labelled aclImdb reviews, the only files the loader reads."""
  ids = {key: set() for key in _IMDB_WORDS}
  words = dict.fromkeys(_IMDB_WORDS, 0)
  folders = {key: os.path.join(out, "aclImdb", *key) for key in _IMDB_WORDS}
  for folder in folders.values():
    os.makedirs(folder)
  for name, member in archive:
    m = _IMDB_REVIEW_RE.match(name)
    if m is None:
      continue
    _regular(member, name, archive.label)
    if member.size > _IMDB_MAX_MEMBER:
      raise FetchError(f"{archive.label}: {name} has {member.size:,} bytes, far more than "
                       "any review; not the expected archive")
    data = archive.read(member)
    split, label, review_id, rating = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
    key = (split, label)
    if review_id in ids[key]:
      raise FetchError(f"{archive.label}: review id {review_id} appears twice in "
                       f"{split}/{label}; refusing the archive")
    if rating not in _IMDB_RATINGS[label]:
      raise FetchError(f"{archive.label}: {name} has rating {rating}, impossible for a "
                       f"{label} review; not the expected archive")
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise FetchError(f"{archive.label}: {name} is not valid UTF-8 ({e})") from e
    ids[key].add(review_id)
    words[key] += len(text.split())
    with open(os.path.join(folders[key], f"{review_id}_{rating}.txt"), "wb") as f:
      f.write(data)
  expected_ids = set(range(_IMDB_REVIEWS_PER_FOLDER))
  for (split, label), found in ids.items():
    if found != expected_ids:
      missing = len(expected_ids - found)
      extra_ids = len(found - expected_ids)
      raise FetchError(
          f"{archive.label}: {split}/{label} has {len(found):,} reviews, expected ids "
          f"0..{_IMDB_REVIEWS_PER_FOLDER - 1} ({missing:,} missing, {extra_ids:,} "
          "unexpected); not the complete aclImdb v1 archive")
    if words[(split, label)] != _IMDB_WORDS[(split, label)]:
      raise FetchError(f"{archive.label}: the {split}/{label} reviews have "
                       f"{words[(split, label)]:,} words, expected "
                       f"{_IMDB_WORDS[(split, label)]:,}; not the published reviews")


def _unpack(source: _Source, archive_path: pathlib.Path, out: pathlib.Path,
            label: str) -> None:
  archive = _Archive(archive_path, label)
  try:
    if source.name == "imdb":
      _unpack_imdb(archive, out)
    else:
      _unpack_files(archive, source.files, out)
  finally:
    archive.close()


# -----------------------------------------------------------------------------------------
# The target folder.
# -----------------------------------------------------------------------------------------


def _check_target(target: pathlib.Path, force: bool) -> None:
  if target.is_symlink():
    raise FetchError(f"{target} is a symbolic link; give the folder itself")
  if not target.exists():
    return
  if not target.is_dir():
    raise FetchError(f"{target} exists and is not a folder")
  if force:
    protected = {pathlib.Path("/"), pathlib.Path.home().absolute()}
    cwd = pathlib.Path.cwd().absolute()
    if target in protected or target == cwd or target in cwd.parents:
      raise FetchError(f"refusing to replace {target} (the root, home or current folder "
                       "or one of its parents); choose a dedicated folder")
    return
  if any(target.iterdir()):
    raise FetchError(f"{target} already exists and is not empty; choose another folder or "
                     "pass --force (force=True) to replace it")


def _absolute(path: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(os.path.abspath(path))


def fetch(dataset: str, directory: str | os.PathLike, *, url: str | None = None,
          progress: bool = True, force: bool = False) -> pathlib.Path:
  """Downloads, verifies and unpacks ``dataset`` into ``directory``.

  The archive (from the canonical source, or ``url``) is downloaded into a temporary folder
  next to ``directory``, the files the loaders read are unpacked there and checked (PTB and
  MR: size, SHA-256, line and word counts of each file; IMDB: 12,500 reviews with ids
  0..12499 and the published word count in each of ``{train,test}/{pos,neg}``), and only
  then is the folder renamed to ``directory``. On any failure nothing is left behind.

  Args:
    dataset: ``"ptb"``, ``"imdb"`` or ``"mr"``.
    directory: the folder to create; it may exist if it is empty (or with ``force``).
    url: download from this http(s) or file URL, or local archive path, instead of the
      canonical source (a mirror, or an archive downloaded by hand). It is verified the
      same way.
    progress: draw a progress bar (bytes done / total and rate) on stderr.
    force: replace an existing, non-empty ``directory``.

  Returns:
    The absolute path of ``directory``, ready for the trainers' ``--data-dir``.

  Raises:
    ValueError: an unknown ``dataset``.
    TypeError: ``directory`` or ``url`` of the wrong type.
    FetchError: the download failed or was truncated, the archive is corrupt, is not the
      expected one or holds unsafe member names, or ``directory`` is occupied.

  Examples:
    >>> from gradclip_jax.training import fetch as data
    >>> data.fetch("wikitext", "data/wikitext")
    Traceback (most recent call last):
      ...
    ValueError: unknown dataset 'wikitext'; choose one of ptb, imdb, mr
  """
  if dataset not in SOURCES:
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(f"directory must be a str or path, got {type(directory).__name__}")
  if url is not None and not isinstance(url, str):
    raise TypeError(f"url must be a str, got {type(url).__name__}")
  source = SOURCES[dataset]
  target = _absolute(pathlib.Path(directory).expanduser())
  _check_target(target, force)
  source_url = _as_url(url) if url is not None else source.url
  stream = sys.stderr if progress else None

  created: list[pathlib.Path] = []
  parent = target.parent
  while not parent.exists():
    created.append(parent)
    parent = parent.parent
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise FetchError(f"cannot create {target.parent}: {e}") from e
  done = False
  try:
    try:
      work = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.fetch-",
                                           dir=target.parent))
    except OSError as e:
      raise FetchError(f"cannot write in {target.parent}: {e}") from e
    # Messages name the archive as the URL does (a mirror's or a local file's name).
    label = urllib.parse.unquote(
        urllib.parse.urlsplit(source_url).path.rsplit("/", 1)[-1]) or source.archive
    try:
      archive_path = work / source.archive
      try:
        _download(source_url, archive_path, label=label, stream=stream)
      except FetchError as e:
        if url is not None:
          raise
        raise FetchError(f"{e} (or download {source.url} by other means and pass its path "
                         "with --url)") from e
      if stream is not None:
        stream.write(f"verifying and unpacking {label} ...\n")
        stream.flush()
      out = work / "out"
      out.mkdir()
      _unpack(source, archive_path, out, label)
      archive_path.unlink()
      _check_target(target, force)  # again: the folder may have changed meanwhile
      old = work / "old"
      if target.exists():
        os.rename(target, old)  # an empty folder, or (force) the one being replaced
      try:
        os.rename(out, target)
      except OSError:
        if old.exists():
          os.rename(old, target)
        raise
      done = True
    except OSError as e:
      raise FetchError(f"cannot write the data set next to {target}: {e}") from e
    finally:
      shutil.rmtree(work, ignore_errors=True)
  finally:
    if not done:
      for folder in created:
        try:
          folder.rmdir()
        except OSError:
          break
  return target


# -----------------------------------------------------------------------------------------
# Command line.
# -----------------------------------------------------------------------------------------


def command(dataset: str, directory: str | os.PathLike) -> str:
  """The shell command that fetches ``dataset`` into ``directory`` (for error messages).

  Examples:
    >>> from gradclip_jax.training import fetch as data
    >>> data.command("ptb", "data/ptb")
    'gradclip data fetch ptb data/ptb'
  """
  if dataset not in SOURCES:
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
  return f"gradclip data fetch {dataset} {shlex.quote(os.fspath(directory))}"


def _epilog() -> str:
  lines = ["sources (verified after download):"]
  for s in SOURCES.values():
    lines.append(f"  {s.name:5s} {s.url}")
  return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the ``fetch`` sub-command to the ``gradclip data`` parser."""
  sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
  p = sub.add_parser(
      "fetch", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
      help="download, verify and unpack a data set the trainers read",
      description=("Download a data set's original archive, verify the files the loaders\n"
                   "read (SHA-256 and counts) and unpack only those into DIRECTORY, which\n"
                   "the trainers' --data-dir then reads. Nothing is left behind on failure."),
      epilog=_epilog())
  p.add_argument("dataset", metavar="DATASET", choices=DATASETS,
                 help=f"the data set: {', '.join(DATASETS)}")
  p.add_argument("directory", metavar="DIRECTORY",
                 help="folder to create (it may exist if empty)")
  p.add_argument("--url", default=None,
                 help="download from this http(s)/file URL or local archive instead of the "
                      "canonical source (verified the same way)")
  p.add_argument("--force", action="store_true",
                 help="replace DIRECTORY if it exists and is not empty")
  p.add_argument("--no-progress", dest="progress", action="store_false",
                 help="no progress bar on stderr")
  if hasattr(p, "unknown_arguments"):
    # gradclip's parser reports unknown arguments through the sub-command's parser
    # (usage and a "did you mean"); for "gradclip data" that is its only action, fetch.
    parser.unknown_arguments = p.unknown_arguments  # type: ignore[attr-defined]


def main(args: argparse.Namespace) -> int:
  """Runs ``gradclip data fetch``; returns 0, 2 on a failed fetch, 130 on Ctrl-C."""
  prog = "gradclip data fetch"
  try:
    target = fetch(args.dataset, args.directory, url=args.url, progress=args.progress,
                   force=args.force)
  except FetchError as e:
    print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
    return 2
  except KeyboardInterrupt:
    print(f"{prog}: interrupted; nothing was written to {args.directory}", file=sys.stderr)
    return 130
  source = SOURCES[args.dataset]
  shown = shlex.quote(os.fspath(args.directory))
  print(f"{source.title}: verified and unpacked into {target}")
  print(f"cite: {source.citation}")
  print(f"train with: {source.train_command.format(dir=shown)}")
  return 0
